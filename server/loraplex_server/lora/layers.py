"""LoRA-wrapped linear layer: ``y = base(x) + apply(x)`` over stacked per-slot buffers."""

from __future__ import annotations

import torch
from torch import nn

from .mapping import LoraMapping
from .ops import LoraApply, lora_apply
from .weights import LoraModuleWeights, ModuleKey


class LoraStepState:
    """Shared by every LoRA layer of one model: the apply function, chosen once for the model's
    device (``ops.apply_function``), and the ``mapping`` the runner sets before each forward."""

    def __init__(self, apply: LoraApply = lora_apply):
        self.apply = apply
        self.mapping: LoraMapping | None = None


class LoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, key: ModuleKey, max_loras: int, max_rank: int, state: LoraStepState):
        super().__init__()
        self.base = base
        self.key = key
        self.state = state
        w = base.weight
        self.register_buffer("lora_a", torch.zeros(max_loras, max_rank, base.in_features,
                                                   dtype=w.dtype, device=w.device), persistent=False)
        # [max_loras, max_rank, in] and [max_loras, max_rank, out] (= (scale * B)^T): see ops.py
        self.register_buffer("lora_bt", torch.zeros(max_loras, max_rank, base.out_features,
                                                    dtype=w.dtype, device=w.device), persistent=False)
        self.slot_ranks = [0] * max_loras  # 0 = this module is unused by the slot's adapter

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
        mapping = self.state.mapping
        if mapping is None or not mapping.has_lora:
            return y
        self.state.apply(y.view(-1, self.out_features), x.reshape(-1, self.in_features),  # [T, out], [T, in]
                         self.lora_a, self.lora_bt, self.slot_ranks, mapping)
        return y

    @torch.no_grad()
    def set_slot(self, slot: int, weights: LoraModuleWeights | None) -> None:
        """Write an adapter's weights into ``slot`` (scale folded into B), or clear the slot."""
        self.lora_a[slot].zero_()
        self.lora_bt[slot].zero_()
        if weights is None:
            self.slot_ranks[slot] = 0
            return
        r = weights.rank
        self.lora_a[slot, :r].copy_(weights.a)
        self.lora_bt[slot, :r].copy_(weights.b.T * weights.scale)
        self.slot_ranks[slot] = r
