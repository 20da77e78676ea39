"""``POST /v1/completions`` and ``POST /v1/chat/completions``: parse, open one engine request per
choice (``n`` per prompt) through the service layer, answer whole or as Server-Sent Events."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ...engine.loop import merge_outputs
from ...engine.request import RequestOutput
from ...lora.ids import AdapterId
from .. import convert
from ..calls import Call, check_final
from ..service import Generation, LoraplexService
from . import responses as r
from . import schemas
from .errors import error_body, error_response
from .sse import DONE, SSEResponse, event, interleave


@dataclasses.dataclass
class Job:
    """One completions or chat request in flight: what was asked and how to answer it."""

    chat: bool
    body: schemas.GenerationBody
    call: Call
    generations: list[Generation]
    text: r.TokenText
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    @property
    def id(self) -> str:
        return ("chatcmpl-" if self.chat else "cmpl-") + self.call.request_id

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def logprobs(self, out: RequestOutput, offset: int) -> dict | None:
        if self.body.logprobs is None:
            return None
        if self.chat:
            return r.chat_logprobs(out.logprobs, self.body.logprobs, self.text)
        return r.completion_logprobs(out.logprobs, self.body.logprobs, self.text, offset)

    def choice(self, index: int, out: RequestOutput, offset: int = 0, delta: bool = False) -> dict:
        content = {"index": index, "logprobs": self.logprobs(out, offset), "finish_reason": r.finish_reason(out)}
        if not self.chat:
            content["text"] = out.text
        elif delta:
            content["delta"] = {"content": out.text} if out.text else {}
        else:
            content["message"] = {"role": "assistant", "content": out.text}
        return content

    def envelope(self, choices: list[dict], chunk: bool = False, **extra) -> dict:
        kind = "chat.completion.chunk" if chunk and self.chat else self.object
        return {"id": self.id, "object": kind, "created": self.created, "model": self.body.model,
                "choices": choices, **extra}


async def generation_response(request: Request, service: LoraplexService, call: Call, raw: bytes,
                              chat: bool) -> Response:
    """The whole route once the caller is authenticated; every error becomes OpenAI's error JSON."""
    try:
        job = await _open(request, service, call, raw, chat)
    except Exception as exc:  # noqa: BLE001 - mapped to a status in one place
        return error_response(call.failure(exc), call.request_id)
    headers = {"x-request-id": call.request_id}
    if job.body.stream:
        return SSEResponse(_events(job), headers=headers)
    return await _whole(request, job, headers)


async def _open(request: Request, service: LoraplexService, call: Call, raw: bytes, chat: bool) -> Job:
    body = (schemas.chat_body if chat else schemas.completion_body)(schemas.parse_json(raw))
    call.method = "GenerateStream" if body.stream else "Generate"
    call.request_id = (convert.check_id("request_id", body.request_id or request.headers.get("x-request-id", ""),
                                        required=False) or uuid.uuid4().hex)
    adapter_id = None if body.model == service.model_name() else AdapterId(body.model)
    call.adapter_id = adapter_id or ""
    service.check_model(call, adapter_id)
    body.sampling.validate()
    generations: list[Generation] = []
    try:
        total = len(body.prompts) * body.n
        for k in range(total):
            sampling = body.sampling
            if sampling.seed is not None and k % body.n:  # n seeded choices: n different samples
                sampling = dataclasses.replace(sampling, seed=(sampling.seed + k % body.n) % 2**63)
            rid = call.request_id if total == 1 else f"{call.request_id}-{k}"
            generations.append(await service.open(call, body.prompts[k // body.n], sampling, adapter_id, rid))
    except BaseException:
        for generation in generations:
            generation.cancel()
        raise
    return Job(chat, body, call, generations, r.TokenText(service.decoder()))


async def _collect(job: Job) -> list[RequestOutput]:
    deltas: list[list[RequestOutput]] = [[] for _ in job.generations]
    async for index, out in interleave(job.generations):
        deltas[index].append(out)
    finals = [merge_outputs(d) for d in deltas]
    for final in finals:
        check_final(final)
    return finals


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _whole(request: Request, job: Job, headers: dict) -> Response:
    """Wait for every choice (aborting them all if the client goes away); one JSON response."""
    collecting = asyncio.ensure_future(_collect(job))
    watching = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({collecting, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        gone = not collecting.done()
        if gone:
            collecting.cancel()  # its interleave() cancels every choice: aborted, KV freed
    if gone:
        job.call.cancelled()
        return Response(status_code=499)  # nobody reads it
    try:
        finals = collecting.result()
    except Exception as exc:  # noqa: BLE001
        return error_response(job.call.failure(exc), job.call.request_id)
    job.call.ok(finals[0])
    choices = [job.choice(i, out) for i, out in enumerate(finals)]
    return JSONResponse(job.envelope(choices, usage=r.total_usage(finals, job.body.n)), headers=headers)


async def _events(job: Job):
    """SSE events: per-choice deltas, then (with include_usage) a usage chunk, then [DONE]."""
    body = job.body
    offsets = [0] * len(job.generations)
    finals: list[RequestOutput | None] = [None] * len(job.generations)
    deltas = interleave(job.generations)
    try:
        if job.chat:
            yield event(job.envelope([{"index": i, "delta": {"role": "assistant", "content": ""},
                                       "logprobs": None, "finish_reason": None}
                                      for i in range(len(job.generations))], chunk=True))
        async for index, out in deltas:
            if out.finished:
                check_final(out)
                finals[index] = out
            if out.text or out.token_ids or out.finished:
                chunk = job.choice(index, out, offsets[index], delta=True)
                yield event(job.envelope([chunk], chunk=True))
            offsets[index] += len(out.text)
        job.call.ok(finals[0])
        if body.include_usage:
            yield event(job.envelope([], chunk=True, usage=r.total_usage([f for f in finals if f is not None], body.n)))
    except (asyncio.CancelledError, GeneratorExit):  # the client went away: every choice is aborted
        job.call.cancelled()
        raise
    except Exception as exc:  # noqa: BLE001 - the status is sent already: the error travels as an event
        yield event(error_body(job.call.failure(exc))[1])
    finally:
        await deltas.aclose()  # cancels whatever choice is still running
        for generation in job.generations:  # (also those of a stream closed before its first delta)
            generation.cancel()
    yield DONE
