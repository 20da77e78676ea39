"""Structured outputs over real gRPC with the real client: constrained results, refusals, metrics."""

from __future__ import annotations

import json
import re
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import ASSETS
from loraplex import Client
from loraplex import errors as cerr
from loraplex_server.engine.guided import backend as backend_module

SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 80}},
          "required": ["answer"], "additionalProperties": False}


@pytest.fixture
def server(start_server):
    return start_server(ASSETS / "adapters", adapters=[("json", "json")], max_loras=1, max_rank=16)


@pytest.fixture
def client(server):
    with Client(server.target, timeout=60) as c:
        yield c


def metric_values(server) -> dict:
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics").read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def test_constrained_generate_and_stream_match_their_constraints(server, client):
    result = client.generate(messages=[("user", "What do cows eat?")], adapter_id="json", json_schema=SCHEMA,
                             max_new_tokens=60)
    assert set(json.loads(result.text)) == {"answer"} and result.finish_reason == "eos"
    chunks = list(client.generate_stream("Pick one:", choice=["left", "right"], temperature=1.0, seed=3))
    assert "".join(c.text for c in chunks) in ("left", "right")
    code = client.generate("Code:", regex="[A-Z]{2}-[0-9]{3}", max_new_tokens=16).text
    assert re.fullmatch("[A-Z]{2}-[0-9]{3}", code)
    assert client.generate("Yes or no?", grammar='root ::= "yes" | "no"').text in ("yes", "no")
    obj = client.generate("An object:", json_object=True, max_new_tokens=60)
    assert obj.text.startswith("{")
    if obj.finish_reason == "eos":  # else max_new_tokens ran out: a prefix, finish_reason length
        assert isinstance(json.loads(obj.text), dict)
    else:
        assert obj.finish_reason == "length"


@pytest.mark.parametrize("kwargs,field,words", [
    ({"json_schema": "{not json"}, "sampling.json_schema", "not valid JSON"),
    ({"json_schema": '{"type": "frobnicate"}'}, "sampling.json_schema", "frobnicate"),  # fails while queued
    ({"json_schema": {"description": "x" * 70_000}}, "sampling.json_schema", "exceed the limit"),
    ({"regex": "([a-z]"}, "sampling.regex", "does not compile"),
    ({"choice": []}, "sampling.choice", "empty"),
    ({"grammar": "root ::= undefined_rule"}, "sampling.grammar", "undefined_rule"),
    ({"regex": "a", "ignore_eos": True}, "sampling.ignore_eos", "constraint"),
])
def test_bad_constraints_are_invalid_argument_naming_the_problem(client, kwargs, field, words):
    for attempt in range(2):  # the second time a compile failure comes from the cache
        with pytest.raises(cerr.InvalidArgumentError) as exc:
            client.generate("Hi", max_new_tokens=4, **kwargs)
        assert exc.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert field in exc.value.details and words in exc.value.details, exc.value.details
    with pytest.raises(cerr.InvalidArgumentError, match=field):
        list(client.generate_stream("Hi", max_new_tokens=4, **kwargs))
    assert client.generate("Hi", max_new_tokens=2).text is not None  # the server keeps serving


def test_without_the_grammar_engine_constraints_are_failed_precondition(client, monkeypatch):
    monkeypatch.setattr(backend_module, "xgr", None)
    monkeypatch.setattr(backend_module, "IMPORT_ERROR", "ModuleNotFoundError: No module named 'xgrammar'")
    with pytest.raises(cerr.LoraplexError) as exc:
        client.generate("Hi", regex="a+")
    assert exc.value.code is grpc.StatusCode.FAILED_PRECONDITION and "xgrammar" in exc.value.details
    assert client.generate("Hi", max_new_tokens=2).finish_reason == "length"  # unconstrained still served


def test_grammar_compile_and_cache_metrics_move(server, client):
    before = metric_values(server)
    for _ in range(2):
        client.generate("Pick:", choice=["metrics-a", "metrics-b"], max_new_tokens=8)
    client.generate("tick", max_new_tokens=1)  # one more step records what the last one left
    after = metric_values(server)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)
    assert delta("loraplex_grammar_cache_total", result="miss") == 1
    assert delta("loraplex_grammar_cache_total", result="hit") == 1
    assert delta("loraplex_grammar_compile_seconds_count") == 1
