"""Who holds each page of the unified memory pool (pure Python, no torch).

A page is one KV block's worth of memory in every layer (``lora/page_layout.py``). KV blocks take single pages,
lowest free page first; an adapter version takes one run of consecutive pages, highest first, so
the two grow towards each other and a run for an adapter is rarely cut by KV pages. The pool only
records holders; the policy (what to evict for whom) is the callers':

- ``take_page`` / ``give_page``: a KV block's page.
- ``find_run(n, claimable)``: the highest run of ``n`` pages each free or in ``claimable`` (pages
  the caller can reclaim: cached KV blocks no request holds, idle adapters' extents), or None.
- ``take_run(start, n)`` / ``give_run(start)``: an adapter extent (every page must be free).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

FREE, KV, ADAPTER = 0, 1, 2


class PagePool:
    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError(f"a page pool needs at least one page, got {num_pages}")
        self.num_pages = num_pages
        self._holder = bytearray(num_pages)  # FREE / KV / ADAPTER per page
        self._lowest_free = 0  # no free page lies below this index
        self._runs: dict[int, int] = {}  # adapter extent start -> pages
        self.free_pages = num_pages
        self.kv_pages = 0
        self.adapter_pages = 0

    def holder(self, page: int) -> int:
        return self._holder[page]

    # ---- KV blocks ------------------------------------------------------------------------
    def take_page(self) -> int | None:
        """The lowest free page, now held by KV; None when no page is free."""
        page = self._holder.find(FREE, self._lowest_free)
        if page < 0:
            self._lowest_free = self.num_pages
            return None
        self._holder[page] = KV
        self._lowest_free = page + 1
        self.free_pages -= 1
        self.kv_pages += 1
        return page

    def give_page(self, page: int) -> None:
        if self._holder[page] != KV:
            raise ValueError(f"page {page} is not held by a KV block")
        self._release(page, 1)
        self.kv_pages -= 1

    # ---- adapter extents ------------------------------------------------------------------
    def find_run(self, n: int, claimable: Iterable[int] = ()) -> int | None:
        """Start of the highest run of ``n`` consecutive pages each free or in ``claimable``."""
        if n < 1:
            raise ValueError(f"a run needs at least one page, got {n}")
        view = bytearray(self._holder)
        for page in claimable:
            view[page] = FREE
        view.reverse()
        match = re.search(b"\x00{%d}" % n, view)
        return None if match is None else self.num_pages - match.end()

    def take_run(self, start: int, n: int) -> None:
        if start < 0 or start + n > self.num_pages or any(self._holder[start:start + n]):  # FREE is 0
            raise ValueError(f"pages {start} .. {start + n - 1} are not all free")
        self._holder[start:start + n] = bytes([ADAPTER]) * n
        self._runs[start] = n
        self.free_pages -= n
        self.adapter_pages += n

    def give_run(self, start: int) -> None:
        n = self._runs.pop(start)
        self._release(start, n)
        self.adapter_pages -= n

    def _release(self, start: int, n: int) -> None:
        self._holder[start:start + n] = bytes(n)
        self.free_pages += n
        self._lowest_free = min(self._lowest_free, start)


class KvPages:
    """The free-block source of a ``BlockManager`` on the unified pool (in place of its deque):
    free pages of the pool, then the pages of idle adapters, evicted one version at a time.

    ``idle_pages()`` counts the pages that adapters no running request, pin or this step holds
    could give back; ``evict_idle()`` evicts the least recently used such version (its run
    becomes free pages) and returns False when there is none (both are the LoRA side's)."""

    def __init__(self, pool: PagePool, idle_pages, evict_idle):
        self.pool = pool
        self._idle_pages = idle_pages
        self._evict_idle = evict_idle

    def __len__(self) -> int:
        return self.pool.free_pages + self._idle_pages()

    def has(self, n: int) -> bool:
        """``len(self) >= n``, counting idle adapters' pages only when free pages fall short."""
        return self.pool.free_pages >= n or len(self) >= n

    def __bool__(self) -> bool:
        return self.has(1)

    def popleft(self) -> int:
        page = self.pool.take_page()
        while page is None:
            if not self._evict_idle():
                raise IndexError("no free page and no idle adapter to evict")
            page = self.pool.take_page()
        return page

    def append(self, page: int) -> None:
        self.pool.give_page(page)


class AdapterRuns:
    """The unified pool as the slot manager's extent allocator (``RowPool``'s interface, in pages).

    ``allocate(n)`` takes the highest run of ``n`` pages that are free or hold cached KV blocks no
    request uses: ``cached_pages()`` lists those, ``reclaim(pages)`` drops them from the prefix
    cache and gives them back to the pool (the KV side's). Extents never move: KV blocks may sit
    between them, so ``can_compact`` is always False and the slot manager evicts instead."""

    def __init__(self, pool: PagePool, cached_pages, reclaim):
        self.pool = pool
        self._cached_pages = cached_pages
        self._reclaim = reclaim

    @property
    def num_rows(self) -> int:
        return self.pool.num_pages

    @property
    def free_rows(self) -> int:
        return self.pool.free_pages

    def allocate(self, length: int) -> int | None:
        cached = set(self._cached_pages())
        start = self.pool.find_run(length, cached)
        if start is None:
            return None
        taken = [p for p in range(start, start + length) if p in cached]
        if taken:
            self._reclaim(taken)
        self.pool.take_run(start, length)
        return start

    def release(self, start: int) -> None:
        self.pool.give_run(start)

    def can_compact(self, length: int) -> bool:
        return False

    def compact(self) -> list[tuple[int, int, int]]:
        return []
