"""Per-step token -> device-slot mapping for the batched LoRA apply.

The runner packs sequences sorted by slot, so tokens of one adapter form contiguous segments.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

NO_SLOT = -1


class SlotRankList(Protocol):
    """Each slot's rank for one module: a ``list[int]``, or a LoRA layer's ``SlotRanks``."""

    def __getitem__(self, slot: int, /) -> int: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[int]: ...


@dataclass(frozen=True)
class SegmentRun:
    """Neighbouring segments of slots ``lo..hi-1`` (one each, in slot order), all ``width`` tokens
    long, computed at ``rank`` (the largest of their ranks for the module): tokens ``start..end-1``,
    batched as one matmul pair. ``pad_rows``: zero rank rows read because ranks differ."""

    lo: int
    hi: int
    rank: int
    width: int
    start: int
    end: int
    pad_rows: int = 0


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
        token_slots = torch.tensor(slots, dtype=torch.long, device=device)
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

    def segment_runs(self, ranks: SlotRankList, max_pad_rows: int = 0) -> list[SegmentRun]:
        """Segments grouped into runs for a module whose slot ranks are ``ranks``; neighbours of
        different rank join a run while it reads at most ``max_pad_rows`` zero rank rows
        (cached per ranks and bound)."""
        key = (tuple(ranks), max_pad_rows)
        runs = self._runs.get(key)
        if runs is None:
            runs = self._runs[key] = _group_runs(self.segments, ranks, max_pad_rows)
        return runs


def _group_runs(segments, ranks: SlotRankList, max_pad_rows: int) -> list[SegmentRun]:
    runs: list[SegmentRun] = []
    for start, end, slot in segments:
        rank, width = ranks[slot], end - start
        if rank == 0:
            continue
        last = runs[-1] if runs else None
        if last and last.hi == slot and last.end == start and last.width == width:
            top = max(last.rank, rank)
            pad = last.pad_rows + (top - last.rank) * (last.hi - last.lo) + (top - rank)
            if pad <= max_pad_rows:
                runs[-1] = SegmentRun(last.lo, slot + 1, top, width, last.start, end, pad)
                continue
        runs.append(SegmentRun(slot, slot + 1, rank, width, start, end))
    return runs
