"""A bounded memo of validation results, keyed by the bytes that were validated.

Thousands of adapters from one training pipeline share a weights layout (the safetensors header:
module names, ranks, dtypes and offsets are the same whatever the weights' values) and usually a
config. Validating each distinct one once turns registering 10,000 of them from 8 ms each (pure
Python over ~400 tensor entries) into a read, a digest and a dictionary lookup. Callers key entries
by a 256-bit digest of the validated bytes (a header may be megabytes; the memo stays small), so two
different contents never share an entry. Failures are never stored: a file that fails validation
fails again, with its own adapter id in the message. Results are shared by every adapter with the
same bytes: they are never changed once made.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TypeVar

T = TypeVar("T")


class ContentMemo:
    """LRU of ``capacity`` results; safe to use from several registering threads at once."""

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self._entries: OrderedDict[Hashable, object] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get_or_make(self, key: Hashable, make: Callable[[], T]) -> T:
        """The stored result for ``key``, or ``make()``'s (stored only if it returns)."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return self._entries[key]  # type: ignore[return-value]  # stored by make() for this key
            self.misses += 1
        value = make()  # outside the lock: two threads may both validate a new content once
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._entries)
