"""Property-based tests of the gRPC API (hypothesis), through the raw stub so nothing is checked
client-side: random values for every request field, and random adapter configs. Every call ends
with a defined status (never INTERNAL, UNKNOWN or a hang) and the server stays healthy."""

from __future__ import annotations

import json
import math
import shutil
import uuid

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import ASSETS
from loraplex import Client
from loraplex.v1 import loraplex_pb2 as pb
from loraplex.v1 import loraplex_pb2_grpc as pb_grpc

DEFINED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
           grpc.StatusCode.ALREADY_EXISTS}
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([0.0, -1.0, 1.0]))
uint32 = st.one_of(st.integers(0, 8), st.sampled_from([2 ** 32 - 1, 2 ** 31, 10 ** 6]))
text = st.text(st.characters(codec="utf-8"), max_size=300)
sampling = st.builds(
    pb.SamplingParams, max_new_tokens=uint32, temperature=floats, top_p=floats, top_k=uint32,
    repetition_penalty=floats, stop=st.lists(text, max_size=40), stop_token_ids=st.lists(uint32, max_size=20),
    seed=st.integers(0, 2 ** 64 - 1), ignore_eos=st.booleans(), logprobs=st.one_of(st.integers(0, 25), uint32))
messages = st.builds(pb.ChatMessages, messages=st.lists(
    st.builds(pb.ChatMessage, role=st.one_of(st.sampled_from(["user", "system", "assistant"]), text),
              content=text), max_size=4))
generate_requests = st.builds(
    lambda adapter, body, sp, rid: pb.GenerateRequest(adapter_id=adapter, sampling=sp, request_id=rid, **body),
    st.one_of(st.just(""), st.just("upper"), text),
    st.one_of(st.builds(lambda p: {"prompt": p}, st.one_of(text, st.text(max_size=20000, min_size=5000))),
              st.builds(lambda m: {"messages": m}, messages),
              st.builds(lambda t: {"prompt_token_ids": pb.TokenIds(ids=t)}, st.lists(uint32, max_size=50)),
              st.just({})),
    sampling, st.one_of(st.just(""), text))


@pytest.fixture
def fuzz_server(start_server):
    # a small KV cache: a huge max_new_tokens ends at its capacity quickly
    srv = start_server(ASSETS / "adapters", adapters=[("upper", "upper")], num_blocks=12, max_rank=16)
    channel = grpc.insecure_channel(srv.target)
    yield srv, pb_grpc.LoraplexServiceStub(channel)
    channel.close()


def _code(call) -> grpc.StatusCode:
    try:
        call()
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()


@FUZZ
@given(request=generate_requests, stream=st.booleans())
def test_any_generate_request_ends_with_a_defined_status(fuzz_server, request, stream):
    srv, stub = fuzz_server
    if stream:
        code = _code(lambda: list(stub.GenerateStream(request, timeout=60)))
    else:
        code = _code(lambda: stub.Generate(request, timeout=60))
    assert code in DEFINED, (code, request)


def test_the_server_is_healthy_after_the_fuzz(fuzz_server):
    srv, stub = fuzz_server
    stub.Generate(pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(max_new_tokens=2)), timeout=60)
    with Client(srv.target, timeout=30) as c:
        assert c.health() == "SERVING"


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-10, 100), st.floats(), text),
                           lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                   st.dictionaries(text, inner, max_size=4)), max_leaves=8)
config_changes = st.dictionaries(
    st.sampled_from(["r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora",
                     "peft_type", "bias", "use_dora", "modules_to_save", "fan_in_fan_out"]),
    st.one_of(json_values, st.sampled_from([8, 16, "q_proj", ["q_proj", "v_proj"], ".*proj", "all-linear",
                                            {"q_proj": 8}, math.inf, "q_proj(", {"[v": 4}, {"q_proj": "8"},
                                            -1, 0, True])), max_size=4)


@pytest.fixture
def config_fuzz_server(start_server, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(ASSETS / "adapters", root)
    return start_server(root, max_rank=16), root


@FUZZ
@given(changes=config_changes)
def test_any_adapter_config_loads_or_is_refused_invalid_argument(config_fuzz_server, changes):
    srv, root = config_fuzz_server
    name = uuid.uuid4().hex[:8]
    shutil.copytree(root / "upper", root / name)
    config = json.loads((root / "upper" / "adapter_config.json").read_text())
    config.update(changes)
    (root / name / "adapter_config.json").write_text(json.dumps(config))  # inf -> Infinity, as Python writes it
    with grpc.insecure_channel(srv.target) as channel:
        stub = pb_grpc.LoraplexServiceStub(channel)
        code = _code(lambda: stub.LoadAdapter(pb.LoadAdapterRequest(adapter_id=name, source=name), timeout=60))
        assert code in {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}, (code, changes)
        stub.Generate(pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(max_new_tokens=1)), timeout=60)
