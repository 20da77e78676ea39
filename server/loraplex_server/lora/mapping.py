"""Per-step token -> device-slot mapping for the batched LoRA apply.

The runner packs sequences sorted by slot, so tokens of one adapter form contiguous segments.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

NO_SLOT = -1


@dataclass(frozen=True)
class SegmentRun:
    """Neighbouring segments of slots ``lo..hi-1`` (one each, in slot order), all ``width`` tokens
    long and of one ``rank`` for the module: tokens ``start..end-1``, batched as one matmul pair."""

    lo: int
    hi: int
    rank: int
    width: int
    start: int
    end: int


@dataclass(frozen=True)
class LoraMapping:
    token_slots: torch.Tensor  # [num_tokens] slot of each token, NO_SLOT for the base model
    segments: tuple[tuple[int, int, int], ...]  # (start, end, slot): maximal runs with slot >= 0
    num_tokens: int
    _runs: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_runs(cls, runs: list[tuple[int, int]], device: torch.device | str = "cpu") -> "LoraMapping":
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
        return cls(token_slots, tuple(tuple(s) for s in segments), start)

    @property
    def has_lora(self) -> bool:
        return bool(self.segments)

    @property
    def active_slots(self) -> set[int]:
        return {s for _, _, s in self.segments}

    def segment_runs(self, ranks: list[int]) -> list[SegmentRun]:
        """Segments grouped into runs for a module whose slot ranks are ``ranks`` (cached per ranks)."""
        key = tuple(ranks)
        runs = self._runs.get(key)
        if runs is None:
            runs = self._runs[key] = _group_runs(self.segments, ranks)
        return runs


def _group_runs(segments, ranks: list[int]) -> list[SegmentRun]:
    runs: list[SegmentRun] = []
    for start, end, slot in segments:
        rank, width = ranks[slot], end - start
        if rank == 0:
            continue
        last = runs[-1] if runs else None
        if last and last.hi == slot and last.end == start and last.rank == rank and last.width == width:
            runs[-1] = SegmentRun(last.lo, slot + 1, rank, width, last.start, end)
        else:
            runs.append(SegmentRun(slot, slot + 1, rank, width, start, end))
    return runs
