"""A local Ray cluster running the Serve application: two replicas on the default model, the real
``loraplex.Client`` through Serve's gRPC proxy. Outputs equal one in-process engine's, and each
adapter lives on one replica (Serve's model multiplexing routes by adapter)."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

serve = pytest.importorskip("ray.serve", reason="needs the ray extra: pip install 'loraplex-server[ray]'")
import ray  # noqa: E402
from ray.serve.config import gRPCOptions  # noqa: E402

from loraplex import Client  # noqa: E402
from loraplex._request import build_generate_request  # noqa: E402
from loraplex.errors import InvalidArgumentError, LoraplexError, NotFoundError, ServerError  # noqa: E402
from loraplex_server.api import convert  # noqa: E402
from loraplex_server.engine.engine import LLMEngine  # noqa: E402
from loraplex_server.engine.loop import EngineLoop  # noqa: E402
from loraplex_server.ray_serve.app import (GRPC_SERVICER_FUNCTIONS, REPLICA_DEPLOYMENT,  # noqa: E402
                                           loraplex_app)
from ray_support import ADAPTERS, cluster_config  # noqa: E402

pytestmark = pytest.mark.slow
APP = "loraplex"
MESSAGES = ([("user", "Name a fruit.")], [("user", "What is the capital of Italy?")])
SAMPLING = {"max_new_tokens": 6, "ignore_eos": True, "temperature": 0.0}
# (adapter, messages, streamed): one round over the four adapters, then a second one
CALLS = [(adapter, i, (n + i) % 2 == 1) for i in range(len(MESSAGES)) for n, adapter in enumerate(ADAPTERS)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_serving(target: str, timeout_s: float = 30.0) -> None:
    """serve.run returns before the proxy has learned the application's route: poll health."""
    deadline = time.monotonic() + timeout_s
    with Client(target, timeout=5, retries=0) as client:
        while True:
            try:
                if client.health() == "SERVING":
                    return
            except LoraplexError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the Serve gRPC proxy on {target} never answered SERVING")
            time.sleep(0.1)


@pytest.fixture(scope="module")
def config(adapter_root):
    return cluster_config(adapter_root)


@pytest.fixture(scope="module")
def reference(config) -> dict[tuple[str, int], tuple]:
    """(adapter, messages) -> token ids from one in-process engine, all requests in one batch."""
    engine = LLMEngine(config.engine)
    with EngineLoop(engine) as loop:
        for adapter in ADAPTERS:
            loop.add_adapter(adapter, adapter)
        streams = {}
        for adapter, i, _ in CALLS:
            request = build_generate_request(messages=MESSAGES[i], adapter_id=adapter, **SAMPLING)
            streams[adapter, i] = loop.submit(convert.prompt_from_proto(request),
                                              convert.sampling_from_proto(request.sampling), adapter)
        return {key: stream.result().token_ids for key, stream in streams.items()}


@pytest.fixture(scope="module")
def cluster(config, reference) -> str:
    """The target of Serve's gRPC proxy (the reference runs first: two cores, no contention)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        grpc_port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": _free_port()},
                    grpc_options=gRPCOptions(port=grpc_port,
                                             grpc_servicer_functions=list(GRPC_SERVICER_FUNCTIONS)))
        serve.run(loraplex_app(config, adapters_per_replica=len(ADAPTERS), num_replicas=2,
                               replica_actor_options={"num_cpus": 0}), name=APP)
        target = f"127.0.0.1:{grpc_port}"
        _wait_serving(target)
        yield target
    finally:
        serve.shutdown()
        ray.shutdown()


def _replica_stats() -> list[dict]:
    """Each replica's ``record_routing_stats`` (adapters held, requests in flight); Serve names
    replica actors ``SERVE_REPLICA::<app>#<deployment>#<id>`` in the ``serve`` namespace."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and f"::{APP}#{REPLICA_DEPLOYMENT}#" in a["name"]]
    actors = [ray.get_actor(name, namespace="serve") for name in names]
    return ray.get([actor.record_routing_stats.remote() for actor in actors])


