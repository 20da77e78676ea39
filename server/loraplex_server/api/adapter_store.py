"""Adapters registered through LoadAdapter, persisted in SQLite so they survive a restart.

One row per adapter id: source, version, pinned, owner. Every change is one transaction in WAL
mode, so a process killed at any moment (``kill -9`` in the middle of a LoadAdapter) leaves the
previous or the new row, never a broken database. The server writes a row only after the engine
accepted the adapter, removes it on UnloadAdapter, and restores every row at start-up before
health turns SERVING.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import LoraplexError
from ..lora.ids import AdapterId

log = logging.getLogger(__name__)
DB_FILE = "adapters.sqlite3"
_SCHEMA = """CREATE TABLE IF NOT EXISTS adapters (
    adapter_id TEXT PRIMARY KEY,
    source     TEXT NOT NULL,
    version    INTEGER NOT NULL,
    pinned     INTEGER NOT NULL,
    owner      TEXT,
    updated    REAL NOT NULL
)"""


@dataclass(frozen=True)
class StoredAdapter:
    adapter_id: AdapterId
    source: str
    version: int
    pinned: bool
    owner: str | None


class AdapterStore:
    """Thread-safe; one connection guarded by a lock (writes are rare: admin RPCs)."""

    def __init__(self, state_dir: Path):
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / DB_FILE
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed LoadAdapter survives power loss too
        self._db.execute(_SCHEMA)

    def put(self, entry: StoredAdapter) -> None:
        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO adapters VALUES (?, ?, ?, ?, ?, ?)",
                             (entry.adapter_id, entry.source, entry.version, int(entry.pinned), entry.owner,
                              time.time()))

    def remove(self, adapter_id: str) -> None:
        with self._lock, self._db:
            self._db.execute("DELETE FROM adapters WHERE adapter_id = ?", (adapter_id,))

    def all(self) -> list[StoredAdapter]:
        """Every row, oldest version first (the order they were registered in)."""
        with self._lock:
            rows = self._db.execute("SELECT adapter_id, source, version, pinned, owner FROM adapters "
                                    "ORDER BY version, adapter_id").fetchall()
        return [StoredAdapter(AdapterId(a), s, v, bool(p), o) for a, s, v, p, o in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def restore_adapters(loop, store: AdapterStore) -> dict[str, tuple[StoredAdapter, str]]:
    """Register every stored adapter on ``loop`` (an EngineLoop) with its version, pin and owner.

    Registration is lazy (config and header validated, weights read at first use), as discovery's,
    so that thousands of stored adapters do not hold health at NOT_SERVING while every weights file
    is read and hashed; pinned ones are read now (a pin holds a device slot). An entry that cannot
    be restored (its source is gone, or no longer valid) is kept in the database and returned with
    its error, for ListAdapters to show; nothing is silently dropped."""
    failures: dict[str, tuple[StoredAdapter, str]] = {}
    for entry in store.all():
        try:
            loop.add_adapter(entry.adapter_id, entry.source, eager=entry.pinned, owner=entry.owner,
                             version=entry.version)
            if entry.pinned:
                loop.pin_adapter(entry.adapter_id).result()
        except LoraplexError as exc:
            log.warning("stored adapter %s (%s) not restored: %s", entry.adapter_id, entry.source, exc)
            failures[entry.adapter_id] = (entry, str(exc))
    log.info("restored %d of %d stored adapters", len(store.all()) - len(failures), len(store.all()))
    return failures
