"""Table tests of the HTTP front end's pure parts: body parsing (400s that name the field), the
constraint mapping, and the error -> HTTP status table (no server)."""

from __future__ import annotations

import json

import pytest

from loraplex_server.api.calls import Failure, retry_after
from loraplex_server.api.http import schemas
from loraplex_server.api.http.errors import error_response
from loraplex_server.engine.request import Constraint
from loraplex_server.errors import (AdapterNotFoundError, DuplicateRequestError, EngineStoppedError,
                                    InvalidRequestError, QueueFullError)
from loraplex_server.tenancy import AuthenticationError, RateLimitError

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "function"}]}, "tools"), ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"logit_bias": {"1": 2}}, "logit_bias"), ({"audio": {"voice": "x"}}, "audio"), ({"made_up": 1}, "made_up"),
    ({"top_logprobs": 2}, "top_logprobs"), ({"n": 0}, "n"), ({"stop": [""]}, "stop"), ({"seed": -1}, "seed"),
    ({"stream_options": {"include_usage": True}}, "stream_options"), ({"temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "messages[0].content[0].type"),
    ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format.json_schema.schema"),
    ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice"),
])
def test_unsupported_or_bad_fields_are_refused_by_name(extra, param):
    with pytest.raises(InvalidRequestError) as exc:
        schemas.chat_body({**CHAT, **extra})
    assert exc.value.field == param


def test_no_op_values_and_vllm_extras_are_accepted():
    body = schemas.chat_body({**CHAT, "frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}, "n": 2,
                              "tools": None, "top_k": 5, "repetition_penalty": 1.1, "ignore_eos": True,
                              "stop_token_ids": [2], "max_completion_tokens": 7, "logprobs": True,
                              "top_logprobs": 3, "stream": True, "stream_options": {"include_usage": True}})
    s = body.sampling
    assert (s.top_k, s.repetition_penalty, s.ignore_eos, s.stop_token_ids, s.max_new_tokens) == (5, 1.1, True, (2,), 7)
    assert (body.n, body.logprobs, s.logprobs, body.include_usage, s.temperature) == (2, 3, 3, True, 1.0)


@pytest.mark.parametrize("extra, constraint", [
    ({"response_format": {"type": "json_object"}}, Constraint("json_object")),
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "integer"}}}},
     Constraint("json_schema", spec=json.dumps({"type": "integer"}))),
    ({"guided_json": {"type": "integer"}}, Constraint("json_schema", spec=json.dumps({"type": "integer"}))),
    ({"guided_regex": "[0-9]+"}, Constraint("regex", spec="[0-9]+")),
    ({"guided_choice": ["a", "b"]}, Constraint("choice", choices=("a", "b"))),
    ({"guided_grammar": 'root ::= "x"'}, Constraint("grammar", spec='root ::= "x"')),
])
def test_response_format_and_guided_extras_map_to_one_engine_constraint(extra, constraint):
    assert schemas.completion_body({"model": "m", "prompt": "p", **extra}).sampling.constraint == constraint


def test_prompt_forms():
    assert len(schemas.completion_body({"model": "m", "prompt": ["a", "b"]}).prompts) == 2
    assert schemas.completion_body({"model": "m", "prompt": [1, 2]}).prompts[0].token_ids == (1, 2)
    assert len(schemas.completion_body({"model": "m", "prompt": [[1], [2, 3]]}).prompts) == 2
    for bad in ("", [], ["a", [1]], [-1], None):
        with pytest.raises(InvalidRequestError):
            schemas.completion_body({"model": "m", "prompt": bad})


@pytest.mark.parametrize("exc, status, kind, retry", [
    (InvalidRequestError("sampling.top_p", "must be in (0, 1]"), 400, "invalid_request_error", None),
    (AuthenticationError("no key"), 401, "authentication_error", None),
    (AdapterNotFoundError("x"), 404, "not_found_error", None),
    (DuplicateRequestError("r"), 409, "conflict_error", None),
    (QueueFullError("full"), 429, "rate_limit_error", "1"),
    (RateLimitError("slow down", 2.2), 429, "rate_limit_error", "3"),
    (EngineStoppedError("draining"), 503, "service_unavailable_error", None),
    (RuntimeError("boom"), 500, "internal_error", None),
])
def test_error_statuses_follow_the_grpc_table(exc, status, kind, retry):
    from loraplex_server.api.errors import status_for

    response = error_response(Failure(status_for(exc), str(exc), retry_after(exc), exc), "rid")
    body = json.loads(response.body)["error"]
    assert (response.status_code, body["type"], response.headers.get("retry-after")) == (status, kind, retry)
    assert set(body) == {"message", "type", "param", "code"} and response.headers["x-request-id"] == "rid"
    if isinstance(exc, InvalidRequestError):
        assert body["param"] == "top_p" and body["message"].startswith("top_p:")
    if isinstance(exc, AdapterNotFoundError):
        assert body["code"] == "model_not_found"


def test_http_port_and_host_from_flags_file_and_env(tmp_path):
    from loraplex_server.cli import build_parser, flag_values
    from loraplex_server.config import load_config

    assert load_config(environ={}).server.http_port == 8000
    toml = tmp_path / "c.toml"
    toml.write_text('[server]\nhttp_port = 8100\nhost = "10.0.0.1"\n')
    cfg = load_config(config_file=toml, environ={})
    assert (cfg.server.http_port, cfg.server.resolved_http_host) == (8100, "10.0.0.1")  # --http-host defaults to --host
    assert load_config(config_file=toml, environ={"LORAPLEX_HTTP_PORT": "-1"}).server.http_port == -1
    args = build_parser().parse_args(["--http-port", "0", "--http-host", "127.0.0.1"])
    cfg = load_config(flag_values(args), toml, environ={"LORAPLEX_HTTP_PORT": "-1"})
    assert (cfg.server.http_port, cfg.server.resolved_http_host) == (0, "127.0.0.1")


def test_a_taken_http_port_fails_start_up_with_a_loraplex_error():
    import asyncio
    import socket

    from loraplex_server.api.server import LoraplexServer
    from loraplex_server.config import Config, ServerConfig
    from loraplex_server.errors import LoraplexError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = Config(server=ServerConfig(host="127.0.0.1", port=0, metrics_port=-1,
                                            http_port=taken.getsockname()[1]))
        server = LoraplexServer(config, engine_factory=lambda cfg: pytest.fail("no model load"))
        with pytest.raises(LoraplexError, match="cannot serve HTTP"):
            asyncio.run(server.start())
