"""Building ``GenerateRequest`` messages from the client's keyword arguments.

Sampling fields the caller leaves as ``None`` are left unset on the wire, so the server applies
its documented defaults (proto3 zero = unset).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from loraplex._convert import chat_message_to_proto
from loraplex.types import ChatMessage
from loraplex.v1 import loraplex_pb2 as pb

MessageLike = ChatMessage | tuple[str, str] | Mapping[str, str]


def to_chat_message(item: Any) -> ChatMessage:
    """Accept a :class:`ChatMessage`, a ``(role, content)`` pair or a ``{"role", "content"}`` dict."""
    if isinstance(item, ChatMessage):
        return item
    if isinstance(item, Mapping):
        try:
            return ChatMessage(role=str(item["role"]), content=str(item["content"]))
        except KeyError as exc:
            raise ValueError(f"chat message dict is missing {exc.args[0]!r}: {item!r}") from None
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return ChatMessage(role=str(item[0]), content=str(item[1]))
    raise TypeError(
        f"a chat message must be a ChatMessage, a (role, content) pair or a dict, not {item!r}"
    )


def normalize_messages(messages: Iterable[MessageLike]) -> list[ChatMessage]:
    """Convert every message of a conversation with :func:`to_chat_message`."""
    if isinstance(messages, (str, bytes, Mapping)):
        raise TypeError("messages must be a sequence of messages, not a single value")
    return [to_chat_message(item) for item in messages]


def _check_count(name: str, value: int | None, minimum: int = 0) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _as_strings(stop: str | Sequence[str] | None) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):  # one stop string, not its characters
        return [stop]
    return list(stop)


def build_sampling(
    *,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    stop: str | Sequence[str] | None = None,
    stop_token_ids: Sequence[int] | None = None,
    seed: int | None = None,
    ignore_eos: bool = False,
    logprobs: int = 0,
    json_schema: str | Mapping[str, Any] | None = None,
    regex: str | None = None,
    choice: Sequence[str] | None = None,
    grammar: str | None = None,
    json_object: bool = False,
) -> pb.SamplingParams:
    """Return ``SamplingParams`` with only the given fields set.

    ``max_new_tokens`` must be at least 1 because 0 on the wire means "the server default".
    At most one structured-output constraint (``json_schema``, ``regex``, ``choice``, ``grammar``,
    ``json_object``) may be given; the server checks that it compiles.
    """
    _check_count("max_new_tokens", max_new_tokens, minimum=1)
    _check_count("top_k", top_k)
    _check_count("seed", seed)
    _check_count("logprobs", logprobs)
    params = pb.SamplingParams(stop=_as_strings(stop), stop_token_ids=list(stop_token_ids or ()),
                               ignore_eos=bool(ignore_eos), logprobs=logprobs)
    for name, value in (("max_new_tokens", max_new_tokens), ("temperature", temperature),
                        ("top_p", top_p), ("top_k", top_k),
                        ("repetition_penalty", repetition_penalty), ("seed", seed)):
        if value is not None:
            setattr(params, name, value)
    set_constraint(params, json_schema=json_schema, regex=regex, choice=choice, grammar=grammar,
                   json_object=json_object)
    return params


def set_constraint(params: pb.SamplingParams, *, json_schema: str | Mapping[str, Any] | None = None,
                   regex: str | None = None, choice: Sequence[str] | None = None, grammar: str | None = None,
                   json_object: bool = False) -> None:
    """Set the ``constraint`` oneof from at most one of the keyword arguments."""
    given = [name for name, value in (("json_schema", json_schema), ("regex", regex), ("choice", choice),
                                      ("grammar", grammar)) if value is not None]
    given += ["json_object"] if json_object else []
    if len(given) > 1:
        raise ValueError(f"give at most one constraint (got {', '.join(given)})")
    if json_schema is not None:
        params.json_schema = json_schema if isinstance(json_schema, str) else json.dumps(json_schema)
    elif regex is not None:
        params.regex = regex
    elif choice is not None:
        if isinstance(choice, str):
            raise TypeError("choice must be a sequence of strings, not one string")
        params.choice.SetInParent()  # an empty list still selects the oneof (the server refuses it)
        params.choice.choices.extend(choice)
    elif grammar is not None:
        params.grammar = grammar
    elif json_object:
        params.json_object = True


def _set_input(request: pb.GenerateRequest, prompt: str | None,
               messages: Iterable[MessageLike] | None, token_ids: Sequence[int] | None) -> None:
    given = [name for name, value in (("prompt", prompt), ("messages", messages),
                                      ("token_ids", token_ids)) if value is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of prompt, messages or token_ids (got {given or 'none'})")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, not {type(prompt).__name__}")
        request.prompt = prompt
    elif messages is not None:
        request.messages.SetInParent()  # an empty conversation still selects the oneof
        request.messages.messages.extend(chat_message_to_proto(m) for m in normalize_messages(messages))
    else:
        request.prompt_token_ids.SetInParent()
        request.prompt_token_ids.ids.extend(token_ids)


def build_generate_request(
    prompt: str | None = None,
    *,
    messages: Iterable[MessageLike] | None = None,
    token_ids: Sequence[int] | None = None,
    adapter_id: str = "",
    request_id: str = "",
    **sampling: Any,
) -> pb.GenerateRequest:
    """Return a ``GenerateRequest``; exactly one of prompt, messages or token_ids must be given.

    ``sampling`` takes the keyword arguments of :func:`build_sampling`.
    """
    request = pb.GenerateRequest(adapter_id=adapter_id or "", request_id=request_id or "")
    _set_input(request, prompt, messages, token_ids)
    request.sampling.CopyFrom(build_sampling(**sampling))
    return request
