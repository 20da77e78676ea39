"""api/convert.py: protobuf <-> engine types at the API edge.

Requests are built by the real client (``loraplex._request``) and go through the wire encoding;
responses are read back with the client's own parsers (``loraplex._convert``), so each check is
against the other side of the contract, not against convert.py's own code.
"""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest

from loraplex import _convert as client_convert
from loraplex._request import build_generate_request, build_sampling
from loraplex.types import AdapterInfo as ClientAdapterInfo
from loraplex.v1 import loraplex_pb2 as pb
from loraplex_server.api import convert
from loraplex_server.api.adapter_store import StoredAdapter
from loraplex_server.api.errors import status_for
from loraplex_server.engine.request import (ChatMessage, Constraint, FinishReason, Prompt, RequestOutput,
                                            SamplingParams, TokenLogprob)
from loraplex_server.errors import InvalidRequestError
from loraplex_server.lora.weights import AdapterInfo, AdapterMeta, Fingerprint


def over_the_wire(message):
    """``message`` as the server receives it: serialized and parsed again."""
    return type(message).FromString(message.SerializeToString())


# ---------------------------------------------------------------- requests: client -> engine


def test_unset_sampling_fields_take_the_documented_defaults():
    """The proto's documented defaults: max_new_tokens 64, greedy, top_p/top_k/repetition
    penalty off, no seed, no stops, no logprobs, no constraint."""
    params = convert.sampling_from_proto(over_the_wire(build_sampling()))
    assert params == SamplingParams(max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0,
                                    repetition_penalty=1.0, stop=(), stop_token_ids=(), seed=None,
                                    ignore_eos=False, logprobs=0, constraint=None)
    params.validate()


def test_every_sampling_argument_reaches_the_engine():
    wire = over_the_wire(build_sampling(
        max_new_tokens=7, temperature=0.75, top_p=0.5, top_k=40, repetition_penalty=1.25,
        stop=["###", "\n\n"], stop_token_ids=[2, 13], seed=2**63 - 1, ignore_eos=True, logprobs=3,
        regex="[0-9]+"))
    assert convert.sampling_from_proto(wire) == SamplingParams(
        max_new_tokens=7, temperature=0.75, top_p=0.5, top_k=40, repetition_penalty=1.25,
        stop=("###", "\n\n"), stop_token_ids=(2, 13), seed=2**63 - 1, ignore_eos=True, logprobs=3,
        constraint=Constraint("regex", spec="[0-9]+"))


def test_seed_zero_is_a_seed_not_unset():
    assert convert.sampling_from_proto(over_the_wire(build_sampling(seed=0))).seed == 0
    assert convert.sampling_from_proto(over_the_wire(build_sampling())).seed is None


