"""Per-call plumbing shared by both front ends: serving state, authentication, the status metric, one
structured log line per call, and the error -> status code mapping at the edge (gRPC codes are the
table; the HTTP front end maps them to HTTP statuses in ``http/errors.py``)."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass, field

import grpc

from ..engine.loop import EngineLoop
from ..engine.request import FinishReason, RequestOutput
from ..errors import EngineFailure, EngineStoppedError, LoraplexError, QueueFullError
from ..metrics import Metrics
from ..tenancy import Principal, RateLimitError
from .adapter_store import AdapterStore, StoredAdapter
from .auth import KeyStore
from .errors import status_for
from .limits import TenantLimiter

log = logging.getLogger("loraplex.requests")


@dataclass
class ServingState:
    metrics: Metrics
    keys: KeyStore = field(default_factory=lambda: KeyStore(None))
    limiter: TenantLimiter | None = None
    loop: EngineLoop | None = None  # None until the model is loaded and warmed up
    draining: bool = False
    store: AdapterStore | None = None  # persisted LoadAdapter registrations (--state-dir)
    # stored adapters that could not be restored at start: id -> (entry, error), shown by ListAdapters
    restore_failures: dict[str, tuple[StoredAdapter, str]] = field(default_factory=dict)
    # adapter id -> (lock, calls holding or waiting on it): LoadAdapter / UnloadAdapter one at a time
    admin_locks: dict[str, tuple[asyncio.Lock, int]] = field(default_factory=dict)

    def __post_init__(self):
        if self.limiter is None:
            self.limiter = TenantLimiter(self.keys.limits_for)

    def engine_loop(self) -> EngineLoop:
        if self.draining:
            raise EngineStoppedError("the server is shutting down")
        if self.loop is None:
            raise EngineStoppedError("the model is still loading")
        return self.loop


@dataclass(frozen=True)
class Failure:
    """What a front end tells the client about an error: the status of our table, the message, and
    for rate limits and a full queue, how long to wait (seconds) before retrying."""

    code: grpc.StatusCode
    message: str
    retry_after_s: float | None = None
    exc: Exception | None = None


QUEUE_FULL_RETRY_AFTER_S = 1.0


class Call:
    """Bookkeeping of one call from either front end: who called, the status metric (labelled with
    ``frontend``), one structured log line, and the error -> status mapping."""

    def __init__(self, method: str, state: ServingState, metadata, adapter_id: str = "", frontend: str = "grpc"):
        self.method, self.state, self.frontend = method, state, frontend
        self.adapter_id, self.request_id = adapter_id, ""
        self.start = time.monotonic()
        self.principal: Principal = state.keys.authenticate(metadata)
        state.metrics.tenant_label.allow(self.principal.tenant)

    @property
    def tenant(self) -> str:
        return self.principal.tenant if self.principal else ""

    def _log(self, status: str, output: RequestOutput | None = None, error: str = "") -> None:
        self.state.metrics.record_rpc(self.method, status, self.adapter_id, self.tenant or None, self.frontend)
        fields = {"event": "rpc", "method": self.method, "status": status, "adapter": self.adapter_id or None,
                  "tenant": self.tenant or None, "request_id": self.request_id or None,
                  "frontend": self.frontend, "duration_s": round(time.monotonic() - self.start, 4)}
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

    def failure(self, exc: Exception) -> Failure:
        """Log and count ``exc``; what the client is told (internal errors only by request id)."""
        code = status_for(exc)
        if code is grpc.StatusCode.INTERNAL and not isinstance(exc, EngineFailure):
            log.error("internal error in %s (request id %s)", self.method, self.request_id or "-",
                      exc_info=exc)
            details = f"internal error (request id {self.request_id or '-'})"
        else:
            details = str(exc)
        self._log(code.name, error=details)
        return Failure(code, details, retry_after(exc), exc)


def retry_after(exc: Exception) -> float | None:
    if isinstance(exc, RateLimitError):
        return exc.retry_after_s
    if isinstance(exc, QueueFullError):
        return QUEUE_FULL_RETRY_AFTER_S
    return None


def open_call(method: str, state: ServingState, metadata, adapter_id: str = "", frontend: str = "grpc") -> Call:
    """A Call for an authenticated caller; on AuthenticationError the failure is counted, then raised."""
    try:
        return Call(method, state, metadata, adapter_id, frontend)
    except LoraplexError as exc:
        state.metrics.record_rpc(method, status_for(exc).name, adapter_id, None, frontend)
        raise


class RpcCall(Call):
    """A gRPC call: failures end the RPC through its context."""

    async def fail(self, context: grpc.aio.ServicerContext, exc: Exception) -> None:
        failure = self.failure(exc)
        if isinstance(exc, RateLimitError):
            context.set_trailing_metadata(exc.trailing_metadata())
        await context.abort(failure.code, failure.message)


async def start_call(method: str, state: ServingState, context, adapter_id: str = "") -> RpcCall:
    """An RpcCall for an authenticated caller, or the RPC ends with UNAUTHENTICATED."""
    try:
        return RpcCall(method, state, context.invocation_metadata(), adapter_id)
    except LoraplexError as exc:
        state.metrics.record_rpc(method, status_for(exc).name, adapter_id, None)
        await context.abort(status_for(exc), str(exc))
        raise AssertionError("context.abort raises") from exc


def admin_rpc(body):
    """A unary handler from ``body(self, request, call) -> response``: auth, status mapping, RPC log."""
    @functools.wraps(body)
    async def handler(self, request, context):
        call = await start_call(body.__name__, self.state, context, getattr(request, "adapter_id", ""))
        try:
            response = await body(self, request, call)
        except Exception as exc:  # noqa: BLE001 - mapped to a status code in one place
            await call.fail(context, exc)
            return None
        call.ok()
        return response
    return handler


def check_final(out: RequestOutput) -> None:
    """Raise the domain error a request's last delta ended with (mapped to a status by ``Call.failure``)."""
    if out.finish_reason is FinishReason.ERROR:
        raise out.error or EngineFailure("the engine failed this request")
    if out.finish_reason is FinishReason.ABORT:
        raise EngineStoppedError("the request was aborted by the server")
