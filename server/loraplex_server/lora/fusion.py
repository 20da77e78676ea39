"""LoRA layers that read one input share one shrink launch: q/k/v of an attention block, gate/up
of an MLP.

The model code calls ``q_proj(x)``, ``k_proj(x)``, ``v_proj(x)`` one after another on the same
tensor. With a backend that splits the apply into ``shrink`` and ``expand`` (the Triton one), the
first member called computes ``h`` for every member in one launch (reading ``x`` once) and each
member then expands its own columns. Each member p has its own ranks, its own element offsets into
its own flat buffers (several members may view one buffer), ``a_off_p`` for A and ``b_off_p`` for
Bt; R is the shared rank bound:

    for t with s = slot(t) >= 0:
        for p in members:
            r, a, b = ranks_p[s], a_off_p[s], b_off_p[s]
            h[t, p*R : p*R + r] = A_p[a : a + r * in].view(r, in) @ x[t]          # all p, in the first call
            y_p[t] += h[t, p*R : p*R + r] @ Bt_p[b : b + r * out_p].view(r, out_p)  # in member p's call

The cached ``h`` is reused only for the very same input tensor and step mapping, so a model that
feeds members different inputs still gets the right answer (one shrink per call). The torch ops
have no split apply; on them each layer applies on its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .weights import ModuleKey

if TYPE_CHECKING:
    from .layers import LoraLinear
    from .mapping import LoraMapping

SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class SharedInputGroup:
    """Up to 3 LoRA layers of one block that read the same input (see the module docstring)."""

    def __init__(self, members: list[LoraLinear]):
        self.members = members
        self._clear()

    def _clear(self) -> None:
        self._x: torch.Tensor | None = None
        self._mapping: LoraMapping | None = None
        self._h: torch.Tensor | None = None
        self._left = 0

    def apply(self, member: LoraLinear, y: torch.Tensor, x: torch.Tensor, mapping: LoraMapping,
              backend) -> None:
        """``y`` [T, out] += ``member``'s delta for ``x`` (the layer's input as it was called)."""
        x2d = x.reshape(-1, member.in_features)  # [T, in]
        if x is not self._x or mapping is not self._mapping or self._left == 0 or self._h is None:
            ranks = torch.stack([m.slot_ranks.table for m in self.members], dim=1)  # [num_slots, P]
            a_offsets = torch.stack([m.a_offsets.table for m in self.members], dim=1)  # [num_slots, P]
            self._h = backend.shrink(x2d, [m.lora_a for m in self.members], ranks, a_offsets,
                                     member.max_rank, mapping)  # [T, P * R]
            self._x, self._mapping, self._left = x, mapping, len(self.members)
        p, r = self.members.index(member), member.max_rank
        backend.expand(y, self._h[:, p * r:(p + 1) * r], member.lora_bt, member.slot_ranks, member.b_offsets,
                       mapping)
        self._left -= 1
        if self._left == 0:  # every member served: drop the references to x and h
            self._clear()


def group_shared_inputs(layers: dict[ModuleKey, LoraLinear]) -> list[SharedInputGroup]:
    """Attach a group to every set of 2+ layers of one block listed in ``SHARED_INPUTS`` that share
    their input width and rank bound (each keeps its own buffers and offset tables)."""
    groups = []
    for layer in sorted({key.layer for key in layers}):
        for names in SHARED_INPUTS:
            members = [layers[ModuleKey(layer, n)] for n in names if ModuleKey(layer, n) in layers]
            shared = {(m.in_features, m.max_rank) for m in members}
            if len(members) < 2 or len(shared) != 1:
                continue
            group = SharedInputGroup(members)
            for m in members:
                m.group = group
            groups.append(group)
    return groups