def test_out_of_range_sampling_is_refused_naming_the_field():
    """The values arrive as sent (no silent clamping); validation names the field, and the edge
    maps it to INVALID_ARGUMENT."""
    for kwargs, field in [(dict(top_p=1.5), "sampling.top_p"), (dict(temperature=-1.0), "sampling.temperature"),
                          (dict(repetition_penalty=-2.0), "sampling.repetition_penalty"),
                          (dict(logprobs=21), "sampling.logprobs"), (dict(stop=[""]), "sampling.stop")]:
        params = convert.sampling_from_proto(over_the_wire(build_sampling(**kwargs)))
        with pytest.raises(InvalidRequestError) as info:
            params.validate()
        assert info.value.field == field and status_for(info.value) is grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("kwargs, expected", [
    (dict(prompt="Hello there"), Prompt(text="Hello there")),
    (dict(messages=[("system", "Be brief."), {"role": "user", "content": "Hi"}]),
     Prompt(messages=(ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")))),
    (dict(token_ids=[1, 0, 49151]), Prompt(token_ids=(1, 0, 49151))),
])
def test_each_input_kind_becomes_its_engine_prompt(kwargs, expected):
    request = over_the_wire(build_generate_request(**kwargs, adapter_id="acme/sql", max_new_tokens=3))
    assert convert.prompt_from_proto(request) == expected


@pytest.mark.parametrize("request_, field", [
    (pb.GenerateRequest(), "input"),                                         # no input at all
    (pb.GenerateRequest(prompt=""), "prompt"),                               # selected, but empty
    (build_generate_request(messages=[]), "messages"),
    (build_generate_request(token_ids=[]), "prompt_token_ids"),
])
def test_missing_or_empty_input_is_invalid_argument_naming_the_field(request_, field):
    with pytest.raises(InvalidRequestError) as info:
        convert.prompt_from_proto(over_the_wire(request_))
    assert info.value.field == field and status_for(info.value) is grpc.StatusCode.INVALID_ARGUMENT


def test_request_id_is_echoed_or_made():
    assert convert.request_id_of(pb.GenerateRequest(request_id="job-7:a@b/c.d_e")) == "job-7:a@b/c.d_e"
    assert convert.request_id_of(pb.GenerateRequest(request_id="x" * 128)) == "x" * 128
    made = {convert.request_id_of(pb.GenerateRequest()) for _ in range(3)}
    assert len(made) == 3 and all(re.fullmatch(r"[0-9a-f]{32}", m) for m in made)


@pytest.mark.parametrize("value", ["x" * 129, "has space", "tab\t", "new\nline", "semi;colon", "ünï", "a,b", "*"])
def test_bad_ids_are_refused_naming_the_field(value):
    with pytest.raises(InvalidRequestError) as info:
        convert.request_id_of(pb.GenerateRequest(request_id=value))
    assert info.value.field == "request_id" and status_for(info.value) is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(InvalidRequestError) as info:
        convert.check_id("adapter_id", value)
    assert info.value.field == "adapter_id"


def test_a_required_id_may_not_be_empty():
    with pytest.raises(InvalidRequestError) as info:
        convert.check_id("adapter_id", "")
    assert info.value.field == "adapter_id"
    assert convert.check_id("request_id", "", required=False) == ""


# ---------------------------------------------------------------- responses: engine -> client


LOGPROBS = (TokenLogprob(5, -0.5, ((5, -0.5), (9, -1.25))), TokenLogprob(6, -0.25, ((6, -0.25),)))


def test_a_middle_stream_delta_has_no_finish_reason_or_usage():
    out = RequestOutput("r1", (5, 6), "ab", finished=False, logprobs=LOGPROBS)
    chunk = client_convert.stream_chunk_from_proto(over_the_wire(convert.stream_chunk(out, "acme/sql")))
    assert (chunk.text, chunk.token_ids, chunk.adapter_id, chunk.request_id) == ("ab", (5, 6), "acme/sql", "r1")
    assert chunk.finish_reason is None and chunk.usage is None
    assert [(lp.token_id, lp.logprob, lp.top) for lp in chunk.logprobs] == \
        [(lp.token_id, lp.logprob, lp.top) for lp in LOGPROBS]


@pytest.mark.parametrize("reason, label", [
    (FinishReason.LENGTH, "length"), (FinishReason.STOP, "stop"), (FinishReason.EOS, "eos"),
    (FinishReason.ABORT, "abort"),
    (FinishReason.ERROR, "unspecified"),  # errors end the call with a status, not a finish reason
])
def test_the_last_delta_carries_finish_reason_and_usage(reason, label):
    out = RequestOutput("r1", (7,), "c", finished=True, finish_reason=reason, prompt_tokens=11,
                        completion_tokens=3)
    chunk = client_convert.stream_chunk_from_proto(over_the_wire(convert.stream_chunk(out, "")))
    assert chunk.finish_reason == (None if label == "unspecified" else label)
    assert (chunk.usage.prompt_tokens, chunk.usage.completion_tokens) == (11, 3)
    merged = RequestOutput("r1", (5, 6, 7), "abc", finished=True, finish_reason=reason, prompt_tokens=11,
                           completion_tokens=3, logprobs=LOGPROBS)
    result = client_convert.generate_result_from_proto(over_the_wire(convert.full_response(merged, "upper")))
    assert (result.text, result.token_ids, result.finish_reason, result.adapter_id, result.request_id) == \
        ("abc", (5, 6, 7), label, "upper", "r1")
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (11, 3)
    assert [lp.top for lp in result.logprobs] == [lp.top for lp in LOGPROBS]


def adapter(state="device", **kw) -> AdapterInfo:
    meta = AdapterMeta("acme/sql", Path("/adapters/acme/sql"), 8, ("q_proj", "v_proj"), 123456)
    return AdapterInfo(meta, state, pinned=True, request_count=42, **kw)


@pytest.mark.parametrize("state", ["disk", "loading", "cpu", "device"])
def test_adapter_info_fields_and_states_reach_the_client(state):
    info = adapter(state, version=3, last_used=1700000000.5, load_latency_s=0.25, owner="acme",
                   error="transient: EIO", load_attempts=2, retrying=True,
                   fingerprint=Fingerprint("ab" * 32, 4096, 1699999999.0))
    got = client_convert.adapter_info_from_proto(over_the_wire(convert.adapter_info(info)))
    assert got == ClientAdapterInfo(
        adapter_id="acme/sql", rank=8, target_modules=("q_proj", "v_proj"), state=state, pinned=True,
        request_count=42, source="/adapters/acme/sql", size_bytes=123456, version=3,
        last_used_unix=1700000000.5, load_latency_s=0.25, owner="acme", error="transient: EIO",
        load_attempts=2, retrying=True, content_sha256="ab" * 32, source_bytes=4096,
        source_mtime_unix=1699999999.0)


def test_adapter_info_unknowns_read_as_the_documented_zeros():
    """Never used, not loaded yet, public, no error, no fingerprint: 0 / "" on the wire."""
    got = client_convert.adapter_info_from_proto(over_the_wire(convert.adapter_info(adapter("disk"))))
    assert (got.last_used_unix, got.load_latency_s, got.owner, got.error) == (0.0, 0.0, "", "")
    assert (got.content_sha256, got.source_bytes, got.source_mtime_unix) == ("", 0, 0.0)


def test_an_unrestored_registration_is_listed_on_disk_with_its_error():
    entry = StoredAdapter("acme/sql", "/adapters/acme/sql", 4, True, "acme")
    got = client_convert.adapter_info_from_proto(
        over_the_wire(convert.unrestored_adapter_info(entry, "adapter_config.json: missing")))
    assert (got.adapter_id, got.source, got.version, got.pinned, got.owner, got.state) == \
        ("acme/sql", "/adapters/acme/sql", 4, True, "acme", "disk")
    assert got.error == "not restored at start-up: adapter_config.json: missing"
    public = convert.unrestored_adapter_info(StoredAdapter("upper", "/a/upper", 1, False, None), "gone")
    assert public.owner == ""
