"""Conversions between the wire messages (``loraplex.v1``) and the public dataclasses.

Both directions are provided: ``*_from_proto`` is what the client uses on responses, and
``*_to_proto`` is for code that has to speak the wire format from the public types (test
doubles, proxies). Enum values travel as lowercase labels: ``FINISH_REASON_STOP`` <-> ``"stop"``.
"""

from __future__ import annotations

from typing import Any, cast

from grpc_health.v1 import health_pb2

from loraplex.types import (
    AdapterInfo,
    ChatMessage,
    GenerateResult,
    ServerInfo,
    StreamChunk,
    TokenLogprob,
    Usage,
)
from loraplex.v1 import loraplex_pb2 as pb

_FINISH_PREFIX = "FINISH_REASON_"
_STATE_PREFIX = "ADAPTER_STATE_"
UNSPECIFIED = "unspecified"


def enum_label(enum: Any, prefix: str, value: int) -> str:
    """Return the lowercase label of an enum value, or ``"unspecified"`` if it is unknown."""
    try:
        name = enum.Name(value)
    except ValueError:  # a value newer than these stubs
        return UNSPECIFIED
    return name.removeprefix(prefix).lower()


def enum_value(enum: Any, prefix: str, label: str) -> int:
    """Return the enum value of a lowercase label; ``ValueError`` names the valid labels."""
    try:
        return enum.Value(prefix + label.upper())
    except ValueError:
        valid = ", ".join(repr(n.removeprefix(prefix).lower()) for n in enum.keys())  # noqa: SIM118 - a protobuf enum wrapper, not a dict: not iterable
        raise ValueError(f"unknown label {label!r}; expected one of {valid}") from None


def finish_reason_from_proto(value: int) -> str:
    """``FINISH_REASON_*`` value -> label (``"length"``, ``"stop"``, ``"eos"``, ``"abort"``...)."""
    return enum_label(pb.FinishReason, _FINISH_PREFIX, value)


def finish_reason_to_proto(label: str | None) -> pb.FinishReason:
    """Label -> ``FINISH_REASON_*`` value; ``None`` is ``FINISH_REASON_UNSPECIFIED``."""
    if label is None:
        return pb.FINISH_REASON_UNSPECIFIED
    return cast(pb.FinishReason, enum_value(pb.FinishReason, _FINISH_PREFIX, label))


def adapter_state_from_proto(value: int) -> str:
    """``ADAPTER_STATE_*`` value -> label (``"disk"``, ``"loading"``, ``"cpu"``, ``"device"``, ``"unspecified"``)."""
    return enum_label(pb.AdapterState, _STATE_PREFIX, value)


def adapter_state_to_proto(label: str) -> pb.AdapterState:
    """Label -> ``ADAPTER_STATE_*`` value."""
    return cast(pb.AdapterState, enum_value(pb.AdapterState, _STATE_PREFIX, label))


def usage_from_proto(msg: pb.Usage) -> Usage:
    """Wire ``Usage`` -> :class:`Usage`."""
    return Usage(prompt_tokens=msg.prompt_tokens, completion_tokens=msg.completion_tokens)


def usage_to_proto(usage: Usage) -> pb.Usage:
    """:class:`Usage` -> wire ``Usage``."""
    return pb.Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens)


def token_logprob_from_proto(msg: pb.TokenLogprob) -> TokenLogprob:
    """Wire ``TokenLogprob`` -> :class:`TokenLogprob` (``top`` as ``(id, logprob)`` pairs)."""
    top = tuple((t.token_id, t.logprob) for t in msg.top)
    return TokenLogprob(token_id=msg.token_id, logprob=msg.logprob, top=top)


def token_logprob_to_proto(value: TokenLogprob) -> pb.TokenLogprob:
    """:class:`TokenLogprob` -> wire ``TokenLogprob``."""
    top = [pb.TopLogprob(token_id=i, logprob=lp) for i, lp in value.top]
    return pb.TokenLogprob(token_id=value.token_id, logprob=value.logprob, top=top)


def _logprobs_from_proto(items: Any) -> tuple[TokenLogprob, ...]:
    return tuple(token_logprob_from_proto(item) for item in items)


def generate_result_from_proto(msg: pb.GenerateResponse) -> GenerateResult:
    """``GenerateResponse`` -> :class:`GenerateResult` (a missing usage reads as zeros)."""
    return GenerateResult(
        text=msg.text,
        token_ids=tuple(msg.token_ids),
        finish_reason=finish_reason_from_proto(msg.finish_reason),
        usage=usage_from_proto(msg.usage),
        adapter_id=msg.adapter_id,
        request_id=msg.request_id,
        logprobs=_logprobs_from_proto(msg.logprobs),
    )


def generate_result_to_proto(result: GenerateResult) -> pb.GenerateResponse:
    """:class:`GenerateResult` -> ``GenerateResponse``."""
    return pb.GenerateResponse(
        text=result.text,
        token_ids=result.token_ids,
        finish_reason=finish_reason_to_proto(result.finish_reason),
        usage=usage_to_proto(result.usage),
        adapter_id=result.adapter_id,
        request_id=result.request_id,
        logprobs=[token_logprob_to_proto(lp) for lp in result.logprobs],
    )


