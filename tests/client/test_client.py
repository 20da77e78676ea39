"""Client tests against the fake in-process server (fake_loraplex_server.py, offline, no model)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

import loraplex
from loraplex import (
    AdapterInfo,
    AsyncClient,
    CancelledError,
    ChatMessage,
    Client,
    DeadlineExceededError,
    GenerateResult,
    InvalidArgumentError,
    LoraplexError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    ServerError,
    ServerInfo,
    StreamChunk,
    TokenLogprob,
    UnavailableError,
    Usage,
    from_rpc_error,
)
from loraplex import _convert as conv
from loraplex._request import build_generate_request, build_sampling
from loraplex._retry import RetryPolicy
from loraplex.v1 import loraplex_pb2 as pb

from fake_loraplex_server import STREAM_PIECES, Failure

S = grpc.StatusCode

# ---------------------------------------------------------------- conversions: wire -> dataclass


def test_generate_result_from_proto_every_field():
    msg = pb.GenerateResponse(
        text="hi", token_ids=[1, 2], finish_reason=pb.FINISH_REASON_LENGTH,
        usage=pb.Usage(prompt_tokens=5, completion_tokens=2), adapter_id="a", request_id="r",
        logprobs=[pb.TokenLogprob(token_id=1, logprob=-0.5,
                                  top=[pb.TopLogprob(token_id=1, logprob=-0.5),
                                       pb.TopLogprob(token_id=7, logprob=-2.0)]),
                  pb.TokenLogprob(token_id=2, logprob=-0.25)])
    result = conv.generate_result_from_proto(msg)
    assert result == GenerateResult(
        text="hi", token_ids=(1, 2), finish_reason="length", usage=Usage(5, 2), adapter_id="a",
        request_id="r", logprobs=(TokenLogprob(1, -0.5, ((1, -0.5), (7, -2.0))),
                                  TokenLogprob(2, -0.25, ())))
    assert type(result.token_ids) is tuple and type(result.logprobs[0].top) is tuple
    assert result.usage.total_tokens == 7


def test_generate_result_from_empty_proto_takes_defaults():
    assert conv.generate_result_from_proto(pb.GenerateResponse()) == GenerateResult(
        text="", token_ids=(), finish_reason="unspecified", usage=Usage(0, 0), adapter_id="",
        request_id="", logprobs=())


@pytest.mark.parametrize("value,label", [
    (pb.FINISH_REASON_UNSPECIFIED, "unspecified"), (pb.FINISH_REASON_LENGTH, "length"),
    (pb.FINISH_REASON_STOP, "stop"), (pb.FINISH_REASON_EOS, "eos"),
    (pb.FINISH_REASON_ABORT, "abort"), (99, "unspecified"),
])
def test_finish_reason_labels(value, label):
    assert conv.finish_reason_from_proto(value) == label


@pytest.mark.parametrize("value,label", [
    (pb.ADAPTER_STATE_UNSPECIFIED, "unspecified"), (pb.ADAPTER_STATE_DISK, "disk"),
    (pb.ADAPTER_STATE_CPU, "cpu"), (pb.ADAPTER_STATE_DEVICE, "device"), (42, "unspecified"),
])
def test_adapter_state_labels(value, label):
    assert conv.adapter_state_from_proto(value) == label
    if value != 42:
        assert conv.adapter_state_to_proto(label) == value


def test_stream_chunk_from_proto_middle_and_last():
    middle = conv.stream_chunk_from_proto(pb.GenerateStreamResponse(
        text="a", token_ids=[3], adapter_id="x", request_id="r"))
    assert middle == StreamChunk(text="a", token_ids=(3,), finish_reason=None, usage=None,
                                 adapter_id="x", request_id="r", logprobs=())
    last = conv.stream_chunk_from_proto(pb.GenerateStreamResponse(
        text="", finish_reason=pb.FINISH_REASON_STOP, usage=pb.Usage(prompt_tokens=3),
        logprobs=[pb.TokenLogprob(token_id=4, logprob=-1.0)]))
    assert last.finish_reason == "stop"
    assert last.usage == Usage(prompt_tokens=3, completion_tokens=0)  # present, even if zeros
    assert last.logprobs == (TokenLogprob(4, -1.0, ()),)


def test_adapter_info_from_proto_every_field():
    msg = pb.AdapterInfo(adapter_id="a", rank=8, target_modules=["q_proj", "v_proj"],
                         state=pb.ADAPTER_STATE_CPU, pinned=True, request_count=2**40,
                         source="dir/a", size_bytes=2**33)
    assert conv.adapter_info_from_proto(msg) == AdapterInfo(
        adapter_id="a", rank=8, target_modules=("q_proj", "v_proj"), state="cpu", pinned=True,
        request_count=2**40, source="dir/a", size_bytes=2**33)


def test_server_info_from_proto_every_field():
    msg = pb.GetServerInfoResponse(model="m", dtype="bfloat16", device="cuda:0", max_loras=4,
                                   max_lora_rank=64, context_length=4096, version="1.2",
                                   max_cpu_loras=32, kv_cache_tokens=100000, prefix_caching=True,
                                   lora_pool_rows=256, lora_pool_bytes=5 * 2 ** 32, kv_cache_bytes=7 * 2 ** 33,
                                   memory_pool="unified")
    assert conv.server_info_from_proto(msg) == ServerInfo(
        model="m", dtype="bfloat16", device="cuda:0", max_loras=4, max_lora_rank=64,
        context_length=4096, version="1.2", max_cpu_loras=32, kv_cache_tokens=100000, prefix_caching=True,
        lora_pool_rows=256, lora_pool_bytes=5 * 2 ** 32, kv_cache_bytes=7 * 2 ** 33,  # bytes past 32 bits
        memory_pool="unified")


def test_chat_message_both_ways():
    msg = conv.chat_message_to_proto(ChatMessage("user", "hi"))
    assert (msg.role, msg.content) == ("user", "hi")
    assert conv.chat_message_from_proto(msg) == ChatMessage("user", "hi")


# ---------------------------------------------------------------- conversions: dataclass -> wire


def test_generate_result_to_proto_every_field():
    result = GenerateResult(text="t", token_ids=(5,), finish_reason="eos", usage=Usage(1, 1),
                            adapter_id="a", request_id="r",
                            logprobs=(TokenLogprob(5, -0.5, ((5, -0.5), (6, -1.5))),))
    assert conv.generate_result_to_proto(result) == pb.GenerateResponse(
        text="t", token_ids=[5], finish_reason=pb.FINISH_REASON_EOS,
        usage=pb.Usage(prompt_tokens=1, completion_tokens=1), adapter_id="a", request_id="r",
        logprobs=[pb.TokenLogprob(token_id=5, logprob=-0.5,
                                  top=[pb.TopLogprob(token_id=5, logprob=-0.5),
                                       pb.TopLogprob(token_id=6, logprob=-1.5)])])
    assert conv.generate_result_from_proto(conv.generate_result_to_proto(result)) == result


def test_stream_chunk_to_proto_leaves_none_unset():
    msg = conv.stream_chunk_to_proto(StreamChunk(text="a", token_ids=(1,)))
    assert not msg.HasField("usage") and msg.finish_reason == pb.FINISH_REASON_UNSPECIFIED
    last = StreamChunk(text="", finish_reason="abort", usage=Usage(0, 0), request_id="r")
    msg = conv.stream_chunk_to_proto(last)
    assert msg.HasField("usage") and msg.finish_reason == pb.FINISH_REASON_ABORT
    assert conv.stream_chunk_from_proto(msg) == last


def test_adapter_and_server_info_to_proto():
    info = AdapterInfo("a", 4, ("q_proj",), "device", True, 3, "src", 99)
    assert conv.adapter_info_to_proto(info) == pb.AdapterInfo(
        adapter_id="a", rank=4, target_modules=["q_proj"], state=pb.ADAPTER_STATE_DEVICE,
        pinned=True, request_count=3, source="src", size_bytes=99)
    server = ServerInfo("m", "fp16", "cuda", 1, 2, 3, "v", 4, 5)
    assert conv.server_info_from_proto(conv.server_info_to_proto(server)) == server
    assert conv.server_info_to_proto(server).kv_cache_tokens == 5


def test_unknown_label_to_proto_raises():
    with pytest.raises(ValueError, match="'disk'"):
        conv.adapter_state_to_proto("gpu")
    with pytest.raises(ValueError):
        conv.finish_reason_to_proto("done")


# ---------------------------------------------------------------- requests


def test_request_leaves_unset_sampling_unset():
    request = build_generate_request("hi")
    assert request.WhichOneof("input") == "prompt" and request.prompt == "hi"
    assert request.sampling == pb.SamplingParams()  # every field zero: server defaults apply
    assert not request.sampling.HasField("seed")
    assert request.adapter_id == "" and request.request_id == ""


def test_request_seed_zero_is_set():
    sampling = build_sampling(seed=0)
    assert sampling.HasField("seed") and sampling.seed == 0


def test_request_every_sampling_field():
    s = build_sampling(max_new_tokens=9, temperature=0.5, top_p=0.75, top_k=40,
                       repetition_penalty=1.25, stop=["\n", "END"], stop_token_ids=[2, 3],
                       seed=2**63, ignore_eos=True, logprobs=5)
    assert (s.max_new_tokens, s.temperature, s.top_p, s.top_k, s.repetition_penalty) == (
        9, 0.5, 0.75, 40, 1.25)
    assert list(s.stop) == ["\n", "END"] and list(s.stop_token_ids) == [2, 3]
    assert s.seed == 2**63 and s.ignore_eos and s.logprobs == 5


def test_request_single_stop_string_is_not_split():
    assert list(build_sampling(stop="END").stop) == ["END"]


@pytest.mark.parametrize("kwargs", [{"max_new_tokens": 0}, {"top_k": -1}, {"seed": -1},
                                    {"logprobs": -2}, {"max_new_tokens": 1.5}])
def test_request_bad_counts_raise(kwargs):
    with pytest.raises(ValueError):
        build_sampling(**kwargs)


def test_request_messages_accept_three_forms():
    forms = [
        [ChatMessage("system", "s"), ChatMessage("user", "u")],
        [("system", "s"), ("user", "u")],
        [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
    ]
    requests = [build_generate_request(messages=m, adapter_id="a", request_id="r") for m in forms]
    assert requests[0] == requests[1] == requests[2]
    assert requests[0].WhichOneof("input") == "messages"
    assert [(m.role, m.content) for m in requests[0].messages.messages] == [("system", "s"),
                                                                            ("user", "u")]
    assert (requests[0].adapter_id, requests[0].request_id) == ("a", "r")


def test_request_token_ids_and_empty_inputs_select_the_oneof():
    assert list(build_generate_request(token_ids=[1, 2, 3]).prompt_token_ids.ids) == [1, 2, 3]
    assert build_generate_request(token_ids=[]).WhichOneof("input") == "prompt_token_ids"
    assert build_generate_request(messages=[]).WhichOneof("input") == "messages"


@pytest.mark.parametrize("kwargs", [{}, {"prompt": "a", "token_ids": [1]},
                                    {"prompt": "a", "messages": [("user", "b")]},
                                    {"messages": [], "token_ids": [1]}])
def test_request_needs_exactly_one_input(kwargs):
    with pytest.raises(ValueError, match="exactly one"):
        build_generate_request(**kwargs)


@pytest.mark.parametrize("messages,exc", [([42], TypeError), (["user"], TypeError),
                                          ([{"role": "user"}], ValueError), ("hello", TypeError)])
def test_request_bad_messages(messages, exc):
    with pytest.raises(exc):
        build_generate_request(messages=messages)


# ---------------------------------------------------------------- errors

CODE_CLASSES = [
    (S.INVALID_ARGUMENT, InvalidArgumentError), (S.OUT_OF_RANGE, InvalidArgumentError),
    (S.NOT_FOUND, NotFoundError), (S.RESOURCE_EXHAUSTED, ResourceExhaustedError),
    (S.UNAVAILABLE, UnavailableError), (S.DEADLINE_EXCEEDED, DeadlineExceededError),
    (S.CANCELLED, CancelledError), (S.PERMISSION_DENIED, PermissionDeniedError),
    (S.UNAUTHENTICATED, PermissionDeniedError), (S.INTERNAL, ServerError),
    (S.UNKNOWN, ServerError), (S.UNIMPLEMENTED, ServerError), (S.DATA_LOSS, ServerError),
    (S.FAILED_PRECONDITION, ServerError), (S.ABORTED, ServerError),
    (S.ALREADY_EXISTS, ServerError),
]


def test_every_error_code_has_a_class():
    assert {code for code, _ in CODE_CLASSES} == set(S) - {S.OK}


@pytest.mark.parametrize("code,cls", CODE_CLASSES, ids=[c.name for c, _ in CODE_CLASSES])
def test_status_code_maps_to_exception(fake, code, cls):
    fake.fail("Generate", code, details="went wrong")
    with Client(fake.target) as client, pytest.raises(cls) as info:
        client.generate("hi")
    err = info.value
    assert type(err) is cls and isinstance(err, LoraplexError)
    assert err.code == code and err.details == "went wrong"
    assert str(err) == f"{code.name}: went wrong"
    assert isinstance(err.__cause__, grpc.RpcError)


def test_resource_exhausted_retry_after(fake):
    fake.fail("Generate", S.RESOURCE_EXHAUSTED, details="queue full",
              trailing=(("retry-after-s", "2.5"),))
    fake.fail("Generate", S.RESOURCE_EXHAUSTED, details="queue full")
    with Client(fake.target) as client:
        with pytest.raises(ResourceExhaustedError) as first:
            client.generate("hi")
        with pytest.raises(ResourceExhaustedError) as second:
            client.generate("hi")
    assert first.value.retry_after == 2.5
    assert second.value.retry_after is None


def test_from_rpc_error_without_status_is_server_error():
    err = from_rpc_error(grpc.RpcError("boom"))
    assert type(err) is ServerError and err.code == S.UNKNOWN and err.details == "boom"


# ---------------------------------------------------------------- retries


IDEMPOTENT = [
    ("ListAdapters", lambda c: c.list_adapters()),
    ("GetServerInfo", lambda c: c.server_info()),
    ("UnloadAdapter", lambda c: c.unload_adapter("upper")),
]


@pytest.mark.parametrize("method,call", IDEMPOTENT, ids=[m for m, _ in IDEMPOTENT])
def test_idempotent_calls_retry_on_unavailable(fake, method, call):
    fake.fail(method, S.UNAVAILABLE, times=2)
    with Client(fake.target) as client:
        call(client)
    assert len(fake.calls_of(method)) == 3


def test_health_retries_on_unavailable(fake):
    fake.health.failures = [Failure(S.UNAVAILABLE, "try again")] * 2
    with Client(fake.target) as client:
        assert client.health() == "SERVING"
    assert fake.health.checks == 3


@pytest.mark.parametrize("method,call", [
    ("Generate", lambda c: c.generate("hi")),
    ("GenerateStream", lambda c: list(c.generate_stream("hi"))),
    ("LoadAdapter", lambda c: c.load_adapter("a", "dir")),
])
def test_non_idempotent_calls_are_not_retried(fake, method, call):
    fake.fail(method, S.UNAVAILABLE, times=1)
    with Client(fake.target) as client, pytest.raises(UnavailableError):
        call(client)
    assert len(fake.calls_of(method)) == 1


def test_retries_give_up_after_the_budget(fake):
    fake.fail("ListAdapters", S.UNAVAILABLE, times=5, details="down")
    with Client(fake.target, retries=1) as client, pytest.raises(UnavailableError, match="down"):
        client.list_adapters()
    assert len(fake.calls_of("ListAdapters")) == 2


def test_other_codes_are_not_retried(fake):
    fake.fail("ListAdapters", S.INTERNAL)
    with Client(fake.target) as client, pytest.raises(ServerError):
        client.list_adapters()
    assert len(fake.calls_of("ListAdapters")) == 1


def test_unreachable_server_is_unavailable(dead_target):
    with Client(dead_target, retries=1) as client, pytest.raises(UnavailableError):
        client.server_info()


def test_backoff_grows_and_is_capped():
    policy = RetryPolicy(retries=10, initial=0.1, multiplier=2.0, maximum=0.3)
    for attempt, ceiling in [(0, 0.1), (1, 0.2), (2, 0.3), (6, 0.3)]:
        assert ceiling / 2 <= policy.backoff(attempt) <= ceiling
    with pytest.raises(ValueError):
        RetryPolicy(retries=-1)


# ---------------------------------------------------------------- deadlines


def test_call_timeout_raises_deadline_exceeded(fake):
    fake.delay = 3.0
    start = time.monotonic()
    with Client(fake.target) as client, pytest.raises(DeadlineExceededError):
        client.generate("hi", timeout=0.2)
    assert time.monotonic() - start < 2.0


def test_client_default_timeout_applies(fake):
    fake.delay = 3.0
    with Client(fake.target, timeout=0.2) as client, pytest.raises(DeadlineExceededError):
        client.server_info()
    assert len(fake.calls_of("GetServerInfo")) == 1


def test_bad_client_timeout():
    with pytest.raises(ValueError):
        Client("127.0.0.1:1", timeout=0)


# ---------------------------------------------------------------- unary calls end to end


def test_generate_round_trip(fake):
    with Client(fake.target) as client:
        result = client.generate("hi", adapter_id="upper", temperature=0.5, seed=0,
                                 stop="END", logprobs=2, request_id="req-9")
    request = fake.calls_of("Generate")[0].request
    assert request.prompt == "hi" and request.adapter_id == "upper"
    assert request.request_id == "req-9"
    assert request.sampling.temperature == 0.5 and request.sampling.HasField("seed")
    assert request.sampling.max_new_tokens == 0 and request.sampling.top_k == 0  # left unset
    assert list(request.sampling.stop) == ["END"] and request.sampling.logprobs == 2
    assert result == GenerateResult(
        text="Hello world", token_ids=(10, 11, 12), finish_reason="stop", usage=Usage(4, 3),
        adapter_id="upper", request_id="req-9",
        logprobs=(TokenLogprob(10, -0.5, ((10, -0.5), (99, -1.25))),))


def test_generate_with_messages_and_token_ids(fake):
    with Client(fake.target) as client:
        client.generate(messages=[("user", "hi"), {"role": "assistant", "content": "yo"}])
        client.generate(token_ids=[5, 6])
    first, second = (call.request for call in fake.calls_of("Generate"))
    assert [(m.role, m.content) for m in first.messages.messages] == [("user", "hi"),
                                                                      ("assistant", "yo")]
    assert list(second.prompt_token_ids.ids) == [5, 6]


def test_generate_argument_errors_are_raised_before_any_call(fake):
    with Client(fake.target) as client:
        with pytest.raises(ValueError):
            client.generate()
        with pytest.raises(ValueError):
            client.generate_stream("a", token_ids=[1])  # eager, not on first next()
    assert fake.calls == []


def test_adapters_calls(fake):
    with Client(fake.target) as client:
        loaded = client.load_adapter("new", "adapters/new", pin=True)
        assert loaded == AdapterInfo("new", 4, ("q_proj",), "cpu", True, 0, "adapters/new", 512)
        ids = [a.adapter_id for a in client.list_adapters()]
        assert ids == ["upper", "json", "new"]
        assert client.list_adapters()[0] == AdapterInfo(
            "upper", 8, ("q_proj", "v_proj"), "device", True, 12, "upper", 1024)
        assert client.unload_adapter("new") is None
        with pytest.raises(NotFoundError, match="'new' not found"):
            client.unload_adapter("new")
    assert fake.calls_of("LoadAdapter")[0].request.pin is True


def test_server_info(fake):
    with Client(fake.target) as client:
        assert client.server_info() == ServerInfo("SmolLM2-135M", "float32", "cpu", 4, 64, 2048,
                                                  "0.1.0", 16, 8192)


def test_health_statuses(fake):
    with Client(fake.target) as client:
        assert client.health() == "SERVING"
        assert client.health("loraplex.v1.LoraplexService") == "SERVING"
        fake.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert client.health() == "NOT_SERVING"
        with pytest.raises(NotFoundError):
            client.health("no.such.Service")


def test_api_key_and_metadata_reach_the_server(fake):
    with Client(fake.target, api_key="sekret", metadata={"X-Tenant": "t1"}) as client:
        client.generate("hi")
        client.list_adapters()
    for call in fake.calls:
        assert call.metadata["authorization"] == "Bearer sekret"
        assert call.metadata["x-tenant"] == "t1"
        assert "loraplex-python/0.1.0" in call.metadata["user-agent"]


def test_binary_metadata_stays_bytes(fake):
    with Client(fake.target, metadata=[("Trace-Bin", b"\x00\x01")]) as client:
        client.server_info()
    assert fake.calls[0].metadata["trace-bin"] == b"\x00\x01"


def test_no_api_key_sends_no_authorization(fake):
    with Client(fake.target) as client:
        client.server_info()
    assert "authorization" not in fake.calls[0].metadata


def test_api_key_and_authorization_metadata_conflict():
    with pytest.raises(ValueError):
        Client("127.0.0.1:1", api_key="k", metadata=[("authorization", "Bearer x")])


# ---------------------------------------------------------------- streaming


def test_stream_yields_chunks_in_order(fake):
    with Client(fake.target) as client:
        chunks = list(client.generate_stream("hi", adapter_id="upper"))
    assert [c.text for c in chunks] == list(STREAM_PIECES)
    assert [c.finish_reason for c in chunks] == [None, None, "eos"]
    assert [c.usage for c in chunks] == [None, None, Usage(4, 3)]
    assert all(c.adapter_id == "upper" and c.request_id == "srv-1" for c in chunks)
    assert fake.calls_of("GenerateStream")[0].request.adapter_id == "upper"


def test_stream_starts_lazily(fake):
    with Client(fake.target) as client:
        stream = client.generate_stream("hi")
        assert fake.calls == []
        assert next(iter(stream)).text == STREAM_PIECES[0]
        stream.close()


def test_closing_stream_early_cancels_the_server_side(fake):
    fake.stream_forever, fake.stream_interval = True, 0.01
    with Client(fake.target) as client:
        stream = client.generate_stream("hi")
        assert [next(stream).text for _ in range(2)] == ["t1 ", "t2 "]
        stream.close()
        assert fake.stream_ended.wait(5), "the server never saw the cancellation"
        sent = fake.stream_sent
        time.sleep(0.1)
        assert fake.stream_sent <= sent + 1  # it stopped producing
        client.server_info()  # the channel is still usable


def test_breaking_out_of_a_stream_cancels_it(fake):
    fake.stream_forever, fake.stream_interval = True, 0.01
    with Client(fake.target) as client:
        for chunk in client.generate_stream("hi"):
            break
        assert chunk.text == "t1 "
        assert fake.stream_ended.wait(5)


def test_stream_error_midway_is_mapped(fake):


    fake.stream_abort_after = (1, Failure(S.RESOURCE_EXHAUSTED, "evicted"))
    received = []
    with Client(fake.target) as client, pytest.raises(ResourceExhaustedError, match="evicted"):
        for chunk in client.generate_stream("hi"):
            received.append(chunk.text)
    assert received == [STREAM_PIECES[0]]


def test_stream_deadline(fake):
    fake.stream_forever, fake.stream_interval = True, 0.01
    with Client(fake.target) as client, pytest.raises(DeadlineExceededError):
        for _ in client.generate_stream("hi", timeout=0.2):
            pass


# ---------------------------------------------------------------- AsyncClient


def test_async_unary_calls(fake):
    async def scenario():
        async with AsyncClient(fake.target, api_key="k") as client:
            result = await client.generate("hi", adapter_id="json", seed=3)
            loaded = await client.load_adapter("new", "src", pin=True)
            adapters = await client.list_adapters()
            await client.unload_adapter("new")
            info = await client.server_info()
            status = await client.health()
            return result, loaded, adapters, info, status

    result, loaded, adapters, info, status = asyncio.run(scenario())
    assert result.text == "Hello world" and result.adapter_id == "json"
    assert result.finish_reason == "stop" and result.usage == Usage(4, 3)
    assert loaded.pinned and loaded.state == "cpu"
    assert [a.adapter_id for a in adapters] == ["upper", "json", "new"]
    assert info.model == "SmolLM2-135M" and status == "SERVING"
    assert fake.calls_of("Generate")[0].request.sampling.seed == 3
    assert all(call.metadata["authorization"] == "Bearer k" for call in fake.calls)


def test_async_stream_in_order(fake):
    async def scenario():
        async with AsyncClient(fake.target) as client:
            return [chunk async for chunk in client.generate_stream(messages=[("user", "x")])]

    chunks = asyncio.run(scenario())
    assert [c.text for c in chunks] == list(STREAM_PIECES)
    assert chunks[-1].finish_reason == "eos" and chunks[-1].usage == Usage(4, 3)
    assert chunks[0].finish_reason is None and chunks[0].usage is None


def test_async_stream_aclose_cancels_the_server_side(fake):
    fake.stream_forever, fake.stream_interval = True, 0.01

    async def scenario():
        async with AsyncClient(fake.target) as client:
            stream = client.generate_stream("hi")
            first = await stream.__anext__()
            await stream.aclose()
            ended = await asyncio.get_running_loop().run_in_executor(None, fake.stream_ended.wait, 5)
            return first, ended

    first, ended = asyncio.run(scenario())
    assert first.text == "t1 " and ended


def test_async_retry_only_for_idempotent_calls(fake):
    fake.fail("ListAdapters", S.UNAVAILABLE, times=2)
    fake.fail("Generate", S.UNAVAILABLE, times=2)

    async def scenario():
        async with AsyncClient(fake.target) as client:
            adapters = await client.list_adapters()
            with pytest.raises(UnavailableError):
                await client.generate("hi")
            return adapters

    assert len(asyncio.run(scenario())) == 2
    assert len(fake.calls_of("ListAdapters")) == 3
    assert len(fake.calls_of("Generate")) == 1


def test_async_errors_are_mapped(fake):
    fake.fail("Generate", S.INVALID_ARGUMENT, details="bad top_p")

    async def scenario():
        async with AsyncClient(fake.target) as client:
            with pytest.raises(ValueError):
                client.generate_stream()  # checked eagerly, like the sync client
            with pytest.raises(InvalidArgumentError, match="bad top_p"):
                await client.generate("hi")
            with pytest.raises(NotFoundError):
                await client.unload_adapter("nope")
            fake.delay = 3.0
            with pytest.raises(DeadlineExceededError):
                await client.generate("hi", timeout=0.2)

    asyncio.run(scenario())


def test_async_stream_error_is_mapped(fake):
    fake.fail("GenerateStream", S.PERMISSION_DENIED, details="bad key")

    async def scenario():
        async with AsyncClient(fake.target) as client:
            async for _ in client.generate_stream("hi"):
                pass

    with pytest.raises(PermissionDeniedError, match="bad key"):
        asyncio.run(scenario())


# ---------------------------------------------------------------- public surface


def test_public_api():
    assert loraplex.__version__ == "0.1.0"
    for name in loraplex.__all__:
        assert hasattr(loraplex, name), name
    assert issubclass(loraplex.CancelledError, LoraplexError)
