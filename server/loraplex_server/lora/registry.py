"""Adapter registry: adapter id -> source directory, with a host-memory LRU of loaded weights.

``add`` validates an adapter fully before publishing it. Weights evicted from the CPU cache are
read again from their source on the next use.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

from ..errors import AdapterLoadError, AdapterNotFoundError
from .loader import load_adapter
from .weights import AdapterMeta, LoraAdapter, ModuleKey, TargetShape


def resolve_source(root: Path | None, source: str | Path) -> Path:
    """Resolve an adapter source; with a root, it must stay inside it (no ``..`` or symlinks out)."""
    path = Path(source).expanduser()
    if root is None:
        return path.resolve()
    root = Path(root).resolve()
    candidate = (path if path.is_absolute() else root / path).resolve()
    if candidate != root and root not in candidate.parents:
        raise AdapterLoadError(str(source), f"source {str(source)!r} resolves outside the adapter root")
    return candidate


class AdapterRegistry:
    def __init__(self, targets: dict[ModuleKey, TargetShape], max_rank: int, max_cpu_loras: int,
                 adapter_root: Path | None = None):
        self.targets = targets
        self.max_rank = max_rank
        self.max_cpu_loras = max(1, max_cpu_loras)
        self.adapter_root = adapter_root
        self._meta: dict[str, AdapterMeta] = {}
        self._cpu: OrderedDict[str, LoraAdapter] = OrderedDict()
        self._lock = threading.Lock()
        self.num_cpu_loads = 0
        self.num_cpu_evictions = 0

    def __contains__(self, adapter_id: str) -> bool:
        return adapter_id in self._meta

    @property
    def adapter_ids(self) -> list[str]:
        return sorted(self._meta)

    def meta(self, adapter_id: str) -> AdapterMeta:
        try:
            return self._meta[adapter_id]
        except KeyError:
            raise AdapterNotFoundError(adapter_id) from None

    def add(self, adapter_id: str, source: str | Path) -> LoraAdapter:
        """Validate and register; raises AdapterLoadError and changes nothing on failure."""
        if not adapter_id:
            raise AdapterLoadError(adapter_id, "adapter id must be non-empty")
        path = resolve_source(self.adapter_root, source)
        adapter = load_adapter(adapter_id, path, self.targets, self.max_rank)
        with self._lock:
            self._meta[adapter_id] = AdapterMeta.of(adapter)
            self._put_cpu(adapter)
        return adapter

    def remove(self, adapter_id: str) -> None:
        with self._lock:
            if self._meta.pop(adapter_id, None) is None:
                raise AdapterNotFoundError(adapter_id)
            self._cpu.pop(adapter_id, None)

    def get(self, adapter_id: str) -> LoraAdapter:
        """The adapter's weights, from the CPU cache or read again from its source."""
        with self._lock:
            if adapter_id not in self._meta:
                raise AdapterNotFoundError(adapter_id)
            if adapter_id in self._cpu:
                self._cpu.move_to_end(adapter_id)
                return self._cpu[adapter_id]
            path = self._meta[adapter_id].source
        adapter = load_adapter(adapter_id, path, self.targets, self.max_rank)
        with self._lock:
            self._put_cpu(adapter)
        return adapter

    @property
    def num_in_cpu_cache(self) -> int:
        return len(self._cpu)

    def in_cpu_cache(self, adapter_id: str) -> bool:
        return adapter_id in self._cpu

    def _put_cpu(self, adapter: LoraAdapter) -> None:
        self._cpu[adapter.adapter_id] = adapter
        self._cpu.move_to_end(adapter.adapter_id)
        self.num_cpu_loads += 1
        while len(self._cpu) > self.max_cpu_loras:
            self._cpu.popitem(last=False)
            self.num_cpu_evictions += 1