def stream_chunk_from_proto(msg: pb.GenerateStreamResponse) -> StreamChunk:
    """``GenerateStreamResponse`` -> :class:`StreamChunk`.

    ``finish_reason`` is ``None`` while it is ``FINISH_REASON_UNSPECIFIED`` and ``usage`` is
    ``None`` while the field is absent: both are only set on a stream's last chunk.
    """
    finish = None
    if msg.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
        finish = finish_reason_from_proto(msg.finish_reason)
    return StreamChunk(
        text=msg.text,
        token_ids=tuple(msg.token_ids),
        finish_reason=finish,
        usage=usage_from_proto(msg.usage) if msg.HasField("usage") else None,
        adapter_id=msg.adapter_id,
        request_id=msg.request_id,
        logprobs=_logprobs_from_proto(msg.logprobs),
    )


def stream_chunk_to_proto(chunk: StreamChunk) -> pb.GenerateStreamResponse:
    """:class:`StreamChunk` -> ``GenerateStreamResponse`` (``None`` fields stay unset)."""
    msg = pb.GenerateStreamResponse(
        text=chunk.text,
        token_ids=chunk.token_ids,
        finish_reason=finish_reason_to_proto(chunk.finish_reason),
        adapter_id=chunk.adapter_id,
        request_id=chunk.request_id,
        logprobs=[token_logprob_to_proto(lp) for lp in chunk.logprobs],
    )
    if chunk.usage is not None:
        msg.usage.CopyFrom(usage_to_proto(chunk.usage))
    return msg


def adapter_info_from_proto(msg: pb.AdapterInfo) -> AdapterInfo:
    """Wire ``AdapterInfo`` -> :class:`AdapterInfo`."""
    return AdapterInfo(
        adapter_id=msg.adapter_id,
        rank=msg.rank,
        target_modules=tuple(msg.target_modules),
        state=adapter_state_from_proto(msg.state),
        pinned=msg.pinned,
        request_count=msg.request_count,
        source=msg.source,
        size_bytes=msg.size_bytes,
        version=msg.version,
        last_used_unix=msg.last_used_unix,
        load_latency_s=msg.load_latency_s,
        owner=msg.owner,
        error=msg.error,
        load_attempts=msg.load_attempts,
        retrying=msg.retrying,
        content_sha256=msg.content_sha256,
        source_bytes=msg.source_bytes,
        source_mtime_unix=msg.source_mtime_unix,
    )


def adapter_info_to_proto(info: AdapterInfo) -> pb.AdapterInfo:
    """:class:`AdapterInfo` -> wire ``AdapterInfo``."""
    return pb.AdapterInfo(
        adapter_id=info.adapter_id,
        rank=info.rank,
        target_modules=info.target_modules,
        state=adapter_state_to_proto(info.state),
        pinned=info.pinned,
        request_count=info.request_count,
        source=info.source,
        size_bytes=info.size_bytes,
        version=info.version,
        last_used_unix=info.last_used_unix,
        load_latency_s=info.load_latency_s,
        owner=info.owner,
        error=info.error,
        load_attempts=info.load_attempts,
        retrying=info.retrying,
        content_sha256=info.content_sha256,
        source_bytes=info.source_bytes,
        source_mtime_unix=info.source_mtime_unix,
    )


_SERVER_INFO_FIELDS = (
    "model", "dtype", "device", "max_loras", "max_lora_rank", "context_length", "version",
    "max_cpu_loras", "kv_cache_tokens", "prefix_caching", "lora_pool_rows", "lora_pool_bytes", "kv_cache_bytes",
    "memory_pool",
)


def server_info_from_proto(msg: pb.GetServerInfoResponse) -> ServerInfo:
    """``GetServerInfoResponse`` -> :class:`ServerInfo`."""
    return ServerInfo(**{name: getattr(msg, name) for name in _SERVER_INFO_FIELDS})


def server_info_to_proto(info: ServerInfo) -> pb.GetServerInfoResponse:
    """:class:`ServerInfo` -> ``GetServerInfoResponse``."""
    return pb.GetServerInfoResponse(**{name: getattr(info, name) for name in _SERVER_INFO_FIELDS})


def chat_message_from_proto(msg: pb.ChatMessage) -> ChatMessage:
    """Wire ``ChatMessage`` -> :class:`ChatMessage`."""
    return ChatMessage(role=msg.role, content=msg.content)


def chat_message_to_proto(message: ChatMessage) -> pb.ChatMessage:
    """:class:`ChatMessage` -> wire ``ChatMessage``."""
    return pb.ChatMessage(role=message.role, content=message.content)


def serving_status_name(value: int) -> str:
    """A ``grpc.health.v1`` serving status value -> its name, e.g. ``"SERVING"``."""
    try:
        return health_pb2.HealthCheckResponse.ServingStatus.Name(value)
    except ValueError:  # a status newer than these stubs
        return "UNKNOWN"
