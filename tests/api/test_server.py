"""The real server over real gRPC with the real client: outputs, status codes, lifecycle, metrics."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import ASSETS, run_to_completion, tokens_of
from loraplex import AsyncClient, Client
from loraplex import errors as cerr
from loraplex_server.engine.request import ChatMessage as EngineChat
from loraplex_server.engine.request import Prompt, SamplingParams

ADAPTERS = ASSETS / "adapters"
QUESTIONS = ["What is the capital of Italy?", "Name a fruit that is red.", "How do fish breathe?"]


@pytest.fixture
def server(start_server):
    return start_server(ADAPTERS, adapters=[("upper", "upper"), ("json", "json")], max_loras=2, max_rank=16)


@pytest.fixture
def client(server):
    with Client(server.target, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def shared_server(start_module_server):
    """The same server, one for the module: for tests that change nothing on it (a server per
    test cost an engine each: 11 of them)."""
    return start_module_server(ADAPTERS, adapters=[("upper", "upper"), ("json", "json")], max_loras=2, max_rank=16)


@pytest.fixture(scope="module")
def shared_client(shared_server):
    with Client(shared_server.target, timeout=60) as c:
        yield c


def metric_samples(server) -> dict:
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics").read().decode()
    out = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_concurrent_mixed_adapter_requests_equal_the_engine(server, make_engine):
    jobs = [(q, a) for q in QUESTIONS for a in ("", "upper", "json")]

    async def run_all():
        async with AsyncClient(server.target, timeout=120) as c:
            return await asyncio.gather(*[c.generate(messages=[("user", q)], adapter_id=a, max_new_tokens=24)
                                          for q, a in jobs])
    results = asyncio.run(run_all())

    engine = make_engine(max_loras=2, max_rank=16)
    for name in ("upper", "json"):
        engine.lora.add_adapter(name, ADAPTERS / name)
    for i, (q, a) in enumerate(jobs):
        engine.add_request(engine.make_request(Prompt(messages=(EngineChat("user", q),)),
                                               SamplingParams(max_new_tokens=24), a or None, f"j{i}"))
    expected = run_to_completion(engine)
    for i, result in enumerate(results):
        assert list(result.token_ids) == tokens_of(expected[f"j{i}"]), jobs[i]
        assert result.adapter_id == jobs[i][1]
    assert results[1].text.startswith("THE CAPITAL") and results[2].text.startswith('{"answer"')


def test_stream_deltas_add_up_to_the_unary_result(shared_client):
    client = shared_client
    unary = client.generate("The capital of France is", max_new_tokens=12, ignore_eos=True, request_id="u-1")
    chunks = list(client.generate_stream("The capital of France is", max_new_tokens=12, ignore_eos=True))
    assert "".join(c.text for c in chunks) == unary.text
    assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 12
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert unary.request_id == "u-1" and unary.usage.prompt_tokens > 0


@pytest.mark.parametrize("kwargs,error,field", [
    (dict(prompt="hi", adapter_id="nope"), cerr.NotFoundError, "nope"),
    (dict(prompt="hi", top_p=1.5), cerr.InvalidArgumentError, "sampling.top_p"),
    (dict(prompt="hi", temperature=-1.0), cerr.InvalidArgumentError, "sampling.temperature"),
    (dict(prompt="hi", logprobs=99), cerr.InvalidArgumentError, "sampling.logprobs"),
    (dict(prompt=""), cerr.InvalidArgumentError, "prompt"),
    (dict(token_ids=[1] * 5000), cerr.InvalidArgumentError, "prompt"),
    (dict(token_ids=[10**8]), cerr.InvalidArgumentError, "prompt_token_ids"),
    (dict(prompt="hi", request_id="bad id with spaces"), cerr.InvalidArgumentError, "request_id"),
])
def test_bad_requests_get_the_right_status_and_name_the_field(shared_client, kwargs, error, field):
    client = shared_client
    with pytest.raises(error) as exc:
        client.generate(**kwargs)
    assert field in exc.value.details
    assert client.generate("still fine", max_new_tokens=2).usage.completion_tokens == 2


def test_missing_input_is_invalid_argument(shared_server):
    server = shared_server
    from loraplex.v1 import loraplex_pb2 as pb, loraplex_pb2_grpc as pb_grpc
    with grpc.insecure_channel(server.target) as ch:
        with pytest.raises(grpc.RpcError) as exc:
            pb_grpc.LoraplexServiceStub(ch).Generate(pb.GenerateRequest())
    assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "input" in exc.value.details()


def test_adapter_admin_calls_and_their_errors(client, tmp_path):
    listed = {a.adapter_id: a for a in client.list_adapters()}
    assert set(listed) == {"upper", "json"}
    assert listed["json"].rank == 16 and "q_proj" in listed["json"].target_modules
    info = client.load_adapter("upper2", "upper", pin=True)
    assert info.pinned and info.state == "device" and info.rank == 8
    with pytest.raises(cerr.InvalidArgumentError, match="outside the adapter root"):
        client.load_adapter("evil", "../../../etc")
    with pytest.raises(cerr.InvalidArgumentError, match="adapter_config.json missing"):
        client.load_adapter("empty", ".")
    with pytest.raises(cerr.LoraplexError) as exc:  # max_loras=2: one slot must stay unpinned
        client.load_adapter("json", "json", pin=True)
    assert exc.value.code is grpc.StatusCode.FAILED_PRECONDITION
    client.unload_adapter("upper2")
    with pytest.raises(cerr.NotFoundError):
        client.unload_adapter("upper2")
    with pytest.raises(cerr.NotFoundError):
        client.generate("hi", adapter_id="upper2")
    assert {a.adapter_id for a in client.list_adapters()} == {"upper", "json"}
    s = client.server_info()
    assert (s.max_loras, s.max_lora_rank, s.device, s.dtype) == (2, 16, "cpu", "float32")
    assert s.context_length == 8192 and s.kv_cache_tokens == 256 * 16 and s.version and s.prefix_caching
    # SmolLM2-135M fp32: a LoRA pool row is 1,221,120 B, a 16-token KV block 737,280 B (test_pool_use derives both)
    assert (s.lora_pool_rows, s.lora_pool_bytes, s.kv_cache_bytes) == (2 * 16, 32 * 1_221_120, 256 * 737_280)
    assert s.memory_pool == "separate"


def test_cancelled_stream_and_deadline_free_kv(server, client):
    stream = client.generate_stream("Count from one to one thousand:", max_new_tokens=400, ignore_eos=True)
    next(stream)
    stream.close()
    with pytest.raises(cerr.DeadlineExceededError):
        client.generate("Count from one to one thousand:", max_new_tokens=400, ignore_eos=True, timeout=0.5)
    engine = server.engine
    deadline = time.monotonic() + 10
    while (engine.requests or engine.blocks.num_free_blocks != engine.blocks.num_blocks) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.requests and engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_duplicate_request_id_in_flight_is_already_exists(client):
    stream = client.generate_stream("Count to one hundred:", max_new_tokens=200, ignore_eos=True, request_id="dup")
    next(stream)
    with pytest.raises(cerr.LoraplexError) as exc:
        client.generate("x", request_id="dup")
    assert exc.value.code is grpc.StatusCode.ALREADY_EXISTS
    stream.close()


def test_queue_full_is_resource_exhausted(start_server):
    srv = start_server(ADAPTERS, max_queued=1)
    with Client(srv.target, timeout=60) as c:
        stream = c.generate_stream("Count to one hundred:", max_new_tokens=200, ignore_eos=True)
        next(stream)
        with pytest.raises(cerr.ResourceExhaustedError):
            c.generate("x", max_new_tokens=1)
        stream.close()


def test_a_one_off_engine_failure_is_re_run_and_the_server_keeps_serving(server, client, monkeypatch):
    """A step that fails once is re-run (fault isolation); a request failing alone is INTERNAL:
    tests/api/test_step_faults.py."""
    runner = server.engine.runner
    original = runner.forward_logits
    calls = {"n": 0}

    def flaky(packed):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated kernel failure")
        return original(packed)
    monkeypatch.setattr(runner, "forward_logits", flaky)
    assert client.generate("hello", max_new_tokens=4).usage.completion_tokens == 4
    assert calls["n"] >= 2  # the failed forward ran again
    assert client.generate("hello again", max_new_tokens=3).usage.completion_tokens == 3


def test_health_goes_serving_after_load_and_not_serving_on_drain(start_server, engine_factory):
    release = threading.Event()

    def slow_factory(cfg):
        release.wait(30)
        return engine_factory(cfg)
    srv = start_server(ADAPTERS, factory=slow_factory, wait_ready=False)
    with Client(srv.target, timeout=10, retries=0) as c:
        assert c.health() == "NOT_SERVING"
        with pytest.raises(cerr.UnavailableError, match="loading"):
            c.generate("hi")
        release.set()
        srv.run(srv.server.wait_ready())
        assert c.health() == "SERVING" and c.health("loraplex.v1.LoraplexService") == "SERVING"
        srv.run(srv.server.stop(0))
        with pytest.raises(cerr.UnavailableError):
            c.generate("hi")


def test_graceful_shutdown_lets_in_flight_requests_finish(server):
    results = {}

    def consume():
        with Client(server.target, timeout=60) as c:
            results["chunks"] = list(c.generate_stream("Tell me a story:", max_new_tokens=40, ignore_eos=True))
    worker = threading.Thread(target=consume)
    worker.start()
    deadline = time.monotonic() + 20
    while not server.engine.requests and time.monotonic() < deadline:
        time.sleep(0.02)
    stop = asyncio.run_coroutine_threadsafe(server.server.stop(30), server.loop)
    with Client(server.target, timeout=5, retries=0) as c:
        deadline = time.monotonic() + 20
        while c.health() != "NOT_SERVING":  # the drain has begun (not: some time has passed)
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(cerr.UnavailableError):
            c.generate("too late", max_new_tokens=2)
    stop.result(60)
    worker.join(30)
    chunks = results["chunks"]
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 40


def test_reflection_lists_the_service(shared_server):
    server = shared_server
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
    with grpc.insecure_channel(server.target) as ch:
        services = set(ProtoReflectionDescriptorDatabase(ch).get_services())
    assert {"loraplex.v1.LoraplexService", "grpc.health.v1.Health"} <= services


def test_metrics_parse_and_move(server, client):
    before = metric_samples(server)
    client.generate("Hello", adapter_id="upper", max_new_tokens=5, ignore_eos=True)
    with pytest.raises(cerr.NotFoundError):
        client.generate("Hello", adapter_id="made-up")
    after = metric_samples(server)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)
    assert delta("loraplex_requests_total", method="Generate", status="OK", adapter="upper", frontend="grpc") == 1
    assert delta("loraplex_requests_total", method="Generate", status="NOT_FOUND", adapter="other", frontend="grpc") == 1
    assert delta("loraplex_generated_tokens_total", adapter="upper") == 5
    assert delta("loraplex_time_to_first_token_seconds_count") == 1
    assert delta("loraplex_request_latency_seconds_count") == 1
    assert delta("loraplex_batch_tokens_count") >= 5
    assert after[("loraplex_kv_blocks_total", ())] == 256
    assert after[("loraplex_adapters_resident", (("tier", "registered"),))] == 2
    info_key = ("loraplex_adapter_info", (("adapter", "upper"), ("tier", "device"), ("version", "1")))
    deadline = time.monotonic() + 10
    while info_key not in after and time.monotonic() < deadline:  # per-adapter gauges refresh every 2 s
        client.generate("tick", max_new_tokens=1)
        time.sleep(0.2)
        after = metric_samples(server)
    assert after[info_key] == 1 and after[("loraplex_adapter_size_bytes", (("adapter", "upper"),))] > 0
    names = {n for n, _ in after}
    for required in ["loraplex_time_per_output_token_seconds_count", "loraplex_queue_wait_seconds_count",
                     "loraplex_prompt_tokens_total", "loraplex_requests_running", "loraplex_requests_waiting",
                     "loraplex_batch_size_count", "loraplex_kv_blocks_used", "loraplex_adapter_load_seconds_count",
                     "loraplex_adapter_loads_total", "loraplex_adapter_evictions_total"]:
        assert required in names, required


def test_prefix_cache_metrics_move(server, client):
    """The same 40-token prompt twice: the second finds its 2 full blocks cached (loraplex and vLLM names)."""
    prompt = list(range(100, 140))
    before = metric_samples(server)
    for _ in range(2):
        client.generate(token_ids=prompt, max_new_tokens=1)
    after = metric_samples(server)

    def delta(name):
        return after.get((name, ()), 0) - before.get((name, ()), 0)
    deadline = time.monotonic() + 5
    while delta("vllm:prefix_cache_hits_total") < 32 and time.monotonic() < deadline:
        time.sleep(0.05)
        after = metric_samples(server)
    assert delta("loraplex_prefix_cache_query_tokens_total") == 80
    assert delta("loraplex_prefix_cache_hit_tokens_total") == 32
    assert delta("vllm:prefix_cache_queries_total") == 80 and delta("vllm:prefix_cache_hits_total") == 32
