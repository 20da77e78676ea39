"""LoRA-wrapped linear layer: ``y = base(x) + apply(x)`` over a pool of weight rows (``ops.py``)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .fusion import SharedInputGroup
from .mapping import LoraMapping
from .ops import LoraApply, lora_apply
from .weights import LoraModuleWeights, ModuleKey


class SlotTable:
    """One int per slot, kept twice: ``host`` for the torch ops (run grouping is host logic) and
    ``table`` [num_slots] int32 on the device for the kernels. Two per LoRA layer: its ranks (0 =
    the slot's adapter does not touch the module) and its row offsets into the pool (one table
    shared by every layer of a model: an adapter's extent starts at the same row in each).
    ``table`` keeps one address for the model's life, so a decode step captured in a CUDA graph
    reads the ranks and offsets of whatever adapters sit in the slots at replay. ``bound``: no
    value exceeds it (the largest rank, for a rank table), fixed, so a captured gather has one
    shape. Like the pool buffers, it assumes the model is never moved after the LoRA layers are
    injected (``model.to()`` would leave it, and every captured graph, behind)."""

    def __init__(self, num_slots: int, device: torch.device, bound: int = 0):
        self.host = [0] * num_slots
        self.table = torch.zeros(num_slots, dtype=torch.int32, device=device)  # [num_slots]
        self.bound = bound

    def set(self, slot: int, value: int) -> None:
        self.host[slot] = value
        self.table[slot] = value

    def __getitem__(self, slot: int) -> int:
        return self.host[slot]

    def __len__(self) -> int:
        return len(self.host)

    def __iter__(self) -> Iterator[int]:
        return iter(self.host)

    def __eq__(self, other) -> bool:
        return list(self.host) == list(other)

    # equal to a list of the same values, so unhashable like one (what defining __eq__ alone implies)
    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"SlotTable({self.host})"


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
    # buffers (registered in __init__): the row pool, [pool_rows, in] and [pool_rows, out]
    lora_a: torch.Tensor
    lora_bt: torch.Tensor

    def __init__(self, base: nn.Linear, key: ModuleKey, max_loras: int, max_rank: int, state: LoraStepState,
                 pool_rows: int | None = None, slot_offsets: SlotTable | None = None):
        """``max_loras`` slots (table entries); ``pool_rows`` weight rows (default ``max_loras *
        max_rank``); ``slot_offsets``: the model's shared row offset table (a new one if None)."""
        super().__init__()
        self.base = base
        self.key = key
        self.state = state
        w = base.weight
        dtype = lora_compute_dtype(w.dtype, w.device, state.apply)
        rows = max_loras * max_rank if pool_rows is None else pool_rows
        # [pool_rows, in] and [pool_rows, out] (= (scale * B)^T): slot s is rows off[s] .. off[s]+r[s]-1
        self.register_buffer("lora_a", torch.zeros(rows, base.in_features, dtype=dtype, device=w.device),
                             persistent=False)
        self.register_buffer("lora_bt", torch.zeros(rows, base.out_features, dtype=dtype, device=w.device),
                             persistent=False)
        self.slot_ranks = SlotTable(max_loras, w.device, bound=max_rank)
        self.slot_offsets = slot_offsets if slot_offsets is not None else SlotTable(max_loras, w.device, bound=rows)
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

    @property
    def max_rank(self) -> int:
        return self.slot_ranks.bound

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
            apply(y2d, x.reshape(-1, self.in_features), self.lora_a, self.lora_bt, self.slot_ranks,
                  self.slot_offsets, mapping)

    @torch.no_grad()
    def set_slot(self, slot: int, offset: int, weights: LoraModuleWeights | None) -> None:
        """Write an adapter's weights (scale folded into B) into rows ``offset`` .. ``offset + r - 1``
        and record slot ``slot``'s rank for this module (0 when ``weights`` is None). The offset
        table itself is the slot manager's (shared by every layer)."""
        if weights is None:
            self.slot_ranks.set(slot, 0)
            return
        r = weights.rank
        if r > self.max_rank or offset < 0 or offset + r > self.lora_a.shape[0]:
            raise ValueError(f"rank {r} at row {offset} does not fit a pool of {self.lora_a.shape[0]} rows "
                             f"(max rank {self.max_rank})")
        self.lora_a[offset:offset + r].copy_(weights.a)
        self.lora_bt[offset:offset + r].copy_(weights.b.T * weights.scale)
        self.slot_ranks.set(slot, r)

    @torch.no_grad()
    def move_rows(self, src: int, dst: int, length: int) -> None:
        """Copy rows ``src`` .. ``src + length - 1`` to ``dst`` (ranges may overlap): compaction."""
        for buf in (self.lora_a, self.lora_bt):
            buf[dst:dst + length] = buf[src:src + length].clone()
