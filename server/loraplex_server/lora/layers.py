"""LoRA-wrapped linear layer: ``y = base(x) + apply(x)`` over flat weight buffers (``ops.py``)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .fusion import SharedInputGroup
from .mapping import LoraMapping
from .ops import LoraApply, lora_apply, slot_weights
from .weights import LoraModuleWeights, ModuleKey


class SlotTable:
    """One int per slot, kept twice: ``host`` for the torch ops (run grouping is host logic) and
    ``table`` [num_slots] int32 on the device for the kernels. Three per LoRA layer: its ranks (0 =
    the slot's adapter does not touch the module) and the element offsets of each slot's A and Bt
    in the layer's buffers.
    ``table`` keeps one address for the model's life, so a decode step captured in a CUDA graph
    reads the ranks and offsets of whatever adapters sit in the slots at replay. ``bound``: no
    value exceeds it (the largest rank, for a rank table), fixed, so a captured gather has one
    shape. Like the weight buffers, it assumes the model is never moved after the LoRA layers are
    injected (``model.to()`` would leave it, and every captured graph, behind)."""

    def __init__(self, num_slots: int, device: torch.device, bound: int = 0):
        self.host = [0] * num_slots
        self.table = torch.zeros(num_slots, dtype=torch.int32, device=device)  # [num_slots]
        # on the CPU, a numpy view of the same memory: an element write without torch's indexing
        # (~10 us; placing an adapter writes three per LoRA layer)
        self._cpu_view = self.table.numpy() if self.table.device.type == "cpu" else None
        self.bound = bound

    def set(self, slot: int, value: int) -> None:
        self.host[slot] = value
        if self._cpu_view is not None:
            self._cpu_view[slot] = value
        else:
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
    # buffers (registered in __init__): the row pool, flat: [pool_rows * in] and [pool_rows * out]
    lora_a: torch.Tensor
    lora_bt: torch.Tensor

    def __init__(self, base: nn.Linear, key: ModuleKey, max_loras: int, max_rank: int, state: LoraStepState,
                 pool_rows: int | None = None, buffers: tuple[torch.Tensor, torch.Tensor] | None = None):
        """``max_loras`` slots (table entries). Weights: a row pool of its own, ``pool_rows`` rows
        (default ``max_loras * max_rank``), each ``in`` elements of ``lora_a`` and ``out`` of
        ``lora_bt``; or ``buffers``, flat (A, Bt) buffers shared with other modules (the unified
        pool's arenas, ``page_layout.py``), written at element offsets (``write_slot``)."""
        super().__init__()
        self.base = base
        self.key = key
        self.state = state
        w = base.weight
        if buffers is not None:
            self.pool_rows = 0
            a_buf, bt_buf = buffers
        else:
            dtype = lora_compute_dtype(w.dtype, w.device, state.apply)
            self.pool_rows = max_loras * max_rank if pool_rows is None else pool_rows
            a_buf = torch.zeros(self.pool_rows * base.in_features, dtype=dtype, device=w.device)
            bt_buf = torch.zeros(self.pool_rows * base.out_features, dtype=dtype, device=w.device)
        # A then (scale * B)^T, row after row: slot s's A is lora_a[a_off[s] : a_off[s] + r[s] * in]
        self.register_buffer("lora_a", a_buf, persistent=False)
        self.register_buffer("lora_bt", bt_buf, persistent=False)
        self.slot_ranks = SlotTable(max_loras, w.device, bound=max_rank)
        self.a_offsets = SlotTable(max_loras, w.device, bound=self.lora_a.numel())
        self.b_offsets = SlotTable(max_loras, w.device, bound=self.lora_bt.numel())
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

    @property
    def row_bytes(self) -> int:
        """Device bytes of one pool row: ``in`` elements of A and ``out`` of Bt."""
        return (self.in_features + self.out_features) * self.lora_a.element_size()

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
                  self.a_offsets, self.b_offsets, mapping)

    @torch.no_grad()
    def set_slot(self, slot: int, row: int, weights: LoraModuleWeights | None) -> None:
        """Write an adapter's weights (scale folded into B) into pool rows ``row`` .. ``row + r - 1``
        and record slot ``slot``'s rank and offsets for this module (rank 0 when ``weights`` is None)."""
        if weights is not None and (row < 0 or row + weights.rank > self.pool_rows):
            raise ValueError(f"rank {weights.rank} at row {row} does not fit a pool of {self.pool_rows} rows")
        self.write_slot(slot, row * self.in_features, row * self.out_features, weights)

    @torch.no_grad()
    def write_slot(self, slot: int, a_offset: int, b_offset: int, weights: LoraModuleWeights | None) -> None:
        """Write an adapter's A at element ``a_offset`` of ``lora_a`` and its (scale * B)^T at
        ``b_offset`` of ``lora_bt``, and point slot ``slot`` at them (rank 0 when ``weights`` is None)."""
        if weights is None:
            self.slot_ranks.set(slot, 0)
            return
        r, fan_in, fan_out = weights.rank, self.in_features, self.out_features
        if (r > self.max_rank or a_offset < 0 or b_offset < 0 or a_offset + r * fan_in > self.lora_a.numel()
                or b_offset + r * fan_out > self.lora_bt.numel()):
            raise ValueError(f"rank {r} at offsets {a_offset} / {b_offset} does not fit buffers of "
                             f"{self.lora_a.numel()} / {self.lora_bt.numel()} elements (max rank {self.max_rank})")
        a, bt = slot_weights(self.lora_a, self.lora_bt, r, a_offset, b_offset, fan_in, fan_out)
        a.copy_(weights.a)
        bt.copy_(weights.bt)
        self.a_offsets.set(slot, a_offset)
        self.b_offsets.set(slot, b_offset)
        self.slot_ranks.set(slot, r)

    def rows(self, row: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool rows ``row`` .. ``row + count - 1``: views [count, in] of A and [count, out] of Bt."""
        i, o = self.in_features, self.out_features
        return slot_weights(self.lora_a, self.lora_bt, count, row * i, row * o, i, o)

    @torch.no_grad()
    def move_slot(self, slot: int, src: int, dst: int, length: int) -> None:
        """Copy pool rows ``src`` .. ``src + length - 1`` to ``dst`` (ranges may overlap) and point
        ``slot`` (which holds them) at the new rows: compaction."""
        for new, old in zip(self.rows(dst, length), self.rows(src, length), strict=True):
            new.copy_(old.clone())
        if self.slot_ranks[slot]:
            self.a_offsets.set(slot, dst * self.in_features)
            self.b_offsets.set(slot, dst * self.out_features)
