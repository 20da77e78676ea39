"""The LoRA side of the engine in one object: registry (disk/CPU tiers), device slots, step mapping.

Requests are bound to an ``AdapterVersion``; everything below the registry is keyed by the
version key (``id@n``), so a hot-swap never mixes two versions in one request.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import LoraConfig
from ..errors import AdapterPinError
from ..memory.page_pool import AdapterRuns, PagePool
from .ids import AdapterId, VersionKey
from .layers import LoraStepState
from .mapping import LoraMapping
from .model import find_targets, inject_lora_layers, model_device
from .ops import apply_function
from .page_layout import PageLayout
from .registry import AdapterRegistry, AdapterVersion
from .slots import SlotManager, SlotsExhaustedError
from .weights import AdapterInfo, LoraAdapter

UNCAPPED_SLOTS = 4096  # slots of an uncapped (max_loras 0) unified pool, at most: 12 bytes each per LoRA layer


class WeightsNotInMemoryError(RuntimeError):
    """A version reached ``activate`` without its weights in memory (the engine never reads disk)."""


@dataclass(frozen=True)
class SharedPool:
    """The unified memory pool as the LoRA side sees it: every model layer's K and V arenas (flat
    views of its KV cache: A blocks go in K, Bt blocks in V), ``page_elems`` elements of each per
    page, who holds which page, and the KV side's cached blocks no request holds (``cached_pages``,
    ``reclaim``: an adapter run may take them)."""

    arenas: list[tuple[torch.Tensor, torch.Tensor]]
    page_elems: int
    page_bytes: int
    pool: PagePool
    cached_pages: Callable[[], Iterable[int]]
    reclaim: Callable[[list[int]], None]


class LoraManager:
    def __init__(self, model: nn.Module, config: LoraConfig, load_fn: Callable | None = None, native_kernels=None,
                 shared: SharedPool | None = None):
        """``native_kernels``: the model's native CPU kernel library (model/native.py), or None;
        ``shared``: the unified memory pool, where adapter weights are paged beside KV blocks
        (else each LoRA layer keeps a row pool of ``lora_pool_rows`` rows)."""
        self.config = config
        # Triton on CUDA, the native kernel on CPU when built, else torch
        self.state = LoraStepState(apply_function(model_device(model), native_kernels))
        self.targets = find_targets(model)
        self.shared = shared
        if shared is None:
            self.layers = inject_lora_layers(model, config.max_loras, config.max_lora_rank, self.state,
                                             config.resolved_pool_rows)
            # a rank above the pool's rows could never be resident: refused at load, like one above max_lora_rank
            self.max_rank = min(config.max_lora_rank, config.resolved_pool_rows)
            self.slots = SlotManager(self.layers, config.max_loras)
        else:
            # max_loras 0: as many slots as resident versions the pool could hold (one page each, capped)
            slots = config.max_loras or min(shared.pool.num_pages, UNCAPPED_SLOTS)
            self.layers = inject_lora_layers(model, slots, config.max_lora_rank, self.state,
                                             buffers_of=lambda key: shared.arenas[key.layer])
            self.max_rank = config.max_lora_rank
            self.slots = self._paged_slots(shared, slots)
        self.registry = AdapterRegistry(self.targets, self.max_rank, config.max_cpu_loras,
                                        config.adapter_root, config.max_adapter_bytes, load_fn=load_fn)
        self._step_keys: set[VersionKey] = set()  # placed or used this step: KV pressure cannot evict them
        self.request_counts: dict[AdapterId, int] = {}
        self.pinned_ids: set[AdapterId] = set()
        # weights that ``ready`` found in the CPU cache, held until ``activate`` puts them in slots:
        # an eviction from the cache in between cannot make the engine thread read from disk
        self._held: dict[VersionKey, LoraAdapter] = {}

    def _paged_slots(self, shared: SharedPool, num_slots: int) -> SlotManager:
        """Slots over runs of the unified pool (whether the pool can serve these settings at all is
        decided before it is built: ``engine/memory_plan.py``)."""
        layout = PageLayout({k: (la.in_features, la.out_features) for k, la in self.layers.items()},
                            shared.page_elems)
        return SlotManager(self.layers, num_slots, AdapterRuns(shared.pool, shared.cached_pages, shared.reclaim),
                           layout, shared.page_bytes)

    # ---- registration (any thread) ----------------------------------------------------------
    def add_adapter(self, adapter_id: AdapterId, source: str | Path, *, eager: bool = True,
                    owner: str | None = None, version: int | None = None) -> AdapterVersion:
        """Validate and publish a version (eager: weights read and checked before publishing)."""
        return self.registry.register(adapter_id, source, eager=eager, owner=owner, version=version)

    def has_adapter(self, adapter_id: AdapterId) -> bool:
        return adapter_id in self.registry

    def resolve(self, adapter_id: AdapterId) -> AdapterVersion:
        return self.registry.current(adapter_id)

    def acquire(self, adapter_id: AdapterId) -> AdapterVersion:
        """Bind a new request to the current version (any thread); ``release_request`` undoes it."""
        return self.registry.acquire(adapter_id)

    def release_request(self, key: VersionKey) -> None:
        self.registry.release(key)

    def in_use(self, key: VersionKey) -> bool:
        return self.registry.in_use(key)

    def count_request(self, adapter_id: AdapterId) -> None:
        self.request_counts[adapter_id] = self.request_counts.get(adapter_id, 0) + 1

    # ---- engine thread ----------------------------------------------------------------------
    def remove_adapter(self, adapter_id: AdapterId) -> AdapterVersion:
        version = self.registry.unpublish(adapter_id)
        self.pinned_ids.discard(adapter_id)
        self.request_counts.pop(adapter_id, None)
        return version

    def ready(self, key: VersionKey) -> bool:
        """Weights are on the device or in the CPU cache. Starts nothing: loads are the prefetcher's
        (``prefetch``, for a bounded window of the queue), so asking about a long queue cannot
        start more loads than the CPU cache holds and thrash it. Holds the cached weights it saw
        until the next ``activate``."""
        if self.slots.slot_of(key) is not None:
            return True
        weights = self.registry.cached(key)
        if weights is not None:
            self._held[key] = weights
        return weights is not None

    def prefetch(self, key: VersionKey) -> None:
        """A queued request will need this version soon: start its load, or keep its cached weights
        from being the next CPU-cache eviction."""
        if self.slots.slot_of(key) is None and not self.registry.touch(key):
            self.registry.ensure_loading(key)

    def begin_step(self) -> None:
        """Drop weights held by the previous step's ``ready`` calls that ``activate`` did not take."""
        self._held.clear()
        self._step_keys.clear()

    def failure(self, key: VersionKey) -> str | None:
        return self.registry.failure(key)

    def rank_of(self, key: VersionKey) -> int:
        """Rows (pages, on the unified pool) a version holds when resident: its largest module rank,
        or its pages; for one not resident, the most a version of its rank can hold."""
        extent = self.slots.rows_of(key)
        return extent[1] if extent is not None else self._units_for_rank(self.registry.version(key).meta.rank)

    @property
    def max_pinned_rows(self) -> int:
        """Rows (pages) pinned adapters may hold together: in a row pool all but room for the largest
        rank; in the unified pool a quarter of it (with the largest adapter, at most half, a request
        of ``kv_capacity_pages`` always finds room)."""
        if self.shared is None:
            return self.slots.pool_rows - self._units_for_rank(self.max_rank)
        return self.slots.pool_rows // 4

    def kv_capacity_pages(self, num_blocks: int) -> int:
        """KV blocks one request may need: all of them with a separate pool; in the unified pool what
        remains beside the largest adapter and the most that may be pinned."""
        if self.shared is None:
            return num_blocks
        return num_blocks - self._units_for_rank(self.max_rank) - self.max_pinned_rows

    def _units_for_rank(self, rank: int) -> int:
        layout = self.slots.layout
        return rank if layout is None else layout.pages_for_rank(rank)

    def fits(self, keys: set[VersionKey]) -> bool:
        """Whether these versions can be resident together (the scheduler's LoRA check). On the
        unified pool the answer depends on where KV blocks sit, so the versions whose weights are in
        memory are made resident now (evicting idle ones, reclaiming cached KV blocks): True means
        they are, and KV pressure leaves them alone for the rest of the step."""
        if self.shared is None:
            return self.slots.fits(self.rank_of(k) for k in keys)
        if len(keys) > self.slots.max_loras:
            return False
        missing = {k for k in keys if self.slots.slot_of(k) is None}
        if not all(self.ready(k) for k in missing):
            return True  # still loading: the scheduler's readiness check keeps the request waiting
        try:
            self.slots.activate(missing, self._weights_in_memory, keys)
        except SlotsExhaustedError:
            return False
        self._step_keys |= keys
        return True

    def idle_pages(self, busy: set[VersionKey]) -> int:
        """Pages of resident versions that no request in ``busy``, pin or this step holds."""
        return self.slots.idle_rows(busy | self._step_keys)

    def evict_idle(self, busy: set[VersionKey]) -> bool:
        """Evict the least recently used version outside ``busy``, the pinned and this step's."""
        return self.slots.evict_lru(busy | self._step_keys)

    def pack_order(self, slot: int) -> int:
        """Where a slot's rows start in the pool (-1 without a slot): the runner packs sequences in
        this order, so equal-rank neighbours in the pool are neighbouring segments (one matmul pair)."""
        return self.slots.offset_of_slot(slot) if slot >= 0 else -1

    def reserved_keys(self) -> set[VersionKey]:
        """Version keys of pinned adapters: they hold device slots while idle."""
        return {self.registry.current(a).key for a in self.pinned_ids if a in self.registry}

    def pin(self, adapter_id: AdapterId, protected: set[VersionKey]) -> None:
        """Keep an adapter in a device slot for good; at least one slot always stays unpinned.
        All or nothing: on AdapterPinError the adapter is not pinned."""
        key = self.registry.current(adapter_id).key
        newly = adapter_id not in self.pinned_ids
        if newly and len(self.pinned_ids) + 1 >= self.slots.max_loras:
            raise AdapterPinError(f"cannot pin {adapter_id!r}: {len(self.pinned_ids)} of {self.slots.max_loras} "
                                  "device slots are pinned and one must stay free")
        pinned_rows = sum(self.rank_of(k) for k in self.reserved_keys() | {key})
        if newly and pinned_rows > self.max_pinned_rows:
            held = f"cannot pin {adapter_id!r}: pinned adapters would hold {pinned_rows} of the {self.slots.pool_rows}"
            raise AdapterPinError(f"{held} LoRA pool rows, and {self.max_rank} must stay free" if self.shared is None
                                  else f"{held} pages of the unified memory pool, more than the quarter "
                                       f"({self.max_pinned_rows}) they may")
        self.pinned_ids.add(adapter_id)
        try:
            self.activate({key}, protected)
        except (SlotsExhaustedError, WeightsNotInMemoryError) as exc:
            if newly:
                self.pinned_ids.discard(adapter_id)
                self.slots.pinned = self.reserved_keys()
            raise AdapterPinError(f"cannot pin {adapter_id!r} now: {exc}") from exc

    def activate(self, keys: set[VersionKey], protected: set[VersionKey]) -> dict[VersionKey, int]:
        """Make the step's adapter versions resident in device slots; returns key -> slot.
        Weights come from memory only (held by ``ready``, or the CPU cache), never from disk."""
        self.slots.pinned = self.reserved_keys()
        self._step_keys |= keys
        now = time.time()
        for key in keys:
            self.registry.version(key).last_used = now
        try:
            return self.slots.activate(keys, self._weights_in_memory, protected)
        finally:
            self._held.clear()

    def _weights_in_memory(self, key: VersionKey) -> LoraAdapter:
        weights = self._held.get(key) or self.registry.cached(key)
        if weights is None:
            raise WeightsNotInMemoryError(f"the weights of {key} are not in memory (still loading or evicted)")
        return weights

    def free_version(self, key: VersionKey) -> None:
        """A retired version no request uses any more: free its slot and forget it."""
        self.slots.evict(key)
        self.registry.forget(key)

    def close(self) -> None:
        """End the registry's loader threads (at shutdown; nothing loads afterwards)."""
        self.registry.close()

    def set_mapping(self, mapping: LoraMapping | None) -> None:
        self.state.mapping = mapping

    def info(self, adapter_ids: Iterable[str] | None = None) -> list[AdapterInfo]:
        """Every published adapter (or those of ``adapter_ids`` that are) with its tier (call on the
        engine thread)."""
        out = []
        wanted = self.registry.adapter_ids if adapter_ids is None else [AdapterId(a) for a in sorted(adapter_ids)]
        for adapter_id in wanted:
            if adapter_id not in self.registry:
                continue
            v = self.registry.current(adapter_id)
            load = self.registry.load_state(v.key)
            out.append(AdapterInfo(v.meta, self._tier(v.key), adapter_id in self.pinned_ids,
                                   self.request_counts.get(adapter_id, 0), v.version, v.last_used,
                                   v.load_latency_s, v.owner, self.registry.failure(v.key) or load.last_error,
                                   load.attempts, load.retrying, v.fingerprint))
        return out

    def _tier(self, key: VersionKey) -> str:
        if self.slots.slot_of(key) is not None:
            return "device"
        if self.registry.ready(key):
            return "cpu"
        return "loading" if self.registry.is_loading(key) else "disk"
