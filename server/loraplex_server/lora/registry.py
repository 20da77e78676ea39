"""Adapter registry: the disk and CPU tiers of the adapter lifecycle.

- Registration is cheap: config and safetensors header are validated (no tensor data read) and an
  immutable ``AdapterVersion`` is published under the adapter id. Publishing a new version under an
  existing id is a hot-swap: requests keep the version they were bound to.
- Weights are read lazily by a background loader (never on the engine thread) into a host-memory
  LRU cache of at most ``max_cpu_loras`` adapters; ``ensure_loading`` starts a load (prefetch),
  ``ready``/``failure`` report on it.
- A transient read error (``AdapterSourceUnavailableError``, any ``OSError``) is retried with
  bounded exponential backoff; a validation failure is not. ``load_state`` reports attempts, the
  last error and whether a retry is pending.
- A version is the bytes read at registration (its ``Fingerprint``). A later read of the same
  version (after a CPU-cache eviction) whose bytes differ is refused: the source changed without a
  LoadAdapter, and serving it would mix contents under one version. A lazy registration reads only
  the config and the safetensors header, so its fingerprint has no sha256 yet, only the files'
  identity (size, mtime, inode of each; the config and header bytes): the first full read is
  refused if that identity changed, and its sha256 becomes the version's for every later read.
- What a registered version costs in host memory is its ``AdapterVersion`` (a few hundred bytes:
  meta, fingerprint, source path); nothing of the files is kept until its weights load.
- Every request holds a reference on its version from ``acquire`` (when it is made, on any thread)
  to ``release`` (when it ends); a retired version is forgotten only once nothing references it.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ..errors import AdapterLoadError, AdapterNotFoundError, AdapterSourceUnavailableError
from .adapter_files import same_source
from .content_memo import ContentMemo
from .ids import AdapterId, VersionKey, version_key
from .loader import DEFAULT_MAX_ADAPTER_BYTES, inspect_adapter, load_adapter
from .weights import AdapterMeta, Fingerprint, LoraAdapter, ModuleKey, TargetShape

log = logging.getLogger(__name__)
LoadFn = Callable[[str, Path, dict, int, int], LoraAdapter]
T = TypeVar("T")


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


@dataclass(frozen=True)
class RetryPolicy:
    """Reads of one load: ``attempts`` in all, waiting ``base_delay_s * 2**(n-1)`` (capped) after the n-th."""

    attempts: int = 3
    base_delay_s: float = 0.2
    max_delay_s: float = 5.0

    def delay(self, attempt: int) -> float:
        return min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))


@dataclass
class LoadState:
    attempts: int = 0
    retrying: bool = False
    last_error: str | None = None


def meta_of(adapter: LoraAdapter, source: Path) -> AdapterMeta:
    size = sum(4 * (m.a.numel() + m.bt.numel()) for m in adapter.modules.values())  # fp32 resident bytes
    return AdapterMeta(adapter.adapter_id, source, adapter.rank, adapter.target_modules, size)


@dataclass(eq=False, slots=True)
class AdapterVersion:
    """One published version of an adapter; requests are bound to it for their whole life."""

    meta: AdapterMeta
    version: int
    owner: str | None = None  # tenant owning it; None = public
    last_used: float | None = None
    load_latency_s: float | None = None  # disk -> CPU, once loaded
    fingerprint: Fingerprint | None = None  # the bytes read at registration

    @property
    def adapter_id(self) -> AdapterId:
        return AdapterId(self.meta.adapter_id)

    @property
    def key(self) -> VersionKey:
        """Unique per version: what device slots and the CPU cache are keyed by."""
        return version_key(self.adapter_id, self.version)


def _check_same_bytes(version: AdapterVersion, weights: LoraAdapter) -> None:
    """Refuse a re-read whose bytes are not the ones this version was registered with."""
    old, new = version.fingerprint, weights.fingerprint
    if old is not None and new is not None and not same_source(old, new):
        raise AdapterLoadError(version.adapter_id, f"the source {version.meta.source} changed since LoadAdapter "
                                                   f"({_change(old, new)}); call LoadAdapter again to serve the "
                                                   "new files")


def _change(old: Fingerprint, new: Fingerprint) -> str:
    if old.sha256 is not None and new.sha256 is not None:
        return f"sha256 {old.sha256[:12]} -> {new.sha256[:12]}"
    if (old.size_bytes, old.mtime) != (new.size_bytes, new.mtime):
        return f"{old.size_bytes} -> {new.size_bytes} bytes, mtime {old.mtime:.3f} -> {new.mtime:.3f}"
    return "another file, config or header of the same size and mtime"


class AdapterRegistry:
    def __init__(self, targets: dict[ModuleKey, TargetShape], max_rank: int, max_cpu_loras: int,
                 adapter_root: Path | None = None, max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
                 load_fn: LoadFn | None = None, load_workers: int = 2, retry: RetryPolicy = RetryPolicy(),
                 sleep: Callable[[float], None] = time.sleep):
        self.targets = targets
        self.max_rank = max_rank
        self.validated = ContentMemo()  # headers and configs validated for these targets and max rank
        self.max_cpu_loras = max(1, max_cpu_loras)
        self.adapter_root = adapter_root
        self.max_adapter_bytes = max_adapter_bytes
        self._load_fn = load_fn or functools.partial(load_adapter, memo=self.validated)
        self.retry = retry
        self._sleep = sleep
        self._load_states: dict[VersionKey, LoadState] = {}  # version key -> its background load
        self._executor = ThreadPoolExecutor(max_workers=load_workers, thread_name_prefix="loraplex-adapter-load")
        self._current: dict[AdapterId, AdapterVersion] = {}
        self._versions: dict[VersionKey, AdapterVersion] = {}  # every version still known
        self._cpu: OrderedDict[VersionKey, LoraAdapter] = OrderedDict()  # weights, LRU first
        self._loading: dict[VersionKey, Future] = {}
        self._failed: dict[VersionKey, str] = {}
        self._refs: dict[VersionKey, int] = {}  # requests bound to each version
        self._lock = threading.Lock()
        self._next_version = 1
        self.num_cpu_loads = 0
        self.num_cpu_evictions = 0

    # ---- publishing ------------------------------------------------------------------------
    def __contains__(self, adapter_id: object) -> bool:
        return adapter_id in self._current

    @property
    def adapter_ids(self) -> list[AdapterId]:
        return sorted(self._current)

    @property
    def num_registered(self) -> int:
        return len(self._current)

    def current(self, adapter_id: AdapterId) -> AdapterVersion:
        try:
            return self._current[adapter_id]
        except KeyError:
            raise AdapterNotFoundError(adapter_id) from None

    def version(self, key: VersionKey) -> AdapterVersion:
        return self._versions[key]

    def acquire(self, adapter_id: AdapterId) -> AdapterVersion:
        """The current version, with one more request reference on it (atomic with unpublishing)."""
        with self._lock:
            version = self.current(adapter_id)
            self._refs[version.key] = self._refs.get(version.key, 0) + 1
        return version

    def release(self, key: VersionKey) -> None:
        """Give back one request reference taken by ``acquire``."""
        with self._lock:
            count = self._refs.get(key, 0) - 1
            if count > 0:
                self._refs[key] = count
            else:
                self._refs.pop(key, None)

    def in_use(self, key: VersionKey) -> bool:
        """Some request still references this version."""
        return key in self._refs

    def register(self, adapter_id: AdapterId, source: str | Path, *, eager: bool = False,
                 owner: str | None = None, version: int | None = None) -> AdapterVersion:
        """Validate and publish a new version (raises AdapterLoadError and changes nothing on failure).

        ``eager`` reads and checks all weights first (so NaN/Inf are refused before publishing).
        Transient read errors are retried (``retry``); the last one is raised. ``version``: the
        number to publish under (a restored registration), default the next one.
        """
        if not adapter_id:
            raise AdapterLoadError(adapter_id, "adapter id must be non-empty")
        path = resolve_source(self.adapter_root, source)
        if eager:
            weights = self._load_with_retry(adapter_id, path)
            meta, fingerprint = meta_of(weights[0], path), weights[0].fingerprint
        else:
            plan = self._with_retry(adapter_id, lambda: inspect_adapter(
                adapter_id, path, self.targets, self.max_rank, self.max_adapter_bytes, memo=self.validated))
            weights, meta, fingerprint = None, plan.meta, plan.fingerprint
        with self._lock:
            number = version if version is not None else self._next_version  # restored: keep its number
            registered = AdapterVersion(meta, number, owner, fingerprint=fingerprint)
            self._next_version = max(self._next_version, number) + 1
            self._current[adapter_id] = registered
            self._versions[registered.key] = registered
            if weights is not None:
                registered.load_latency_s = weights[1]
                self._put_cpu(registered.key, weights[0])
        return registered

    def unpublish(self, adapter_id: AdapterId) -> AdapterVersion:
        """New requests get NOT_FOUND; requests bound to the version keep it."""
        with self._lock:
            version = self._current.pop(adapter_id, None)
        if version is None:
            raise AdapterNotFoundError(adapter_id)
        return version

    def forget(self, key: VersionKey) -> None:
        """Drop a retired version nobody uses any more (its CPU weights too)."""
        with self._lock:
            version = self._versions.get(key)
            if (version is not None and self._current.get(version.adapter_id) is not version
                    and key not in self._refs):
                self._versions.pop(key, None)
                self._cpu.pop(key, None)
                self._failed.pop(key, None)
                self._load_states.pop(key, None)

    # ---- the CPU tier ----------------------------------------------------------------------
    def ready(self, key: VersionKey) -> bool:
        """The version's weights are in the CPU cache."""
        return key in self._cpu

    def touch(self, key: VersionKey) -> bool:
        """Mark cached weights most recently used; False if they are not cached."""
        with self._lock:
            if key not in self._cpu:
                return False
            self._cpu.move_to_end(key)
            return True

    def failure(self, key: VersionKey) -> str | None:
        return self._failed.get(key)

    def load_state(self, key: VersionKey) -> LoadState:
        """Attempts, last error and retry state of the version's latest background load."""
        with self._lock:
            state = self._load_states.get(key)
            return LoadState(state.attempts, state.retrying, state.last_error) if state else LoadState()

    def ensure_loading(self, key: VersionKey) -> None:
        """Start a background load of a version's weights unless cached, loading or failed."""
        with self._lock:
            if key in self._cpu or key in self._loading or key in self._failed:
                return
            version = self._versions[key]
            self._loading[key] = self._executor.submit(self._load_version, version)

    def _timed_load(self, adapter_id: AdapterId, path: Path) -> tuple[LoraAdapter, float]:
        start = time.perf_counter()
        weights = self._load_fn(adapter_id, path, self.targets, self.max_rank, self.max_adapter_bytes)
        return weights, time.perf_counter() - start

    def _with_retry(self, adapter_id: AdapterId, read: Callable[[], T], state: LoadState | None = None) -> T:
        """``read()``, retried on transient errors with backoff; validation errors pass through at once."""
        for attempt in range(1, self.retry.attempts + 1):
            if state is not None:
                with self._lock:
                    state.attempts = attempt
            try:
                return read()
            except AdapterSourceUnavailableError as exc:
                error = exc
            except AdapterLoadError:
                raise
            except OSError as exc:
                error = AdapterSourceUnavailableError(adapter_id, f"reading failed: {type(exc).__name__}: {exc}")
            last = attempt == self.retry.attempts
            log.warning("adapter %s: %s (attempt %d of %d%s)", adapter_id, error.reason, attempt,
                        self.retry.attempts, "" if last else ", retrying")
            if state is not None:
                with self._lock:
                    state.attempts, state.retrying, state.last_error = attempt, not last, error.reason
            if last:
                raise error
            self._sleep(self.retry.delay(attempt))
        raise AssertionError("unreachable")

    def _load_with_retry(self, adapter_id: AdapterId, path: Path, state: LoadState | None = None):
        return self._with_retry(adapter_id, lambda: self._timed_load(adapter_id, path), state)

    def _load_version(self, version: AdapterVersion) -> None:
        state = LoadState()
        with self._lock:
            self._load_states[version.key] = state
        try:
            weights, latency = self._load_with_retry(version.adapter_id, version.meta.source, state)
            _check_same_bytes(version, weights)
        except Exception as exc:  # noqa: BLE001 - reported to the requests that wait for it
            message = exc.reason if isinstance(exc, AdapterLoadError) else f"{type(exc).__name__}: {exc}"
            log.warning("adapter %s failed to load: %s", version.key, message)
            with self._lock:
                state.attempts, state.retrying, state.last_error = max(state.attempts, 1), False, message
                self._failed[version.key] = message
                self._loading.pop(version.key, None)
            return
        with self._lock:
            version.load_latency_s = latency
            if version.fingerprint is None or version.fingerprint.sha256 is None:
                version.fingerprint = weights.fingerprint  # first full read of a lazy registration
            state.retrying = False
            self._put_cpu(version.key, weights)
            self._loading.pop(version.key, None)

    def cached(self, key: VersionKey) -> LoraAdapter | None:
        """The version's weights if the CPU cache holds them (marked most recently used), else None.
        Never reads from disk: the engine thread calls this."""
        with self._lock:
            weights = self._cpu.get(key)
            if weights is not None:
                self._cpu.move_to_end(key)
            return weights

    def is_loading(self, key: VersionKey) -> bool:
        return key in self._loading

    @property
    def num_in_cpu_cache(self) -> int:
        return len(self._cpu)

    def _put_cpu(self, key: VersionKey, weights: LoraAdapter) -> None:
        self._cpu[key] = weights
        self._cpu.move_to_end(key)
        self.num_cpu_loads += 1
        while len(self._cpu) > self.max_cpu_loras:
            self._cpu.popitem(last=False)
            self.num_cpu_evictions += 1

    def close(self) -> None:
        """End the loader threads: queued loads are cancelled, a load under way finishes first."""
        self._executor.shutdown(wait=False, cancel_futures=True)
