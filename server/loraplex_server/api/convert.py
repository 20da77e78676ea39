"""Protobuf <-> engine types. Protobuf stops here: the engine never sees a generated message."""

from __future__ import annotations

import re
import uuid

from loraplex.v1 import loraplex_pb2 as pb

from ..engine.request import (
    DEFAULT_MAX_NEW_TOKENS,
    ChatMessage,
    Constraint,
    FinishReason,
    Prompt,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
)
from ..errors import InvalidRequestError
from ..lora.weights import AdapterInfo

MAX_REQUEST_ID_LEN = 128
_ID = re.compile(r"^[A-Za-z0-9._:@/-]+$")
_FINISH: dict[FinishReason | None, pb.FinishReason] = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}
_STATE = {"disk": pb.ADAPTER_STATE_DISK, "cpu": pb.ADAPTER_STATE_CPU, "device": pb.ADAPTER_STATE_DEVICE,
          "loading": pb.ADAPTER_STATE_LOADING}


def check_id(field: str, value: str, required: bool = True) -> str:
    if not value:
        if required:
            raise InvalidRequestError(field, "is required")
        return value
    if len(value) > MAX_REQUEST_ID_LEN or not _ID.match(value):
        raise InvalidRequestError(field, f"must be 1-{MAX_REQUEST_ID_LEN} characters of [A-Za-z0-9._:@/-]")
    return value


def sampling_from_proto(sp: pb.SamplingParams) -> SamplingParams:
    """Unset (zero) fields take the documented defaults."""
    return SamplingParams(
        max_new_tokens=sp.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        temperature=sp.temperature,
        top_k=sp.top_k,
        top_p=sp.top_p if sp.top_p != 0 else 1.0,
        repetition_penalty=sp.repetition_penalty if sp.repetition_penalty != 0 else 1.0,
        stop=tuple(sp.stop),
        stop_token_ids=tuple(sp.stop_token_ids),
        seed=sp.seed if sp.HasField("seed") else None,
        ignore_eos=sp.ignore_eos,
        logprobs=sp.logprobs,
        constraint=constraint_from_proto(sp),
    )


def constraint_from_proto(sp: pb.SamplingParams) -> Constraint | None:
    """The ``constraint`` oneof (``json_object: false`` means none)."""
    kind = sp.WhichOneof("constraint")
    if kind is None or (kind == "json_object" and not sp.json_object):
        return None
    if kind == "choice":
        return Constraint("choice", choices=tuple(sp.choice.choices))
    if kind == "json_object":
        return Constraint("json_object")
    return Constraint(kind, spec=getattr(sp, kind))


def prompt_from_proto(req: pb.GenerateRequest) -> Prompt:
    kind = req.WhichOneof("input")
    if kind is None:
        raise InvalidRequestError("input", "one of prompt, messages or prompt_token_ids is required")
    if kind == "prompt":
        if not req.prompt:
            raise InvalidRequestError("prompt", "the prompt is empty")
        return Prompt(text=req.prompt)
    if kind == "messages":
        if not req.messages.messages:
            raise InvalidRequestError("messages", "no messages given")
        return Prompt(messages=tuple(ChatMessage(m.role, m.content) for m in req.messages.messages))
    if not req.prompt_token_ids.ids:
        raise InvalidRequestError("prompt_token_ids", "no token ids given")
    return Prompt(token_ids=tuple(req.prompt_token_ids.ids))


def request_id_of(req: pb.GenerateRequest) -> str:
    return check_id("request_id", req.request_id, required=False) or uuid.uuid4().hex


def _logprobs(items: tuple[TokenLogprob, ...]) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                            top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top]) for lp in items]


def stream_chunk(out: RequestOutput, adapter_id: str) -> pb.GenerateStreamResponse:
    chunk = pb.GenerateStreamResponse(text=out.text, token_ids=list(out.token_ids), adapter_id=adapter_id,
                                      request_id=out.request_id, logprobs=_logprobs(out.logprobs))
    if out.finished:
        chunk.finish_reason = _FINISH.get(out.finish_reason, pb.FINISH_REASON_UNSPECIFIED)
        chunk.usage.CopyFrom(pb.Usage(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens))
    return chunk


def full_response(merged: RequestOutput, adapter_id: str) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        text=merged.text, token_ids=list(merged.token_ids),
        finish_reason=_FINISH.get(merged.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
        usage=pb.Usage(prompt_tokens=merged.prompt_tokens, completion_tokens=merged.completion_tokens),
        adapter_id=adapter_id, request_id=merged.request_id, logprobs=_logprobs(merged.logprobs))


def adapter_info(info: AdapterInfo) -> pb.AdapterInfo:
    m, fp = info.meta, info.fingerprint
    return pb.AdapterInfo(adapter_id=m.adapter_id, rank=m.rank, target_modules=list(m.target_modules),
                          state=_STATE[info.state], pinned=info.pinned, request_count=info.request_count,
                          source=str(m.source), size_bytes=m.size_bytes, version=info.version,
                          last_used_unix=info.last_used or 0.0, load_latency_s=info.load_latency_s or 0.0,
                          owner=info.owner or "", error=info.error or "", load_attempts=info.load_attempts,
                          retrying=info.retrying, content_sha256=fp.sha256 if fp else "",
                          source_bytes=fp.size_bytes if fp else 0, source_mtime_unix=fp.mtime if fp else 0.0)


def unrestored_adapter_info(entry, error: str) -> pb.AdapterInfo:
    """A stored registration (``adapter_store.StoredAdapter``) whose restore failed at start-up."""
    return pb.AdapterInfo(adapter_id=entry.adapter_id, source=entry.source, version=entry.version,
                          pinned=entry.pinned, owner=entry.owner or "", state=pb.ADAPTER_STATE_DISK,
                          error=f"not restored at start-up: {error}")
