"""Which adapters a replica can serve (the catalog) and which it holds (Serve's multiplexing decides).

Every replica starts with no adapter. The first request for one on a replica loads it there, from
the catalog: the configured ``adapters`` (``NAME = PATH`` inside the adapter root), else the
directory of that relative path under the adapter root (as ``--adapter-discovery`` names them).
Serve keeps at most ``max_num_models_per_replica`` per replica, LRU; an evicted adapter is
unpublished from the engine once no request on the replica holds it.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import AdapterNotFoundError
from ..lora.adapter_root import adapter_dir

log = logging.getLogger(__name__)


class AdapterCatalog:
    """Adapter id -> source directory; AdapterNotFoundError for ids the cluster cannot serve."""

    def __init__(self, named: tuple[tuple[str, str], ...] = (), root: Path | None = None):
        self.named = dict(named)
        self.root = Path(root) if root is not None else None

    def source_of(self, adapter_id: str) -> str | Path:
        if adapter_id in self.named:
            return self.named[adapter_id]  # the engine resolves it inside the adapter root
        directory = adapter_dir(self.root, adapter_id) if self.root is not None else None
        if directory is None:
            raise AdapterNotFoundError(adapter_id)
        return directory  # the engine refuses a symlink out of the root (AdapterLoadError)


class ReplicaAdapters:
    """The adapters published on one replica's engine, and the requests holding them.

    A request holds its adapter from before the load until it finishes, so an eviction by Serve's
    LRU (another adapter loading) never turns a request that Serve routed here for this adapter
    into NOT_FOUND: the adapter is unpublished when its last holder leaves. Thread-safe (Serve
    calls evictions from a worker thread).
    """

    def __init__(self, unpublish: Callable[[str], None]):
        self._unpublish = unpublish
        self._lock = threading.Lock()
        self._published: set[str] = set()
        self._holders: Counter = Counter()
        self._evicted: set[str] = set()  # evicted while held: unpublished when the last holder leaves

    def published(self) -> list[str]:
        with self._lock:
            return sorted(self._published)

    def added(self, adapter_id: str) -> None:
        with self._lock:
            self._published.add(adapter_id)
            self._evicted.discard(adapter_id)

    def keep(self, adapter_id: str) -> bool:
        """Loaded again before its deferred unpublish: keep it (True), or False if it is gone."""
        with self._lock:
            if adapter_id not in self._published:
                return False
            self._evicted.discard(adapter_id)
            return True

    @contextmanager
    def holding(self, adapter_id: str) -> Iterator[None]:
        if not adapter_id:
            yield
            return
        with self._lock:
            self._holders[adapter_id] += 1
        try:
            yield
        finally:
            self._release(adapter_id)

    def _release(self, adapter_id: str) -> None:
        with self._lock:
            self._holders[adapter_id] -= 1
            if self._holders[adapter_id] > 0:
                return
            del self._holders[adapter_id]
            if adapter_id not in self._evicted:
                return
            self._evicted.discard(adapter_id)
            self._published.discard(adapter_id)
        self._unpublish(adapter_id)

    def evict(self, adapter_id: str) -> None:
        with self._lock:
            if adapter_id not in self._published:
                return
            if self._holders[adapter_id] > 0:
                self._evicted.add(adapter_id)
                return
            self._holders.pop(adapter_id, None)
            self._published.discard(adapter_id)
        self._unpublish(adapter_id)


class LoadedAdapter:
    """What Serve's multiplex cache keeps per adapter. Serve calls ``__del__`` when its LRU evicts it
    (and the garbage collector calls it again later, which does nothing)."""

    def __init__(self, adapter_id: str, adapters: ReplicaAdapters):
        self.adapter_id = adapter_id
        self._adapters = adapters
        self._evicted = False

    def __del__(self) -> None:
        if not self._evicted:
            self._evicted = True
            self._adapters.evict(self.adapter_id)
