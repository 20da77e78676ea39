"""Over gRPC: a request whose step fails alone gets INTERNAL with its request id; the server turns
health NOT_SERVING after ``max_failed_steps`` failing steps in a row."""

from __future__ import annotations

import threading

import pytest

from helpers import ASSETS
from loraplex import Client
from loraplex import errors as cerr


def test_failing_steps_end_the_culprit_internal_then_turn_health_not_serving(start_server, engine_factory):
    broken = threading.Event()

    def factory(cfg):
        engine = engine_factory(cfg)
        run = engine.runner.run

        def faulty(batch, lora_slots):
            if broken.is_set():
                raise RuntimeError("injected device fault")
            return run(batch, lora_slots)
        engine.runner.run = faulty
        return engine
    srv = start_server(ASSETS / "adapters", factory=factory, max_failed_steps=2)
    with Client(srv.target, timeout=60, retries=0) as c:
        assert c.health() == "SERVING"
        broken.set()
        for i in range(2):
            with pytest.raises(cerr.ServerError, match=f"request id r{i}") as info:
                c.generate("hello", max_new_tokens=3, request_id=f"r{i}")
            assert info.value.code.name == "INTERNAL"
        assert c.health() == "NOT_SERVING"
