"""An in-process Loraplex server on port 0, on its own asyncio loop thread, for the real client."""

from __future__ import annotations

import asyncio
import threading
from contextlib import contextmanager
from dataclasses import replace

import pytest

from helpers import engine_config, fresh_loaded
from loraplex_server.config import Config, ServerConfig
from loraplex_server.engine.engine import LLMEngine
from loraplex_server.api.server import LoraplexServer


class ServerThread:
    def __init__(self, config: Config, engine_factory):
        self.server = LoraplexServer(config, engine_factory)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def run(self, coro, timeout=120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, wait_ready: bool = True) -> "ServerThread":
        self.thread.start()
        self.run(self.server.start())
        if wait_ready:
            self.run(self.server.wait_ready())
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def engine(self) -> LLMEngine:
        return self.server.state.loop.engine

    def stop(self, grace: float = 0) -> None:
        if self.thread.is_alive():
            self.run(self.server.stop(grace))
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


def make_config(adapter_root, adapters=(), server_overrides=None, **engine_kwargs) -> Config:
    engine = engine_config(**engine_kwargs)
    engine = replace(engine, lora=replace(engine.lora, adapter_root=adapter_root))
    server = ServerConfig(host="127.0.0.1", port=0, metrics_port=0, http_port=-1, grace_period_s=5,
                          adapters=tuple(adapters))
    return Config(engine=engine, server=replace(server, **(server_overrides or {})))


def make_engine_factory(model_dir, tokenizer):
    """Config -> engine on a fresh copy of the embedded model."""
    def factory(cfg):
        return LLMEngine(cfg, loaded=fresh_loaded(model_dir, tokenizer))
    return factory


@contextmanager
def server_starter(default_factory):
    """A ``start(...)`` that starts servers on ``default_factory`` (or the one given); all of them
    are stopped on exit."""
    servers = []

    def start(adapter_root, adapters=(), factory=None, wait_ready=True, server_overrides=None, **engine_kwargs):
        config = make_config(adapter_root, adapters, server_overrides, **engine_kwargs)
        srv = ServerThread(config, factory or default_factory)
        servers.append(srv)
        return srv.start(wait_ready)

    yield start
    for srv in servers:
        srv.stop()


@pytest.fixture
def engine_factory(model_dir, tokenizer):
    return make_engine_factory(model_dir, tokenizer)


@pytest.fixture
def start_server(engine_factory):
    with server_starter(engine_factory) as start:
        yield start


@pytest.fixture(scope="module")
def start_module_server(model_dir, tokenizer):
    """``start_server`` for one server shared by several tests of a module: only for tests that
    leave no state behind (refused requests, reads), so that their order does not matter."""
    with server_starter(make_engine_factory(model_dir, tokenizer)) as start:
        yield start
