"""The two names of an adapter, as distinct types.

An ``AdapterId`` is what users name (``upper``, ``acme/sql``): requests, LoadAdapter, the adapter
list, tenancy and metrics speak ids. Each publish under an id is a new version, and its
``VersionKey`` (``acme/sql@3``) is what everything below the registry holds: device slots, the CPU
cache, the scheduler's distinct-adapter cap, a request's binding, the prefix cache's hash seeds. A
hot-swap changes the key, never the id, so the two must not be mixed up: keys never reach users,
ids never pick a slot.
"""

from __future__ import annotations

from typing import NewType

AdapterId = NewType("AdapterId", str)
VersionKey = NewType("VersionKey", str)


def version_key(adapter_id: AdapterId, version: int) -> VersionKey:
    return VersionKey(f"{adapter_id}@{version}")
