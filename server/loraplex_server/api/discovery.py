"""``--adapter-discovery``: register every valid adapter directory under the adapter root, at start
and whenever new ones appear. An adapter's id is its path relative to the root (``acme/sql``), so
a first path component names the owning tenant. Registration reads only config and headers;
weights load on first use."""

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

    def sweep(self) -> list[AdapterId]:
        """Register directories not seen before; returns the ids registered now."""
        added = []
        for adapter_id, directory in find_adapters(self.root).items():
            if adapter_id in self._seen:
                continue
            self._seen.add(adapter_id)
            if self.loop.has_adapter(adapter_id):
                continue
            try:
                self.loop.add_adapter(adapter_id, directory, eager=False, owner=owner_of(adapter_id))
                added.append(adapter_id)
            except LoraplexError as exc:
                log.warning("discovery skipped %s: %s", directory, exc)
        if added:
            log.info("discovered adapters", extra={"fields": {"adapters": added}})
        return added

    async def run(self) -> None:
        while True:
            await asyncio.to_thread(self.sweep)
            await asyncio.sleep(self.interval_s)
