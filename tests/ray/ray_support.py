"""Helpers of the Ray Serve tests (a module of its own: ``conftest`` is not importable by name)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

from helpers import engine_config
from loraplex_server.config import Config, ServerConfig

DEMO_ADAPTERS = ("upper", "json")  # trained on the default model (tests/assets/adapters)
SYNTHETIC_ADAPTERS = ("syn-a", "syn-b")  # random, strong enough to change greedy outputs
ADAPTERS = DEMO_ADAPTERS + SYNTHETIC_ADAPTERS


def cluster_config(adapter_root: Path, keys_file: Path | None = None, **engine_kwargs) -> Config:
    """Small engines (one torch thread, 64 KV blocks) that every replica and the reference share."""
    engine = engine_config(**{"num_blocks": 64, **engine_kwargs})
    engine = replace(engine, model=replace(engine.model, threads=1),
                     lora=replace(engine.lora, adapter_root=adapter_root))
    return Config(engine=engine, server=ServerConfig(keys_file=keys_file))


def lru_cache(capacity: int):
    """What ``serve.multiplexed`` does for a replica, without Serve: an LRU of loaded adapters whose
    eviction calls the evicted object's ``__del__``."""
    def wrap(load):
        loaded: OrderedDict = OrderedDict()

        async def get(adapter_id: str):
            if adapter_id in loaded:
                loaded.move_to_end(adapter_id)
                return loaded[adapter_id]
            if len(loaded) >= capacity:
                _, evicted = loaded.popitem(last=False)
                evicted.__del__()
            loaded[adapter_id] = await load(adapter_id)
            return loaded[adapter_id]
        return get
    return wrap


class FakeServeContext:
    """The setters of Serve's RayServegRPCContext that the ingress uses."""

    def __init__(self, metadata=()):
        self.code = self.details = None
        self.trailing = []
        self._metadata = list(metadata)

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details

    def set_trailing_metadata(self, metadata):
        self.trailing = metadata

    def invocation_metadata(self):
        return self._metadata
