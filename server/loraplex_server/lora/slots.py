"""Device slots: which adapter version occupies which row of the stacked LoRA buffers (LRU, pinning).

Everything here is keyed by ``VersionKey`` (``id@n``), never by adapter id: two versions of one
adapter (a hot-swap while requests run on the old one) hold two slots.

A slot held by a running request is never evicted: callers pass those adapters as ``protected``.
Placement keeps equal ranks side by side: new adapters are placed in rank order, each in the free
slot next to a slot of the same rank when there is one, so the batched apply (``ops.sgmv``) covers
neighbouring adapters with one matmul pair.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from collections.abc import Set as AbstractSet

from .ids import VersionKey
from .layers import LoraLinear
from .weights import LoraAdapter, ModuleKey


class SlotsExhaustedError(RuntimeError):
    """More distinct adapters requested than there are evictable slots (a scheduler bug)."""


class SlotManager:
    def __init__(self, layers: dict[ModuleKey, LoraLinear], max_loras: int):
        self.layers = layers
        self.max_loras = max_loras
        self._slot_of: OrderedDict[VersionKey, int] = OrderedDict()  # version key -> slot, LRU first
        self._rank_at: dict[int, int] = {}  # occupied slot -> its adapter's rank
        self._free = list(range(max_loras))
        self.pinned: set[VersionKey] = set()
        self.num_loads = 0
        self.num_evictions = 0

    def slot_of(self, key: VersionKey) -> int | None:
        return self._slot_of.get(key)

    @property
    def resident(self) -> list[VersionKey]:
        return list(self._slot_of)

    def activate(self, keys: set[VersionKey], fetch: Callable[[VersionKey], LoraAdapter],
                 protected: AbstractSet[VersionKey] = frozenset()) -> dict[VersionKey, int]:
        """Make every version in ``keys`` resident, fetching weights of missing ones.

        Evicts least recently used slots outside ``keys | protected | pinned``.
        Returns version key -> slot.
        """
        keep = set(keys) | set(protected) | self.pinned
        for key in keys:
            if key in self._slot_of:
                self._slot_of.move_to_end(key)
        missing = [(k, fetch(k)) for k in sorted(keys) if k not in self._slot_of]
        for key, adapter in sorted(missing, key=lambda item: item[1].rank):
            self._load(key, adapter, self._take_slot(keep, adapter.rank))
        return {k: self._slot_of[k] for k in keys}

    def _take_slot(self, keep: set[VersionKey], rank: int) -> int:
        """A free slot (beside one of the same rank if possible), else the LRU evictable one."""
        if self._free:
            slot = max(self._free, key=lambda s: (self._same_rank_neighbours(s, rank), -s))
            self._free.remove(slot)
            return slot
        for victim in self._slot_of:
            if victim not in keep:
                self.num_evictions += 1
                slot = self._slot_of.pop(victim)
                del self._rank_at[slot]
                return slot
        raise SlotsExhaustedError(f"all {self.max_loras} LoRA slots hold adapters in use")

    def _same_rank_neighbours(self, slot: int, rank: int) -> int:
        return sum(self._rank_at.get(n) == rank for n in (slot - 1, slot + 1))

    def _load(self, key: VersionKey, adapter: LoraAdapter, slot: int) -> None:
        for module, layer in self.layers.items():
            layer.set_slot(slot, adapter.modules.get(module))
        self._slot_of[key] = slot
        self._rank_at[slot] = adapter.rank
        self.num_loads += 1

    def evict(self, key: VersionKey) -> None:
        slot = self._slot_of.pop(key, None)
        if slot is not None:
            del self._rank_at[slot]
            for layer in self.layers.values():
                layer.set_slot(slot, None)
            self._free.append(slot)
        self.pinned.discard(key)
