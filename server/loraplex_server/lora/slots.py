"""Device slots: which adapter occupies which row of the stacked LoRA buffers (LRU, pinning).

A slot held by a running request is never evicted: callers pass those adapters as ``protected``.
Placement keeps equal ranks side by side: new adapters are placed in rank order, each in the free
slot next to a slot of the same rank when there is one, so the batched apply (``ops.sgmv``) covers
neighbouring adapters with one matmul pair.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from .layers import LoraLinear
from .weights import LoraAdapter, ModuleKey


class SlotsExhaustedError(RuntimeError):
    """More distinct adapters requested than there are evictable slots (a scheduler bug)."""


class SlotManager:
    def __init__(self, layers: dict[ModuleKey, LoraLinear], max_loras: int):
        self.layers = layers
        self.max_loras = max_loras
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # adapter id -> slot, LRU first
        self._rank_at: dict[int, int] = {}  # occupied slot -> its adapter's rank
        self._free = list(range(max_loras))
        self.pinned: set[str] = set()
        self.num_loads = 0
        self.num_evictions = 0

    def slot_of(self, adapter_id: str) -> int | None:
        return self._slot_of.get(adapter_id)

    @property
    def resident(self) -> list[str]:
        return list(self._slot_of)

    def activate(self, adapter_ids: set[str], fetch: Callable[[str], LoraAdapter],
                 protected: set[str] = frozenset()) -> dict[str, int]:
        """Make every adapter in ``adapter_ids`` resident, fetching weights of missing ones.

        Evicts least recently used slots outside ``adapter_ids | protected | pinned``.
        Returns adapter id -> slot.
        """
        keep = set(adapter_ids) | set(protected) | self.pinned
        for adapter_id in adapter_ids:
            if adapter_id in self._slot_of:
                self._slot_of.move_to_end(adapter_id)
        missing = [(a, fetch(a)) for a in sorted(adapter_ids) if a not in self._slot_of]
        for adapter_id, adapter in sorted(missing, key=lambda item: item[1].rank):
            self._load(adapter_id, adapter, self._take_slot(keep, adapter.rank))
        return {a: self._slot_of[a] for a in adapter_ids}

    def _take_slot(self, keep: set[str], rank: int) -> int:
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

    def _load(self, adapter_id: str, adapter: LoraAdapter, slot: int) -> None:
        for key, layer in self.layers.items():
            layer.set_slot(slot, adapter.modules.get(key))
        self._slot_of[adapter_id] = slot
        self._rank_at[slot] = adapter.rank
        self.num_loads += 1

    def evict(self, adapter_id: str) -> None:
        slot = self._slot_of.pop(adapter_id, None)
        if slot is not None:
            del self._rank_at[slot]
            for layer in self.layers.values():
                layer.set_slot(slot, None)
            self._free.append(slot)
        self.pinned.discard(adapter_id)
