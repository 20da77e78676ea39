"""The ingress deployment's class without Serve: a fake replica handle stands in for the replicas,
a fake Serve gRPC context records the status each RPC ends with."""

from __future__ import annotations

import asyncio

import grpc
import pytest

pytest.importorskip("ray.serve", reason="needs the ray extra: pip install 'loraplex-server[ray]'")
from grpc_health.v1 import health_pb2  # noqa: E402
from loraplex.v1 import loraplex_pb2 as pb  # noqa: E402

from loraplex_server.ray_serve import ingress  # noqa: E402
from loraplex_server.ray_serve.status import ReplicaStatusError  # noqa: E402
from ray_support import FakeServeContext  # noqa: E402

NOT_FOUND = ReplicaStatusError("NOT_FOUND", "adapter 'x' is not loaded")


class FakeReplicas:
    """A DeploymentHandle to the replica deployment: ``handle.options(...).method.remote(...)``."""

    def __init__(self, answers: dict):
        self.answers = answers  # method -> value (a status too), list (a stream), exception, "hang"
        self.calls: list[tuple[str, dict, tuple]] = []
        self._options: dict = {}

    def options(self, **options):
        bound = FakeReplicas(self.answers)
        bound.calls, bound._options = self.calls, options
        return bound

    def __getattr__(self, method):
        return _Method(self, method)


class _Method:
    def __init__(self, handle: FakeReplicas, name: str):
        self.handle, self.name = handle, name

    def remote(self, *args):
        self.handle.calls.append((self.name, self.handle._options, args))
        answer = self.handle.answers[self.name]
        if isinstance(answer, list):
            return _stream(answer)
        return _reply(answer)


async def _reply(answer):
    if answer == "hang":
        await asyncio.sleep(3600)
    if isinstance(answer, BaseException) and not isinstance(answer, ReplicaStatusError):
        raise answer  # a replica's statuses come back as values, anything else is raised
    return answer


async def _stream(items):
    for item in items:
        yield item


def _drain(agen) -> list:
    async def collect():
        return [item async for item in agen]
    return asyncio.run(collect())


def test_generate_routes_by_adapter_and_forwards_the_callers_metadata():
    replicas = FakeReplicas({"generate": pb.GenerateResponse(text="HI")})
    context = FakeServeContext([("authorization", "Bearer k")])
    request = pb.GenerateRequest(adapter_id="upper")
    response = asyncio.run(ingress.LoraplexIngress(replicas).Generate(request, context))
    assert response.text == "HI" and context.code is None
    [(method, options, args)] = replicas.calls
    assert (method, options) == ("generate", {"multiplexed_model_id": "upper", "stream": False})
    assert args[1] == (("authorization", "Bearer k"),)


def test_a_replicas_status_ends_generate_with_that_code():
    context = FakeServeContext()
    response = asyncio.run(ingress.LoraplexIngress(FakeReplicas({"generate": NOT_FOUND})).Generate(
        pb.GenerateRequest(adapter_id="x"), context))
    assert response == pb.GenerateResponse()
    assert (context.code, context.details) == (grpc.StatusCode.NOT_FOUND, "adapter 'x' is not loaded")


def test_a_stream_passes_chunks_then_raises_the_replicas_status():
    replicas = FakeReplicas({"generate_stream": [pb.GenerateStreamResponse(text="a"), NOT_FOUND]})
    context = FakeServeContext()
    chunks = []

    async def consume():
        async for chunk in ingress.LoraplexIngress(replicas).GenerateStream(pb.GenerateRequest(adapter_id="x"),
                                                                             context):
            chunks.append(chunk)

    with pytest.raises(ReplicaStatusError):
        asyncio.run(consume())
    assert [c.text for c in chunks] == ["a"] and context.code is grpc.StatusCode.NOT_FOUND
    assert replicas.calls[0][1] == {"multiplexed_model_id": "x", "stream": True}


def test_server_info_status_passes_through():
    context = FakeServeContext()
    status = ReplicaStatusError("UNAUTHENTICATED", "unknown API key")
    asyncio.run(ingress.LoraplexIngress(FakeReplicas({"server_info": status})).GetServerInfo(
        pb.GetServerInfoRequest(), context))
    assert context.code is grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("method", ["ListAdapters", "LoadAdapter", "UnloadAdapter"])
def test_adapter_management_is_unimplemented(method):
    context = FakeServeContext()
    asyncio.run(getattr(ingress.LoraplexIngress(FakeReplicas({})), method)(None, context))
    assert context.code is grpc.StatusCode.UNIMPLEMENTED and method in context.details


def _check(answer, service: str = "") -> tuple:
    context = FakeServeContext()
    response = asyncio.run(ingress.LoraplexIngress(FakeReplicas({"serving": answer})).Check(
        health_pb2.HealthCheckRequest(service=service), context))
    return response.status, context.code


def test_health_check_asks_a_replica(monkeypatch):
    monkeypatch.setattr(ingress, "HEALTH_TIMEOUT_S", 0.05)
    assert _check(True) == (health_pb2.HealthCheckResponse.SERVING, None)
    assert _check(True, ingress.SERVICE_NAME)[0] == health_pb2.HealthCheckResponse.SERVING
    assert _check(False)[0] == health_pb2.HealthCheckResponse.NOT_SERVING  # a draining replica
    assert _check(RuntimeError("no replica"))[0] == health_pb2.HealthCheckResponse.NOT_SERVING
    assert _check("hang")[0] == health_pb2.HealthCheckResponse.NOT_SERVING  # no answer in time
    assert _check(True, "no.such.Service")[1] is grpc.StatusCode.NOT_FOUND


def test_health_list_and_watch():
    response = asyncio.run(ingress.LoraplexIngress(FakeReplicas({"serving": True})).List(
        health_pb2.HealthListRequest(), FakeServeContext()))
    assert {name: s.status for name, s in response.statuses.items()} == {
        "": health_pb2.HealthCheckResponse.SERVING,
        ingress.SERVICE_NAME: health_pb2.HealthCheckResponse.SERVING}
    context = FakeServeContext()
    with pytest.raises(ReplicaStatusError, match="Watch"):
        _drain(ingress.LoraplexIngress(FakeReplicas({})).Watch(health_pb2.HealthCheckRequest(), context))
    assert context.code is grpc.StatusCode.UNIMPLEMENTED
