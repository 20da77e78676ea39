"""One replica's service without Ray: the regular servicer behind it, adapters loaded on a cache miss,
failures returned as statuses, evictions that wait for the requests holding an adapter."""

from __future__ import annotations

import asyncio
import time

import pytest
from helpers import fresh_loaded, key_entry
from loraplex._request import build_generate_request
from loraplex.v1 import loraplex_pb2 as pb
from loraplex_server.engine.engine import LLMEngine
from loraplex_server.ray_serve.service import ReplicaService
from loraplex_server.ray_serve.status import ReplicaStatusError
from ray_support import cluster_config, lru_cache

ADMIN = (("authorization", "Bearer admin-key"),)
TENANT = (("authorization", "Bearer acme-key"),)


def _keys_file(path):
    rows = [("admin-key", "ops", "admin"), ("acme-key", "acme", "tenant")]
    path.write_text("".join(key_entry(key, tenant, role) for key, tenant, role in rows))
    return path


def _engine_factory(model_dir, tokenizer):
    def build(engine_config):
        return LLMEngine(engine_config, loaded=fresh_loaded(model_dir, tokenizer))
    return build


@pytest.fixture(scope="module")
def service(adapter_root, model_dir, tokenizer, tmp_path_factory):
    """One adapter per replica (capacity 1), so every other adapter evicts the previous one."""
    config = cluster_config(adapter_root, keys_file=_keys_file(tmp_path_factory.mktemp("keys") / "keys.toml"))
    svc = ReplicaService(config, lru_cache(1), _engine_factory(model_dir, tokenizer))
    yield svc
    svc.close()


def _request(adapter_id="", **sampling):
    sampling = {"max_new_tokens": 4, "ignore_eos": True, **sampling}
    return build_generate_request(messages=[("user", "Name a fruit.")], adapter_id=adapter_id, **sampling)


def _stream(service, request, metadata=ADMIN) -> list:
    async def collect():
        return [item async for item in service.generate_stream(request, metadata)]
    return asyncio.run(collect())


def test_generate_loads_the_adapter_on_a_miss(service):
    response = asyncio.run(service.generate(_request("upper"), ADMIN))
    assert isinstance(response, pb.GenerateResponse) and len(response.token_ids) == 4
    assert response.adapter_id == "upper"
    assert service.routing_stats() == {"adapters": ["upper"], "requests": 0}


def test_stream_ends_with_usage(service):
    chunks = _stream(service, _request("json"))
    assert all(isinstance(c, pb.GenerateStreamResponse) for c in chunks)
    assert chunks[-1].usage.completion_tokens == 4


@pytest.mark.parametrize("adapter_id", ["nope", "../upper"])
def test_unknown_adapter_is_a_not_found_status_and_loads_nothing(service, adapter_id):
    before = service.routing_stats()
    status = asyncio.run(service.generate(_request(adapter_id), ADMIN))
    assert isinstance(status, ReplicaStatusError) and status.code == "NOT_FOUND"
    [stream_status] = _stream(service, _request(adapter_id))
    assert stream_status.code == "NOT_FOUND"
    assert service.routing_stats() == before


def test_bad_sampling_is_an_invalid_argument_status(service):
    status = asyncio.run(service.generate(_request("", temperature=-1.0), ADMIN))
    assert status.code == "INVALID_ARGUMENT" and "temperature" in status.details
    assert _stream(service, _request("", temperature=-1.0))[-1].code == "INVALID_ARGUMENT"


def test_callers_are_authenticated_before_any_adapter_loads(service):
    before = service.routing_stats()
    status = asyncio.run(service.generate(_request("syn-a"), ()))
    assert status.code == "UNAUTHENTICATED"
    status = asyncio.run(service.generate(_request("syn-b"), (("authorization", "Bearer wrong"),)))
    assert status.code == "UNAUTHENTICATED"
    assert service.routing_stats() == before


def test_another_tenants_adapter_is_not_found(service):
    status = asyncio.run(service.generate(_request("other/sql"), TENANT))
    assert status.code == "NOT_FOUND"


def test_eviction_waits_for_the_request_holding_the_adapter(service):
    """Capacity 1: loading syn-b evicts syn-a while a stream on syn-a runs; that stream finishes,
    then syn-a leaves the engine."""
    async def race():
        first = service.generate_stream(_request("syn-a", max_new_tokens=16), ADMIN)
        chunks = [await first.__anext__()]  # syn-a loaded, its request admitted
        other = await service.generate(_request("syn-b"), ADMIN)  # evicts syn-a from the cache
        assert service.loop.engine.lora.has_adapter("syn-a")  # still held by the stream
        chunks += [c async for c in first]
        return chunks, other

    chunks, other = asyncio.run(race())
    assert isinstance(other, pb.GenerateResponse)
    assert sum(len(c.token_ids) for c in chunks) == 16 and chunks[-1].usage.completion_tokens == 16
    assert service.routing_stats()["adapters"] == ["syn-b"]
    assert service.loop.call(lambda e: e.lora.has_adapter("syn-a")).result(10) is False


def test_server_info_and_serving(service):
    info = asyncio.run(service.server_info(pb.GetServerInfoRequest(), ADMIN))
    assert info.model == "SmolLM2-135M-Instruct" and info.max_loras == 4
    assert service.serving()


def test_an_adapter_evicted_and_loaded_again_at_once_stays_published(service):
    """The eviction's unpublish waits behind a busy engine thread; loading the adapter again must
    not be undone by it."""
    async def evict_and_reload():
        await service.get_adapter("json")
        busy = service.loop.call(lambda engine: time.sleep(0.5))  # the engine thread is mid-step
        await service.get_adapter("upper")  # capacity 1: evicts json
        await service.get_adapter("json")  # evicts upper; json's removal is still queued
        await asyncio.wrap_future(busy)

    asyncio.run(evict_and_reload())
    assert service.loop.call(lambda e: e.lora.has_adapter("json")).result(10)
    assert service.routing_stats()["adapters"] == ["json"]


def test_unpublishing_an_adapter_the_engine_lacks_only_warns(service, caplog):
    service._unpublish("never-loaded")  # an eviction must not fail the request that triggered it
    assert "could not unload adapter never-loaded" in caplog.text


def test_a_closed_replica_is_unavailable(adapter_root, model_dir, tokenizer):
    closed = ReplicaService(cluster_config(adapter_root), lru_cache(1), _engine_factory(model_dir, tokenizer))
    closed.close()
    assert not closed.serving()
    status = asyncio.run(closed.generate(_request(""), ()))
    assert status.code == "UNAVAILABLE"
