"""LoRA-wrapped linear layer: ``y = base(x) + apply(x)`` over stacked per-slot buffers."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .fusion import SharedInputGroup
from .mapping import LoraMapping
from .ops import LoraApply, lora_apply
from .weights import LoraModuleWeights, ModuleKey


class SlotRanks:
    """Each slot's rank for one module (0 = the slot's adapter does not touch it), kept twice:
    ``host`` for the torch ops (run grouping is host logic) and ``table`` [num_slots] int32 on the
    device for the kernels. ``table`` keeps one address for the model's life, so a decode step
    captured in a CUDA graph reads the ranks of whatever adapters sit in the slots at replay.
    Like the slot buffers, it assumes the model is never moved after the LoRA layers are injected
    (``model.to()`` would leave it, and every captured graph, behind)."""

    def __init__(self, num_slots: int, device: torch.device):
        self.host = [0] * num_slots
        self.table = torch.zeros(num_slots, dtype=torch.int32, device=device)  # [num_slots]

    def set(self, slot: int, rank: int) -> None:
        self.host[slot] = rank
        self.table[slot] = rank

    def __getitem__(self, slot: int) -> int:
        return self.host[slot]

    def __len__(self) -> int:
        return len(self.host)

    def __iter__(self) -> Iterator[int]:
        return iter(self.host)

    def __eq__(self, other) -> bool:
        return list(self.host) == list(other)

    # equal to a list of the same ranks, so unhashable like one (what defining __eq__ alone implies)
    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"SlotRanks({self.host})"


def lora_compute_dtype(model_dtype: torch.dtype, device: torch.device, apply: LoraApply | None = None) -> torch.dtype:
    """The dtype of the slot buffers: what the apply asks for (the native CPU kernel: the model's,
    it accumulates in fp32), else the model's, except fp32 for a half-precision model with the
    torch ops on CPU. There the LoRA shapes (a few tokens per adapter, ranks 8-64) are
    dispatch-bound, and a bf16 batched matmul costs ~3x an fp32 one (measured, 2 threads: 150 vs
    48 us for 5 adapters x 4 tokens at rank 16), while converting x and the delta is cheap."""
    weight_dtype = getattr(apply, "weight_dtype", None)
    if weight_dtype is not None:
        return weight_dtype(model_dtype)
    return torch.float32 if device.type == "cpu" else model_dtype


class LoraStepState:
    """Shared by every LoRA layer of one model: the apply function, chosen once for the model's
    device (``ops.apply_function``), and the ``mapping`` the runner sets before each forward."""

    def __init__(self, apply: LoraApply = lora_apply):
        self.apply = apply
        self.mapping: LoraMapping | None = None


class LoraLinear(nn.Module):
    # buffers (registered in __init__): [max_loras, max_rank, in] and [max_loras, max_rank, out]
    lora_a: torch.Tensor
    lora_bt: torch.Tensor

    def __init__(self, base: nn.Linear, key: ModuleKey, max_loras: int, max_rank: int, state: LoraStepState):
        super().__init__()
        self.base = base
        self.key = key
        self.state = state
        w = base.weight
        dtype = lora_compute_dtype(w.dtype, w.device, state.apply)
        self.register_buffer("lora_a", torch.zeros(max_loras, max_rank, base.in_features,
                                                   dtype=dtype, device=w.device), persistent=False)
        # [max_loras, max_rank, in] and [max_loras, max_rank, out] (= (scale * B)^T): see ops.py
        self.register_buffer("lora_bt", torch.zeros(max_loras, max_rank, base.out_features,
                                                    dtype=dtype, device=w.device), persistent=False)
        self.slot_ranks = SlotRanks(max_loras, w.device)
        self.group: SharedInputGroup | None = None  # set when siblings read the same input (fusion.py)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        self.add_delta(y.view(-1, self.out_features), x)
        return y

    def add_delta(self, y2d: torch.Tensor, x: torch.Tensor) -> None:
        """``y2d`` [T, out] (unit-stride rows; a column view of a merged projection's output
        is fine) += this step's LoRA delta of each token of ``x`` [..., in]."""
        mapping = self.state.mapping
        if mapping is None or not mapping.has_lora:
            return
        apply = self.state.apply
        if self.group is not None and hasattr(apply, "shrink"):  # a split apply: one shrink per group
            self.group.apply(self, y2d, x, mapping, apply)
        else:
            apply(y2d, x.reshape(-1, self.in_features), self.lora_a, self.lora_bt, self.slot_ranks, mapping)

    @torch.no_grad()
    def set_slot(self, slot: int, weights: LoraModuleWeights | None) -> None:
        """Write an adapter's weights into ``slot`` (scale folded into B), or clear the slot."""
        self.lora_a[slot].zero_()
        self.lora_bt[slot].zero_()
        if weights is None:
            self.slot_ranks.set(slot, 0)
            return
        r = weights.rank
        self.lora_a[slot, :r].copy_(weights.a)
        self.lora_bt[slot, :r].copy_(weights.b.T * weights.scale)
        self.slot_ranks.set(slot, r)
