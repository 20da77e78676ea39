"""Row extents of the LoRA weight pool: which rows of ``lora_a`` / ``lora_bt`` each resident adapter
version holds.

Every LoRA layer keeps one pool of ``num_rows`` weight rows; an adapter version of rank ``r`` holds
one contiguous extent of ``r`` rows at the same offset in every layer (``slots.py`` owns the
bookkeeping of which version sits where). This module is only the allocator, pure Python:

- ``allocate(n)``: first fit over the free extents, except that a spot beside an extent of the same
  length wins (equal ranks side by side, so the batched torch apply covers them with one matmul
  pair); candidate spots are each free extent's head and tail.
- ``release(start)``: the extent's rows become free again, merged with free neighbours.
- ``compact()``: slide every extent down to leave one free tail, returning the moves (old start,
  new start, length) in an order safe to copy rows in (each destination lies below its source).
"""

from __future__ import annotations

import bisect


class RowPool:
    def __init__(self, num_rows: int):
        if num_rows < 1:
            raise ValueError(f"a LoRA row pool needs at least one row, got {num_rows}")
        self.num_rows = num_rows
        self._free: list[tuple[int, int]] = [(0, num_rows)]  # (start, length), sorted by start, never adjacent
        self._used: dict[int, int] = {}  # extent start -> length
        self._used_end: dict[int, int] = {}  # extent end (start + length) -> length

    @property
    def free_rows(self) -> int:
        return sum(length for _, length in self._free)

    @property
    def largest_free(self) -> int:
        return max((length for _, length in self._free), default=0)

    @property
    def free_extents(self) -> list[tuple[int, int]]:
        return list(self._free)

    @property
    def extents(self) -> list[tuple[int, int]]:
        """Allocated (start, length), by start."""
        return sorted(self._used.items())

    def allocate(self, length: int) -> int | None:
        """The start of a new extent of ``length`` rows, or None when no free extent is that long."""
        if length < 1:
            raise ValueError(f"an extent needs at least one row, got {length}")
        best: tuple[int, int] | None = None  # (-equal-length neighbours, start): smallest wins
        for start, free_len in self._free:
            if free_len < length:
                continue
            for spot in (start, start + free_len - length):
                score = (-self._equal_neighbours(spot, length), spot)
                if best is None or score < best:
                    best = score
        if best is None:
            return None
        spot = best[1]
        self._take(spot, length)
        return spot

    def _equal_neighbours(self, spot: int, length: int) -> int:
        return int(self._used_end.get(spot) == length) + int(self._used.get(spot + length) == length)

    def _take(self, spot: int, length: int) -> None:
        i = next(i for i, (s, n) in enumerate(self._free) if s <= spot and spot + length <= s + n)
        start, free_len = self._free.pop(i)
        pieces = [(start, spot - start), (spot + length, start + free_len - spot - length)]
        self._free[i:i] = [(s, n) for s, n in pieces if n > 0]
        self._used[spot] = length
        self._used_end[spot + length] = length

    def release(self, start: int) -> None:
        """Free the extent that starts at ``start``, merged with free neighbours."""
        length = self._used.pop(start)
        del self._used_end[start + length]
        i = bisect.bisect_left(self._free, (start, 0))
        if i < len(self._free) and self._free[i][0] == start + length:  # free extent right after
            length += self._free.pop(i)[1]
        if i > 0 and sum(self._free[i - 1]) == start:  # free extent right before
            before_start, before_len = self._free.pop(i - 1)
            start, length, i = before_start, before_len + length, i - 1
        self._free.insert(i, (start, length))

    def can_compact(self, length: int) -> bool:
        """Whether sliding the extents together (``compact``) leaves room for ``length`` rows."""
        return self.free_rows >= length

    def compact(self) -> list[tuple[int, int, int]]:
        """Slide every extent down, in address order, so all free rows form one tail extent.
        Returns the moves (old start, new start, length); each destination lies below its source
        and above every earlier move's, so copying rows in this order never overwrites an extent
        not yet moved (a move may overlap its own source: copy through a temporary)."""
        moves, used, top = [], {}, 0
        for start, length in self.extents:
            if start != top:
                moves.append((start, top, length))
            used[top] = length
            top += length
        self._used = used
        self._used_end = {s + n: n for s, n in used.items()}
        self._free = [(top, self.num_rows - top)] if top < self.num_rows else []
        return moves
