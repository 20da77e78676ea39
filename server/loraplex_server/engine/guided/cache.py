"""Compiles each distinct constraint once, off the engine thread, into a bounded LRU cache.

``get`` returns a Future at once (any thread): a cache hit, or a new compile on the worker pool.
A failed compile stays cached too, so a repeated bad constraint is refused without recompiling.
The grammar engine (``GrammarBackend``) is created on first use, in the worker, since reading the
tokenizer's vocabulary takes a fraction of a second.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from ...config import GuidedConfig
from ...errors import InvalidRequestError
from ..request import Constraint
from .backend import GrammarBackend, require_backend


class GrammarCache:
    def __init__(self, config: GuidedConfig, make_backend: Callable[[], GrammarBackend]):
        self.config = config
        self._make_backend = make_backend
        self._backend: GrammarBackend | None = None
        self._entries: OrderedDict[Constraint, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max(1, config.grammar_compile_threads), thread_name_prefix="loraplex-grammar")
        self._compile_seconds: list[float] = []
        self.hits = 0  # cumulative, read by the engine's step stats
        self.misses = 0
        # fault-injection hook (tests): compiles one constraint with the backend
        self.compile_fn: Callable[[GrammarBackend, Constraint], object] = lambda backend, c: backend.compile(c)

    def get(self, constraint: Constraint) -> Future:
        """The compiled grammar of ``constraint`` as a Future (raises at once for refusals known
        without compiling: no grammar engine, constraint over the size limit)."""
        require_backend()
        if constraint.size > self.config.max_constraint_bytes:
            raise InvalidRequestError(constraint.field, f"{constraint.size} bytes exceed the limit of "
                                      f"{self.config.max_constraint_bytes} bytes")
        with self._lock:
            future = self._entries.get(constraint)
            if future is not None:
                self._entries.move_to_end(constraint)
                self.hits += 1
                return future
            self.misses += 1
            future = self._pool.submit(self._compile, constraint)
            self._entries[constraint] = future
            while len(self._entries) > max(1, self.config.grammar_cache_size):
                self._entries.popitem(last=False)  # callers holding the evicted Future keep it
            return future

    def backend(self) -> GrammarBackend:
        with self._lock:
            if self._backend is None:
                self._backend = self._make_backend()
            return self._backend

    def _compile(self, constraint: Constraint):
        backend = self.backend()
        start = time.perf_counter()
        try:
            return backend, self.compile_fn(backend, constraint)
        finally:
            with self._lock:
                self._compile_seconds.append(time.perf_counter() - start)

    def drain_compile_seconds(self) -> tuple[float, ...]:
        """Compile durations since the previous call (for the compile-time histogram)."""
        with self._lock:
            out, self._compile_seconds = tuple(self._compile_seconds), []
            return out

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
