"""Device slots: which adapter version sits in which slot, and which rows of the weight pool it holds
(LRU, pinning).

Everything here is keyed by ``VersionKey`` (``id@n``), never by adapter id: two versions of one
adapter (a hot-swap while requests run on the old one) hold two slots.

A slot is an index into each layer's rank and offset tables: cheap, so there can be many
(``max_loras``). Memory is rows: a version of rank ``r`` holds one extent of ``r``
consecutive rows of every layer's pool (``row_pool.py``: first fit, equal ranks side by side so
the batched torch apply covers neighbours with one matmul pair); a module it does not touch gets
rank 0 there. When no free extent is long enough, the least recently used versions outside the
step, the running requests (``protected``) and the pinned ones are evicted until enough rows are
free; if the free rows are enough but scattered, the extents are slid together (a row copy in
every layer, ``compact``). ``SlotsExhaustedError`` only when even evicting everything evictable
cannot make room (the scheduler's caps keep that from happening).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet

from .ids import VersionKey
from .layers import LoraLinear
from .page_layout import PageLayout
from .row_pool import RowPool
from .weights import LoraAdapter, ModuleKey


class SlotsExhaustedError(RuntimeError):
    """More adapters (or rows) requested than evicting every evictable version frees (a scheduler bug)."""


class SlotManager:
    def __init__(self, layers: dict[ModuleKey, LoraLinear], max_loras: int, pages=None,
                 layout: PageLayout | None = None, page_bytes: int = 0):
        """Extents are rows of the layers' own pools, or, with ``pages`` (the unified pool as an
        extent allocator, ``memory.page_pool.AdapterRuns``) and its ``layout``, runs of pages of ``page_bytes``."""
        self.layers = layers
        self.max_loras = max_loras
        self.layout = layout
        if pages is not None:
            self.rows = pages
            self.row_bytes = page_bytes
        else:
            self.rows = RowPool(next(iter(layers.values())).pool_rows)
            # device bytes of one pool row: that row of lora_a and of lora_bt in every LoRA layer
            self.row_bytes = sum(la.row_bytes for la in layers.values())
        self._slot_of: OrderedDict[VersionKey, int] = OrderedDict()  # version key -> slot, LRU first
        self._extent: dict[int, tuple[int, int]] = {}  # occupied slot -> (first row, rows)
        self._free_slots = list(range(max_loras))
        self._used_rows = 0
        self.pinned: set[VersionKey] = set()
        self.num_loads = 0
        self.num_evictions = 0
        self.num_compactions = 0

    @property
    def pool_rows(self) -> int:
        return self.rows.num_rows

    @property
    def used_rows(self) -> int:
        """Rows (pages) held by resident adapter versions."""
        return self._used_rows

    def extent_length(self, adapter: LoraAdapter) -> int:
        """Rows (pages, on the unified pool) a version holds when resident."""
        if self.layout is None:
            return adapter.rank
        return self.layout.pages({key: w.rank for key, w in adapter.modules.items()})

    def idle_rows(self, keep: AbstractSet[VersionKey]) -> int:
        """Rows (pages) of the resident versions outside ``keep`` and the pinned ones (the cost is
        in the size of ``keep``, not in the number of resident versions)."""
        kept = {self._slot_of[k] for k in (set(keep) | self.pinned) if k in self._slot_of}
        return self._used_rows - sum(self._extent[slot][1] for slot in kept)

    def evict_lru(self, keep: AbstractSet[VersionKey]) -> bool:
        """Evict the least recently used version outside ``keep`` and the pinned; False if none."""
        victim = self._evictable(set(keep) | self.pinned)
        if victim is None:
            return False
        self._drop(victim)
        self.num_evictions += 1
        return True

    def slot_of(self, key: VersionKey) -> int | None:
        return self._slot_of.get(key)

    def rows_of(self, key: VersionKey) -> tuple[int, int] | None:
        """(first row, number of rows) of a resident version's extent."""
        slot = self._slot_of.get(key)
        return None if slot is None else self._extent[slot]

    def offset_of_slot(self, slot: int) -> int:
        return self._extent[slot][0] if slot in self._extent else 0

    @property
    def resident(self) -> list[VersionKey]:
        return list(self._slot_of)

    def fits(self, ranks: Iterable[int]) -> bool:
        """Whether adapters of these ranks can be resident together (evicting the others,
        compacting if need be): at most ``max_loras`` of them and their rows within the pool."""
        ranks = list(ranks)
        return len(ranks) <= self.max_loras and sum(ranks) <= self.pool_rows

    def activate(self, keys: set[VersionKey], fetch: Callable[[VersionKey], LoraAdapter],
                 protected: AbstractSet[VersionKey] = frozenset()) -> dict[VersionKey, int]:
        """Make every version in ``keys`` resident, fetching weights of missing ones.

        Evicts least recently used versions outside ``keys | protected | pinned``.
        Returns version key -> slot.
        """
        keep = set(keys) | set(protected) | self.pinned
        for key in keys:
            if key in self._slot_of:
                self._slot_of.move_to_end(key)
        missing = [(k, fetch(k)) for k in sorted(keys) if k not in self._slot_of]
        for key, adapter in sorted(missing, key=lambda item: item[1].rank):
            slot = self._take_slot(keep)
            length = self.extent_length(adapter)
            try:
                offset = self._take_rows(length, keep)
            except SlotsExhaustedError:
                self._free_slots.append(slot)
                raise
            self._load(key, adapter, slot, offset, length)
        return {k: self._slot_of[k] for k in keys}

    def _evictable(self, keep: set[VersionKey]) -> VersionKey | None:
        return next((k for k in self._slot_of if k not in keep), None)

    def _take_slot(self, keep: set[VersionKey]) -> int:
        """The lowest free slot, else the LRU evictable version's."""
        if not self._free_slots:
            victim = self._evictable(keep)
            if victim is None:
                raise SlotsExhaustedError(f"all {self.max_loras} LoRA slots hold adapters in use")
            self._drop(victim)
            self.num_evictions += 1
        slot = min(self._free_slots)
        self._free_slots.remove(slot)
        return slot

    def _take_rows(self, rank: int, keep: set[VersionKey]) -> int:
        """The first row of a new extent of ``rank`` rows: evicts LRU versions until enough rows are
        free, compacts when they are free but scattered."""
        while True:
            offset = self.rows.allocate(rank)
            if offset is not None:
                return offset
            if self.rows.can_compact(rank):
                self.compact()
                continue
            victim = self._evictable(keep)
            if victim is None:
                raise SlotsExhaustedError(f"no {rank} free rows in the LoRA pool of {self.pool_rows}: "
                                          f"{self.pool_rows - self.rows.free_rows} hold adapters in use")
            self._drop(victim)
            self.num_evictions += 1

    def compact(self) -> None:
        """Slide every extent down (rows copied in every layer) so the free rows form one extent."""
        slot_at = {offset: slot for slot, (offset, _) in self._extent.items()}
        for src, dst, length in self.rows.compact():
            slot = slot_at[src]
            for layer in self.layers.values():
                layer.move_slot(slot, src, dst, length)
            self._extent[slot] = (dst, length)
        self.num_compactions += 1

    def _load(self, key: VersionKey, adapter: LoraAdapter, slot: int, offset: int, length: int) -> None:
        if self.layout is None:
            for module, layer in self.layers.items():
                layer.set_slot(slot, offset, adapter.modules.get(module))
        else:
            places = self.layout.place(offset, {k: w.rank for k, w in adapter.modules.items()})
            for module, layer in self.layers.items():
                layer.write_slot(slot, *places.get(module, (0, 0)), adapter.modules.get(module))
        self._slot_of[key] = slot
        self._extent[slot] = (offset, length)
        self._used_rows += length
        self.num_loads += 1

    def _drop(self, key: VersionKey) -> None:
        """Forget a resident version: its slot reads rank 0 everywhere, its rows are free."""
        slot = self._slot_of.pop(key)
        offset, length = self._extent.pop(slot)
        self._used_rows -= length
        self.rows.release(offset)
        for layer in self.layers.values():
            layer.set_slot(slot, 0, None)
        self._free_slots.append(slot)

    def evict(self, key: VersionKey) -> None:
        if key in self._slot_of:
            self._drop(key)
        self.pinned.discard(key)
