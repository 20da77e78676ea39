"""OpenAI (and vLLM-extra) request bodies -> engine types, with 400s that name the field.

Plain dict checks rather than models: every field the engine cannot honour is refused by name
(``tools``, image parts, ``audio`` ...), unknown fields are refused too, and the few OpenAI fields
with a no-op value (``frequency_penalty: 0``, ``echo: false``, ``logit_bias: {}``) are accepted
only with that value. Nothing is silently ignored.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from ...engine.request import DEFAULT_MAX_NEW_TOKENS, ChatMessage, Constraint, Prompt, SamplingParams
from ...errors import InvalidRequestError

MAX_N = 16
MAX_PROMPTS = 64
MAX_STOP = 16
COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "stream_options",
          "user", "top_k", "repetition_penalty", "ignore_eos", "stop_token_ids", "response_format",
          "guided_json", "guided_regex", "guided_choice", "guided_grammar", "request_id"}
COMPLETION_FIELDS = COMMON | {"prompt", "logprobs"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}
# field -> the values that mean "not used"; any other value is refused as unsupported
NEUTRAL: dict[str, tuple] = {
           "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logit_bias": ({},), "echo": (False,),
           "suffix": ("",), "best_of": (1,), "tools": ([],), "tool_choice": ("none",), "functions": ([],),
           "function_call": ("none",), "parallel_tool_calls": (True, False), "modalities": (["text"],),
           "audio": (), "prediction": (), "store": (False,), "metadata": ({},), "service_tier": ("auto",)}
ROLES = ("system", "user", "assistant", "developer")


@dataclass(frozen=True)
class GenerationBody:
    """A parsed completions or chat body: prompts (each run ``n`` times) and sampling."""

    model: str
    prompts: tuple[Prompt, ...]
    sampling: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None  # top-n to report per token (0: only the sampled token's); None = off
    request_id: str | None


def bad(field: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(field, message)


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad("body", f"is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise bad("body", "must be a JSON object")
    return body


def _check_fields(body: dict, allowed: set[str]) -> None:
    for name, value in body.items():
        if name in allowed or value is None:
            continue
        if name in NEUTRAL:
            if value not in NEUTRAL[name]:
                raise bad(name, "is not supported by this server")
            continue
        raise bad(name, "is not a supported field")


def _number(body: dict, name: str, default, lo=None, hi=None, integer=False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise bad(name, f"must be {'an integer' if integer else 'a number'}")
    if not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        raise bad(name, f"must be in [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]")
    return value


def _bool(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(name, "must be a boolean")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise bad("stop", f"must be a non-empty string or a list of at most {MAX_STOP} of them")
    return tuple(stops)


def _int_list(body: dict, name: str) -> tuple[int, ...]:
    value = body.get(name)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        raise bad(name, "must be a list of non-negative integers")
    return tuple(value)


def constraint_of(body: dict) -> Constraint | None:
    """``response_format`` (OpenAI) or one of vLLM's ``guided_*`` extras, as the engine's constraint."""
    given = [k for k in ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar")
             if body.get(k) is not None]
    if len(given) > 1:
        raise bad(given[1], f"cannot be combined with {given[0]}")
    if not given:
        return None
    name, value = given[0], body[given[0]]
    if name == "response_format":
        return _response_format(value)
    if name == "guided_json":
        if not isinstance(value, (dict, str)):
            raise bad(name, "must be a JSON schema (object or string)")
        return Constraint("json_schema", spec=value if isinstance(value, str) else json.dumps(value))
    if name == "guided_choice":
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise bad(name, "must be a list of strings")
        return Constraint("choice", choices=tuple(value))
    if not isinstance(value, str):
        raise bad(name, "must be a string")
    return Constraint("regex" if name == "guided_regex" else "grammar", spec=value)


def _response_format(value) -> Constraint | None:
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json_object")
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise bad("response_format.json_schema.schema", "must be a JSON schema object")
        return Constraint("json_schema", spec=json.dumps(schema))
    raise bad("response_format.type", "must be text, json_object or json_schema")


def sampling_of(body: dict, max_tokens_field: str, logprobs: int | None) -> SamplingParams:
    seed = _number(body, "seed", None, 0, 2**63 - 1, integer=True)
    return SamplingParams(
        max_new_tokens=_number(body, max_tokens_field, None, 1, integer=True)
        or _number(body, "max_tokens", DEFAULT_MAX_NEW_TOKENS, 1, integer=True),
        temperature=float(_number(body, "temperature", 1.0, 0, 2)),  # OpenAI's default (gRPC's is 0)
        top_p=float(_number(body, "top_p", 1.0, 0, 1)),
        top_k=max(0, _number(body, "top_k", 0, -1, integer=True)),
        repetition_penalty=float(_number(body, "repetition_penalty", 1.0, 0)),
        stop=_stop(body), stop_token_ids=_int_list(body, "stop_token_ids"), seed=seed,
        ignore_eos=_bool(body, "ignore_eos"),
        logprobs=0 if logprobs is None else max(1, logprobs),  # the engine reports the sampled token's with any top-n
        constraint=constraint_of(body))


def _common(body: dict, prompts: tuple[Prompt, ...], max_tokens_field: str, logprobs: int | None) -> GenerationBody:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "is required (the base model or an adapter id)")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise bad("stream_options", "only include_usage is supported")
    stream = _bool(body, "stream")
    if options is not None and not stream:
        raise bad("stream_options", "is only allowed with stream: true")
    request_id = body.get("request_id")
    if request_id is not None and not isinstance(request_id, str):
        raise bad("request_id", "must be a string")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad("user", "must be a string")
    n = _number(body, "n", 1, 1, MAX_N, integer=True)
    sampling = sampling_of(body, max_tokens_field, logprobs)
    return GenerationBody(model, prompts, sampling, n, stream, bool(options and options.get("include_usage")),
                          logprobs, request_id)


def completion_body(body: dict) -> GenerationBody:
    _check_fields(body, COMPLETION_FIELDS)
    logprobs = _number(body, "logprobs", None, 0, SamplingParams.MAX_LOGPROBS, integer=True)
    return _common(body, _prompts(body.get("prompt")), "max_tokens", logprobs)


def _prompts(prompt) -> tuple[Prompt, ...]:
    """A string, a list of strings, a token id list, or a list of token id lists."""
    if isinstance(prompt, str) and prompt:
        return (Prompt(text=prompt),)
    if isinstance(prompt, list) and prompt and len(prompt) <= MAX_PROMPTS:
        if all(isinstance(p, str) and p for p in prompt):
            return tuple(Prompt(text=p) for p in prompt)
        if _is_ids(prompt):
            return (Prompt(token_ids=tuple(prompt)),)
        if all(isinstance(p, list) and p and _is_ids(p) for p in prompt):
            return tuple(Prompt(token_ids=tuple(p)) for p in prompt)
    raise bad("prompt", f"must be a non-empty string, token id list, or a list of up to {MAX_PROMPTS} of either")


def _is_ids(items: list) -> bool:
    return all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in items)


def chat_body(body: dict) -> GenerationBody:
    _check_fields(body, CHAT_FIELDS)
    want = _bool(body, "logprobs")
    top = _number(body, "top_logprobs", None, 0, SamplingParams.MAX_LOGPROBS, integer=True)
    if top is not None and not want:
        raise bad("top_logprobs", "requires logprobs: true")
    return _common(body, (Prompt(messages=_messages(body.get("messages"))),), "max_completion_tokens",
                   (top or 0) if want else None)


def _messages(messages) -> tuple[ChatMessage, ...]:
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, "must be an object")
        for key, value in m.items():
            if key not in ("role", "content", "name") and value is not None:
                raise bad(f"{where}.{key}", "is not supported by this server")
        if m.get("role") not in ROLES:
            raise bad(f"{where}.role", f"must be one of {', '.join(ROLES)}")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append(ChatMessage(role, _content(m.get("content"), where)))
    return tuple(out)


def _content(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise bad(f"{where}.content[{j}].type", f"{kind!r} is not supported (text parts only)")
            texts.append(part["text"])
        return "".join(texts)
    raise bad(f"{where}.content", "must be a string or a list of text parts")
