"""The gRPC service: validates and converts at the edge, talks to the engine loop, maps errors.

Nothing here blocks the event loop: tokenization and adapter reads run in worker threads, engine
state is read on the engine thread (``EngineLoop.call``), and deltas arrive through async queues.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass

import grpc
from loraplex.v1 import loraplex_pb2 as pb
from loraplex.v1 import loraplex_pb2_grpc as pb_grpc

from .. import __version__
from ..engine.loop import EngineLoop, merge_outputs
from ..engine.request import FinishReason, RequestOutput
from ..errors import (AdapterLoadError, AdapterUnavailableError, EngineStoppedError, InvalidRequestError,
                      LoraplexError)
from ..metrics import Metrics
from . import convert
from .errors import status_for

log = logging.getLogger("loraplex.requests")


class EngineFailure(LoraplexError):
    """The engine ended a request with an internal error."""


@dataclass
class ServingState:
    metrics: Metrics
    loop: EngineLoop | None = None  # None until the model is loaded and warmed up
    draining: bool = False

    def engine_loop(self) -> EngineLoop:
        if self.draining:
            raise EngineStoppedError("the server is shutting down")
        if self.loop is None:
            raise EngineStoppedError("the model is still loading")
        return self.loop


class RpcCall:
    """Bookkeeping of one RPC: status metric, one structured log line, error -> status code."""

    def __init__(self, method: str, state: ServingState, adapter_id: str = "", request_id: str = ""):
        self.method, self.state = method, state
        self.adapter_id, self.request_id = adapter_id, request_id
        self.start = time.monotonic()

    def _log(self, status: str, output: RequestOutput | None = None, error: str = "") -> None:
        self.state.metrics.record_rpc(self.method, status, self.adapter_id)
        fields = {"event": "rpc", "method": self.method, "status": status, "adapter": self.adapter_id or None,
                  "request_id": self.request_id or None, "duration_s": round(time.monotonic() - self.start, 4)}
        if output is not None:
            t = output.timings
            fields.update(prompt_tokens=output.prompt_tokens, completion_tokens=output.completion_tokens,
                          finish_reason=output.finish_reason.value if output.finish_reason else None,
                          ttft_s=round(t.time_to_first_token, 4) if t and t.time_to_first_token else None,
                          queue_s=round(t.queue_wait, 4) if t and t.queue_wait is not None else None)
        if error:
            fields["error"] = error
        log.info("%s %s", self.method, status, extra={"fields": fields})

    def ok(self, output: RequestOutput | None = None) -> None:
        self._log("OK", output)

    def cancelled(self) -> None:
        self._log("CANCELLED")

    async def fail(self, context: grpc.aio.ServicerContext, exc: Exception) -> None:
        code = status_for(exc)
        if code is grpc.StatusCode.INTERNAL and not isinstance(exc, EngineFailure):
            log.exception("internal error in %s (request id %s)", self.method, self.request_id or "-")
            details = f"internal error (request id {self.request_id or '-'})"
        else:
            details = str(exc)
        self._log(code.name, error=details)
        await context.abort(code, details)


def check_final(out: RequestOutput) -> None:
    if out.finish_reason is FinishReason.ERROR:
        if out.error_kind == "adapter_unavailable":
            raise AdapterUnavailableError(out.adapter_id or "", out.error or "load failed")
        raise EngineFailure(out.error or "the engine failed this request")
    if out.finish_reason is FinishReason.ABORT:
        raise EngineStoppedError("the request was aborted by the server")


def admin_rpc(body):
    """A unary handler from ``body(self, request) -> response``: status mapping and the RPC log line."""
    @functools.wraps(body)
    async def handler(self, request, context):
        call = RpcCall(body.__name__, self.state, getattr(request, "adapter_id", ""))
        try:
            response = await body(self, request)
        except Exception as exc:  # noqa: BLE001 - mapped to a status code in one place
            await call.fail(context, exc)
            return None
        call.ok()
        return response
    return handler


class LoraplexServicer(pb_grpc.LoraplexServiceServicer):
    def __init__(self, state: ServingState):
        self.state = state

    async def _submit(self, request: pb.GenerateRequest, call: RpcCall):
        loop = self.state.engine_loop()
        call.request_id = convert.request_id_of(request)
        prompt = convert.prompt_from_proto(request)
        sampling = convert.sampling_from_proto(request.sampling)
        return await asyncio.to_thread(loop.submit, prompt, sampling, request.adapter_id or None, call.request_id)

    async def Generate(self, request, context):
        call = RpcCall("Generate", self.state, request.adapter_id)
        try:
            stream = await self._submit(request, call)
            merged = merge_outputs([d async for d in stream])
            check_final(merged)
            call.ok(merged)
            return convert.full_response(merged, request.adapter_id)
        except asyncio.CancelledError:
            call.cancelled()
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status code in one place
            await call.fail(context, exc)

    async def GenerateStream(self, request, context):
        call = RpcCall("GenerateStream", self.state, request.adapter_id)
        try:
            stream = await self._submit(request, call)
            async for out in stream:
                if out.finished:
                    check_final(out)
                    call.ok(out)
                yield convert.stream_chunk(out, request.adapter_id)
        except asyncio.CancelledError:
            call.cancelled()
            raise
        except Exception as exc:  # noqa: BLE001
            await call.fail(context, exc)

    @admin_rpc
    async def LoadAdapter(self, request):
        adapter_id = convert.check_id("adapter_id", request.adapter_id)
        if not request.source:
            raise InvalidRequestError("source", "is required")
        loop = self.state.engine_loop()
        await self._load(loop, adapter_id, request.source)
        if request.pin:
            await asyncio.wrap_future(loop.call(lambda e: e.pin_adapter(adapter_id)))
        info = await self._info(loop, adapter_id)
        return pb.LoadAdapterResponse(adapter=convert.adapter_info(info))

    async def _load(self, loop: EngineLoop, adapter_id: str, source: str) -> None:
        start = time.perf_counter()
        try:
            await asyncio.to_thread(loop.add_adapter, adapter_id, source)
        except AdapterLoadError:
            self.state.metrics.adapter_load_failures.inc()
            raise
        self.state.metrics.adapter_load_seconds.observe(time.perf_counter() - start)

    @staticmethod
    async def _info(loop: EngineLoop, adapter_id: str | None = None):
        infos = await asyncio.wrap_future(loop.call(lambda e: e.lora.info()))
        return infos if adapter_id is None else next(i for i in infos if i.meta.adapter_id == adapter_id)

    @admin_rpc
    async def UnloadAdapter(self, request):
        adapter_id = convert.check_id("adapter_id", request.adapter_id)
        await asyncio.wrap_future(self.state.engine_loop().remove_adapter(adapter_id))
        return pb.UnloadAdapterResponse()

    @admin_rpc
    async def ListAdapters(self, request):
        infos = await self._info(self.state.engine_loop())
        return pb.ListAdaptersResponse(adapters=[convert.adapter_info(i) for i in infos])

    @admin_rpc
    async def GetServerInfo(self, request):
        engine = self.state.engine_loop().engine
        cfg = engine.config
        return pb.GetServerInfoResponse(
            model=engine.loaded.name, dtype=str(engine.loaded.dtype).removeprefix("torch."),
            device=str(engine.loaded.device), max_loras=cfg.lora.max_loras,
            max_lora_rank=cfg.lora.max_lora_rank, context_length=engine.inputs.max_model_len,
            version=__version__, max_cpu_loras=cfg.lora.max_cpu_loras,
            kv_cache_tokens=engine.blocks.capacity_tokens)
