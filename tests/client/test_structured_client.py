"""The client and CLI side of structured outputs: the ``constraint`` oneof on the wire."""

from __future__ import annotations

import json

import pytest

from loraplex import Client
from loraplex._request import build_sampling
from loraplex.cli import main

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("LORAPLEX_TARGET", raising=False)
    monkeypatch.delenv("LORAPLEX_API_KEY", raising=False)


@pytest.mark.parametrize("kwargs,kind,value", [
    ({"json_schema": SCHEMA}, "json_schema", json.dumps(SCHEMA)),
    ({"json_schema": '{"type": "string"}'}, "json_schema", '{"type": "string"}'),
    ({"regex": "[0-9]+"}, "regex", "[0-9]+"),
    ({"grammar": 'root ::= "x"'}, "grammar", 'root ::= "x"'),
    ({"json_object": True}, "json_object", True),
])
def test_each_constraint_sets_its_oneof_field(kwargs, kind, value):
    s = build_sampling(**kwargs)
    assert s.WhichOneof("constraint") == kind and getattr(s, kind) == value


def test_choice_sets_the_list_and_an_empty_list_still_selects_it():
    assert list(build_sampling(choice=("a", "b")).choice.choices) == ["a", "b"]
    assert build_sampling(choice=[]).WhichOneof("constraint") == "choice"  # the server refuses it
    assert build_sampling().WhichOneof("constraint") is None


@pytest.mark.parametrize("kwargs,error", [
    ({"regex": "a", "choice": ["a"]}, ValueError),
    ({"json_schema": "{}", "json_object": True}, ValueError),
    ({"choice": "abc"}, TypeError),
])
def test_bad_constraint_arguments_raise_before_any_call(kwargs, error):
    with pytest.raises(error):
        build_sampling(**kwargs)


def test_client_generate_sends_the_constraint(fake):
    with Client(fake.target) as client:
        client.generate("Hi", json_schema=SCHEMA)
        list(client.generate_stream("Hi", choice=["x", "y"]))
    assert fake.calls_of("Generate")[0].request.sampling.json_schema == json.dumps(SCHEMA)
    assert list(fake.calls_of("GenerateStream")[0].request.sampling.choice.choices) == ["x", "y"]


def test_cli_constraint_flags(fake, tmp_path, capsys):
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    grammar_file = tmp_path / "g.ebnf"
    grammar_file.write_text('root ::= "yes"')
    for argv in (["--json-schema", str(schema_file)], ["--regex", "[a-z]+"], ["--choice", "a", "b", "c"],
                 ["--grammar", str(grammar_file)], ["--json-object"]):
        assert main(["--target", fake.target, "generate", "Hi", *argv]) == 0
    sent = [c.request.sampling for c in fake.calls_of("GenerateStream")]
    assert sent[0].json_schema == json.dumps(SCHEMA) and sent[1].regex == "[a-z]+"
    assert list(sent[2].choice.choices) == ["a", "b", "c"] and sent[3].grammar == 'root ::= "yes"'
    assert sent[4].json_object


@pytest.mark.parametrize("argv", [["--json-schema", "/nonexistent/schema.json"],
                                  ["--regex", "a", "--choice", "a"]])
def test_cli_constraint_usage_errors_exit_2(fake, capsys, argv):
    assert main(["--target", fake.target, "generate", "Hi", *argv]) == 2
    assert "usage:" in capsys.readouterr().err and fake.calls == []
