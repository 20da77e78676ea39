"""Per-step token -> device-slot mapping for the batched LoRA apply.

The runner packs sequences sorted by their slot's place in the pool, so tokens of one adapter form
contiguous segments, and neighbouring segments of equal-rank adapters placed side by side in the
pool read evenly spaced weights (one batched matmul pair, ``ops.sgmv``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..host_tensors import int_tensor

NO_SLOT = -1


class SlotValues(Protocol):
    """One int per slot (a module's ranks, or its element offsets): a ``list[int]``, or a ``SlotTable``."""

    def __getitem__(self, slot: int, /) -> int: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[int]: ...


def rank_bound(ranks: SlotValues) -> int:
    """The largest rank a slot can have: a ``SlotTable``'s fixed bound, else the largest given."""
    bound = getattr(ranks, "bound", 0)
    return bound if bound else max(ranks, default=0)


def device_table(values: SlotValues, device: torch.device | str) -> torch.Tensor:
    """[num_slots] int32 on ``device``: a ``SlotTable``'s device table as is, else a new copy."""
    table = getattr(values, "table", None)
    if table is not None:
        return table
    return torch.tensor(list(values), dtype=torch.int32, device=device)


@dataclass(frozen=True)
class SegmentRun:
    """``count`` neighbouring segments, all ``width`` tokens long (tokens ``start..end-1``), whose
    slots share one ``rank`` for the module and whose weights step evenly through the buffers:
    segment i reads A at element ``a_offset + i * a_step`` and Bt at ``b_offset + i * b_step``
    (``ops.slot_weights``). Batched as one matmul pair over strided views of the buffers."""

    a_offset: int
    a_step: int
    b_offset: int
    b_step: int
    count: int
    rank: int
    width: int
    start: int
    end: int


@dataclass(frozen=True)
class LoraMapping:
    """Which slot each packed token uses. A *static* mapping (``static()``, for captured decode
    steps) knows nothing on the host: ``token_slots`` is a fixed buffer rewritten before each
    replay, so the apply must treat every row as possibly adapted (gather layout, every row)."""

    token_slots: torch.Tensor  # [num_tokens] slot of each token, NO_SLOT for the base model
    segments: tuple[tuple[int, int, int], ...]  # (start, end, slot): maximal runs with slot >= 0
    num_tokens: int
    _runs: dict = field(default_factory=dict, compare=False, repr=False)
    is_static: bool = False

    @classmethod
    def from_runs(cls, runs: list[tuple[int, int]], device: torch.device | str = "cpu") -> LoraMapping:
        """``runs``: (slot, num_tokens) per packed sequence, in packed order."""
        segments: list[list[int]] = []
        slots: list[int] = []
        start = 0
        for slot, n in runs:
            if n <= 0:
                continue
            slots.extend([slot] * n)
            if slot != NO_SLOT:
                if segments and segments[-1][2] == slot and segments[-1][1] == start:
                    segments[-1][1] = start + n
                else:
                    segments.append([start, start + n, slot])
            start += n
        token_slots = int_tensor(slots, torch.long, device)
        return cls(token_slots, tuple((lo, hi, slot) for lo, hi, slot in segments), start)

    @classmethod
    def static(cls, token_slots: torch.Tensor) -> LoraMapping:
        """A mapping over a device buffer whose contents change between graph replays."""
        return cls(token_slots, (), token_slots.shape[0], is_static=True)

    @property
    def has_lora(self) -> bool:
        return self.is_static or bool(self.segments)

    @property
    def active_slots(self) -> set[int]:
        return {s for _, _, s in self.segments}

    def segment_table(self) -> torch.Tensor:
        """``segments`` as a [n, 3] int32 host tensor (start, end, slot) for native kernels (cached)."""
        table = self._runs.get("table")
        if table is None:
            table = self._runs["table"] = torch.tensor(self.segments, dtype=torch.int32).reshape(-1, 3)
        return table

    def segment_runs(self, ranks: SlotValues, a_offsets: SlotValues, b_offsets: SlotValues) -> list[SegmentRun]:
        """Segments grouped into runs for a module whose slot ranks are ``ranks`` and element
        offsets ``a_offsets`` / ``b_offsets`` (cached per the segments' ranks and offsets)."""
        key = tuple((ranks[slot], a_offsets[slot], b_offsets[slot]) for _, _, slot in self.segments)
        runs = self._runs.get(key)
        if runs is None:
            runs = self._runs[key] = _group_runs(self.segments, key)
        return runs


def _group_runs(segments, places: tuple[tuple[int, int, int], ...]) -> list[SegmentRun]:
    """``places``: (rank, A offset, Bt offset) of each segment's slot. A segment joins the last run
    when it follows it, has its width and rank, and its offsets continue the run's steps."""
    runs: list[SegmentRun] = []
    for (start, end, _), (rank, a_off, b_off) in zip(segments, places, strict=True):
        width = end - start
        if rank == 0:
            continue
        last = runs[-1] if runs else None
        if last and last.end == start and last.width == width and last.rank == rank:
            a_step, b_step = (a_off - last.a_offset, b_off - last.b_offset) if last.count == 1 else \
                (last.a_step, last.b_step)
            if (a_off == last.a_offset + last.count * a_step and b_off == last.b_offset + last.count * b_step
                    and a_step > 0 and b_step > 0):
                runs[-1] = SegmentRun(last.a_offset, a_step, last.b_offset, b_step, last.count + 1, rank, width,
                                      last.start, end)
                continue
        runs.append(SegmentRun(a_off, 0, b_off, 0, 1, rank, width, start, end))
    return runs