def _call(target: str, adapter: str, i: int, streamed: bool) -> tuple:
    with Client(target, timeout=120) as client:
        if streamed:
            chunks = client.generate_stream(messages=MESSAGES[i], adapter_id=adapter, **SAMPLING)
            return tuple(t for chunk in chunks for t in chunk.token_ids)
        return client.generate(messages=MESSAGES[i], adapter_id=adapter, **SAMPLING).token_ids


def test_outputs_equal_one_server_and_each_adapter_stays_on_one_replica(cluster, reference):
    first_round, second_round = CALLS[:len(ADAPTERS)], CALLS[len(ADAPTERS):]
    outputs = {(a, i): _call(cluster, a, i, s) for a, i, s in first_round}  # places each adapter once
    with ThreadPoolExecutor(len(second_round)) as pool:  # concurrent: each goes where its adapter is
        futures = {(a, i): pool.submit(_call, cluster, a, i, s) for a, i, s in second_round}
        outputs.update({key: f.result() for key, f in futures.items()})

    assert outputs == reference
    assert len({reference[a, 0] for a in ADAPTERS}) == len(ADAPTERS)  # the adapters really differ
    placement = [stats["adapters"] for stats in _replica_stats()]
    assert len(placement) == 2 and all(placement), placement  # both replicas hold adapters
    held = sorted(a for adapters in placement for a in adapters)
    assert held == sorted(ADAPTERS), placement  # every adapter on exactly one replica


def test_unknown_adapter_is_not_found_through_the_ingress(cluster):
    with Client(cluster, timeout=60) as client:
        for adapter in ("nope", "../upper"):
            with pytest.raises(NotFoundError, match="not loaded"):
                client.generate("Hi", adapter_id=adapter, max_new_tokens=2)
            with pytest.raises(NotFoundError, match="not loaded"):
                list(client.generate_stream("Hi", adapter_id=adapter, max_new_tokens=2))


def test_bad_request_is_invalid_argument_through_the_ingress(cluster):
    with Client(cluster, timeout=60) as client:
        with pytest.raises(InvalidArgumentError, match="temperature"):
            client.generate("Hi", adapter_id="upper", temperature=-1.0)
        with pytest.raises(InvalidArgumentError, match="top_p"):
            list(client.generate_stream("Hi", top_p=1.5))
        with pytest.raises(InvalidArgumentError, match="prompt"):
            client.generate(token_ids=[0] * 5000, max_new_tokens=2)  # longer than the KV cache


def test_health_info_and_what_the_ingress_does_not_offer(cluster):
    with Client(cluster, timeout=60) as client:
        assert client.health() == "SERVING"
        assert client.health("loraplex.v1.LoraplexService") == "SERVING"
        with pytest.raises(NotFoundError):
            client.health("no.such.Service")
        info = client.server_info()
        assert (info.model, info.max_loras, info.kv_cache_tokens) == ("SmolLM2-135M-Instruct", 4, 64 * 16)
        for call in (client.list_adapters, lambda: client.load_adapter("x", "x"),
                     lambda: client.unload_adapter("upper")):
            with pytest.raises(ServerError, match="not available through the Ray Serve ingress") as caught:
                call()
            assert caught.value.code.name == "UNIMPLEMENTED"


def test_a_cancelled_stream_is_aborted_on_its_replica(cluster):
    """Closing the client's stream cancels the RPC; Serve cancels the ingress and the replica call,
    and the replica's engine aborts the request (long before its 200 tokens would be done)."""
    with Client(cluster, timeout=60) as client:
        stream = client.generate_stream("Once upon a time", adapter_id="upper", max_new_tokens=200,
                                        ignore_eos=True)
        next(stream)
        assert sum(stats["requests"] for stats in _replica_stats()) == 1
        stream.close()
    deadline = time.monotonic() + 5
    while any(stats["requests"] for stats in _replica_stats()):
        assert time.monotonic() < deadline, _replica_stats()
        time.sleep(0.1)


def test_health_list_and_watch_through_the_proxy(cluster):
    with grpc.insecure_channel(cluster) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        statuses = health.List(health_pb2.HealthListRequest(), timeout=30).statuses
        assert statuses["loraplex.v1.LoraplexService"].status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as caught:
            next(health.Watch(health_pb2.HealthCheckRequest(), timeout=30))
        assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED
