"""``--adapter-discovery``: register every valid adapter directory under the adapter root, at start
and whenever new ones appear. An adapter's id is its path relative to the root (``acme/sql``), so
a first path component names the owning tenant. Registration reads only config and headers;
weights load on first use. A directory refused at registration (say, its config was copied before
its weights) is tried again once its files change, and warned about once per state."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from ..engine.loop import EngineLoop
from ..errors import LoraplexError
from ..lora.adapter_root import find_adapters
from ..lora.ids import AdapterId
from .access import owner_of

log = logging.getLogger(__name__)


class AdapterDiscovery:
    def __init__(self, loop: EngineLoop, root: Path, interval_s: float = 5.0):
        self.loop, self.root, self.interval_s = loop, Path(root), interval_s
        self._seen: set[str] = set()
        self._refused: dict[str, tuple] = {}  # id -> the files' state when registration failed

    def sweep(self) -> list[AdapterId]:
        """Register directories not seen before; returns the ids registered now."""
        added = []
        for adapter_id, directory in find_adapters(self.root, skip=self._seen).items():
            files = _files_state(directory)
            if self._refused.get(adapter_id) == files:
                continue  # refused before and unchanged since
            if self.loop.has_adapter(adapter_id):
                self._seen.add(adapter_id)
                continue
            try:
                self.loop.add_adapter(adapter_id, directory, eager=False, owner=owner_of(adapter_id))
            except LoraplexError as exc:
                self._refused[adapter_id] = files
                log.warning("discovery skipped %s (tried again when its files change): %s", directory, exc)
                continue
            self._seen.add(adapter_id)
            self._refused.pop(adapter_id, None)
            added.append(adapter_id)
        if added:
            log.info("discovered adapters", extra={"fields": {"adapters": added}})
        return added

    async def run(self) -> None:
        while True:
            await asyncio.to_thread(self.sweep)
            await asyncio.sleep(self.interval_s)


def _files_state(directory: Path) -> tuple:
    """(name, size, mtime) of each file in ``directory``: changes when a copy into it progresses."""
    try:
        return tuple(sorted((p.name, st.st_size, st.st_mtime_ns) for p in directory.iterdir()
                            if p.is_file() for st in (p.stat(),)))
    except OSError:  # vanished meanwhile: the next sweep looks again
        return ()
