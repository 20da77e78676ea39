"""Per-RPC plumbing shared by the handlers: serving state, authentication, the status metric, one
structured log line per RPC, and the error -> status code mapping at the edge."""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field

import grpc

from ..engine.loop import EngineLoop
from ..engine.request import FinishReason, RequestOutput
from ..errors import AdapterUnavailableError, EngineStoppedError, InvalidRequestError, LoraplexError
from ..metrics import Metrics
from ..tenancy import Principal, RateLimitError
from .adapter_store import AdapterStore, StoredAdapter
from .auth import KeyStore
from .errors import status_for
from .limits import TenantLimiter

log = logging.getLogger("loraplex.requests")


class EngineFailure(LoraplexError):
    """The engine ended a request with an internal error."""


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

    def __post_init__(self):
        if self.limiter is None:
            self.limiter = TenantLimiter(self.keys.limits_for)

    def engine_loop(self) -> EngineLoop:
        if self.draining:
            raise EngineStoppedError("the server is shutting down")
        if self.loop is None:
            raise EngineStoppedError("the model is still loading")
        return self.loop


class RpcCall:
    """Bookkeeping of one RPC: who called, status metric, one structured log line, errors."""

    def __init__(self, method: str, state: ServingState, context, adapter_id: str = ""):
        self.method, self.state = method, state
        self.adapter_id, self.request_id = adapter_id, ""
        self.start = time.monotonic()
        self.principal: Principal = state.keys.authenticate(context.invocation_metadata())
        state.metrics.tenant_label.allow(self.principal.tenant)

    @property
    def tenant(self) -> str:
        return self.principal.tenant if self.principal else ""

    def _log(self, status: str, output: RequestOutput | None = None, error: str = "") -> None:
        self.state.metrics.record_rpc(self.method, status, self.adapter_id, self.tenant or None)
        fields = {"event": "rpc", "method": self.method, "status": status, "adapter": self.adapter_id or None,
                  "tenant": self.tenant or None, "request_id": self.request_id or None,
                  "duration_s": round(time.monotonic() - self.start, 4)}
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
        if isinstance(exc, RateLimitError):
            context.set_trailing_metadata(exc.trailing_metadata())
        self._log(code.name, error=details)
        await context.abort(code, details)


async def start_call(method: str, state: ServingState, context, adapter_id: str = "") -> RpcCall:
    """An RpcCall for an authenticated caller, or the RPC ends with UNAUTHENTICATED."""
    try:
        return RpcCall(method, state, context, adapter_id)
    except LoraplexError as exc:
        state.metrics.record_rpc(method, status_for(exc).name, adapter_id, None)
        await context.abort(status_for(exc), str(exc))


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
    if out.finish_reason is FinishReason.ERROR:
        if out.error_kind == "adapter_unavailable":
            raise AdapterUnavailableError(out.adapter_id or "", out.error or "load failed")
        if out.error_kind == "invalid_constraint":  # the grammar did not compile (error names the field)
            field, _, message = (out.error or "sampling.constraint: refused").partition(": ")
            raise InvalidRequestError(field, message)
        raise EngineFailure(out.error or "the engine failed this request")
    if out.finish_reason is FinishReason.ABORT:
        raise EngineStoppedError("the request was aborted by the server")
