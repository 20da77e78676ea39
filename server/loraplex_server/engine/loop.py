"""EngineLoop: runs ``LLMEngine.step()`` on its own thread; callers submit requests and stream deltas.

Thread-safe public API (any thread, or an asyncio loop without blocking it):
``submit()`` returns a ``RequestStream`` that is both a blocking iterator and an async iterator of
``RequestOutput`` deltas; ``abort()`` ends a request at the next step boundary (KV blocks freed).
Validation and tokenization run on the caller's thread, so bad input raises at ``submit()``.

This is the API's whole view of the engine: submit/abort, adapter registration, and plain values
(``server_info()``, ``adapter_infos()``, ``adapter_owner()``, ``decode()``). ``engine`` itself is
for the engine package and tests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Self, TypeVar

from ..errors import AdapterNotFoundError, DuplicateRequestError, EngineStoppedError, LoraplexError, QueueFullError
from ..lora.ids import AdapterId
from ..lora.weights import AdapterInfo
from ..metrics import Metrics
from .engine import LLMEngine
from .info import ServerInfo
from .output import PendingText
from .publisher import OutputPublisher
from .request import Prompt, RequestOutput, SamplingParams

log = logging.getLogger(__name__)
_END = object()
T = TypeVar("T")
ADAPTER_METRICS_PERIOD_S = 2.0


class RequestStream:
    """Deltas of one request. Iterate with ``for`` (blocking) or ``async for`` (not both)."""

    def __init__(self, request_id: str, on_abandon: Callable[[str], None]):
        self.request_id = request_id
        self._on_abandon = on_abandon
        self._lock = threading.Lock()
        self._sync: queue.SimpleQueue = queue.SimpleQueue()
        self._async: tuple[asyncio.AbstractEventLoop, asyncio.Queue] | None = None
        self.finished = False

    def put(self, item) -> None:
        with self._lock:
            if self._async is not None:
                loop, q = self._async
                loop.call_soon_threadsafe(q.put_nowait, item)
            else:
                self._sync.put(item)

    def _take(self, item) -> tuple[RequestOutput | None, bool]:
        """(delta to yield or None, whether the stream ends after it)."""
        if item is _END:
            if not self.finished:
                raise EngineStoppedError("the engine stopped before this request finished")
            return None, True
        self.finished = item.finished
        return item, item.finished

    def __iter__(self) -> Iterator[RequestOutput]:
        done = False
        while not done:
            item, done = self._take(self._sync.get())
            if item is not None:
                yield item

    def _bind_async(self) -> asyncio.Queue:
        with self._lock:
            if self._async is None:
                q: asyncio.Queue = asyncio.Queue()
                while not self._sync.empty():
                    q.put_nowait(self._sync.get())
                self._async = (asyncio.get_running_loop(), q)
            return self._async[1]

    async def __aiter__(self):
        q = self._bind_async()
        done = False
        try:
            while not done:
                item, done = self._take(await q.get())
                if item is not None:
                    yield item
        finally:
            if not self.finished:
                self._on_abandon(self.request_id)  # cancelled consumer: free the request's KV

    def result(self) -> RequestOutput:
        """Block until finished; returns all deltas merged into one output."""
        return merge_outputs(list(self))

    def close(self) -> None:
        self.put(_END)


def merge_outputs(deltas: list[RequestOutput]) -> RequestOutput:
    """All deltas of one request as one output (the last delta's status, timings and errors)."""
    return dataclasses.replace(
        deltas[-1],
        token_ids=tuple(t for d in deltas for t in d.token_ids),
        text="".join(d.text for d in deltas),
        logprobs=tuple(lp for d in deltas for lp in d.logprobs),
    )


class EngineLoop:
    def __init__(self, engine: LLMEngine, metrics: Metrics | None = None, idle_wait_s: float = 0.05,
                 on_unhealthy: Callable[[str], None] | None = None,
                 tenant_weight: Callable[[str], float] | None = None):
        """``on_unhealthy(reason)`` is called once (on the engine thread) when
        ``scheduler.max_failed_steps`` steps have failed in a row; ``tenant_weight(tenant)`` is each
        tenant's share weight for fair scheduling (default 1)."""
        self.engine = engine
        if tenant_weight is not None:
            engine.set_tenant_weights(tenant_weight)
        self.on_unhealthy = on_unhealthy
        self.unhealthy_reason: str | None = None
        self.metrics = metrics
        self.idle_wait_s = idle_wait_s
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, RequestStream] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="loraplex-engine", daemon=True)
        self._publisher: OutputPublisher | None = None  # the output thread, from start()
        # a step's deltas wait here until the next step's forward starts (or no forward follows)
        self._held: list[tuple[list[RequestOutput], list[PendingText], Callable[[], None] | None]] = []
        self._forward_started = False
        self.num_steps = 0
        self._adapters_recorded = 0.0

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> Self:
        self._publisher = OutputPublisher(self._deliver_one)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Abort whatever is still in flight and end the thread (the engine may run in another loop)."""
        with self._lock:  # a submit registers its stream before this, or is refused after it
            self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    def shutdown(self, timeout: float = 10.0) -> None:
        """``stop()``, then end the engine's own worker threads (adapter loads, grammar compiles):
        for the engine's owner (a server, a replica); the engine is not used afterwards."""
        self.stop(timeout)
        self.engine.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- caller API (any thread) ----------------------------------------------------------
    def submit(self, prompt: Prompt, sampling: SamplingParams, adapter_id: AdapterId | None = None,
               request_id: str | None = None, tenant: str = "") -> RequestStream:
        if self._stopping:
            raise EngineStoppedError("the engine is shutting down")
        request = self.engine.make_request(prompt, sampling, adapter_id, request_id, tenant)
        stream = RequestStream(request.request_id, self.abort)
        try:
            with self._lock:
                self._check_admissible(request.request_id)
                self._streams[request.request_id] = stream
                self._send(("add", request))  # under the lock: shutdown's drain sees it
        except LoraplexError:
            self.engine.discard_request(request)
            self.call(LLMEngine.release_retired)  # its version may be retired and now unused
            raise
        return stream

    def _check_admissible(self, request_id: str) -> None:
        """Under ``_lock``: refuse when stopping, full, or the id is already in flight."""
        if self._stopping:
            raise EngineStoppedError("the engine is shutting down")
        if len(self._streams) >= self.engine.config.scheduler.max_queued_requests:
            raise QueueFullError(f"{len(self._streams)} requests in flight; try again later")
        if request_id in self._streams:
            raise DuplicateRequestError(request_id)

    def generate(self, prompt: Prompt, sampling: SamplingParams, adapter_id: AdapterId | None = None) -> RequestOutput:
        return self.submit(prompt, sampling, adapter_id).result()

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def call(self, fn: Callable[[LLMEngine], T]) -> Future:
        """Run ``fn(engine)`` on the engine thread between steps; its result or error lands in the Future."""
        future: Future = Future()
        if self._stopping:
            future.set_exception(EngineStoppedError("the engine is shutting down"))
        else:
            self._send(("call", (fn, future)))
        return future

    def add_adapter(self, adapter_id: AdapterId, source, *, eager: bool = True, owner: str | None = None,
                    version: int | None = None):
        """Validate (and with ``eager`` read) on the caller's thread, then publish a new version.

        Raises AdapterLoadError on refusal, leaving any previous version serving. A replaced
        version keeps serving the requests bound to it.
        """
        lora = self.engine.lora
        old = lora.resolve(adapter_id) if lora.has_adapter(adapter_id) else None
        published = lora.add_adapter(adapter_id, source, eager=eager, owner=owner, version=version)
        if self.metrics is not None:
            self.metrics.adapter_label.allow(adapter_id)
        if old is not None:
            self.call(lambda e: e.adapter_replaced(old.key))
        return published

    def remove_adapter(self, adapter_id: AdapterId) -> Future:
        if not self.engine.lora.has_adapter(adapter_id):
            raise AdapterNotFoundError(adapter_id)
        return self.call(lambda e: e.remove_adapter(adapter_id))

    def pin_adapter(self, adapter_id: AdapterId) -> Future:
        """Keep the adapter in a device slot (engine thread); AdapterPinError lands in the Future."""
        return self.call(lambda e: e.pin_adapter(adapter_id))

    # ---- plain values for the API (any thread) ------------------------------------------------
    def server_info(self) -> ServerInfo:
        return self.engine.server_info()

    def has_adapter(self, adapter_id: AdapterId) -> bool:
        """A version of ``adapter_id`` is published (new requests may name it)."""
        return self.engine.lora.has_adapter(adapter_id)

    def adapter_owner(self, adapter_id: AdapterId) -> str | None:
        """The tenant owning the current version (None: public); AdapterNotFoundError if none."""
        return self.engine.lora.resolve(adapter_id).owner

    def adapter_infos(self) -> Future[list[AdapterInfo]]:
        """Every published adapter with its tier and load state, read on the engine thread."""
        return self.call(lambda e: e.lora.info())

    def decode(self, token_ids: list[int]) -> str:
        """The text of ``token_ids`` (the tokenizer only reads: any thread)."""
        # LoadedModel.tokenizer is typed ``object | None`` (model/loader.py); it is a Hugging Face tokenizer
        return self.engine.loaded.tokenizer.decode(token_ids)  # type: ignore[attr-defined]

    # ---- the engine thread ----------------------------------------------------------------
    def _send(self, command) -> None:
        self._commands.put(command)
        self._wake.set()

    def _run(self) -> None:
        while not self._stopping:
            self._drain_commands()
            if not self.engine.has_work:
                self._wake.wait(self.idle_wait_s)
                self._wake.clear()
                continue
            outputs, record_metrics = self._step()
            self._hold(outputs, record_metrics)
            if not self._forward_started or not self.engine.has_work:
                self._flush()  # no forward ran to hand them over at, or none follows
            if not self.engine.last_batch[0]:  # nothing runnable (adapters loading): don't spin
                self._wake.wait(0.005)
                self._wake.clear()
        self._shutdown()

    def _step(self) -> tuple[list[RequestOutput], Callable[[], None] | None]:
        """One engine step: its deltas, and the recording of its metrics (for the output thread)."""
        start = time.perf_counter()
        self._forward_started = False
        try:
            outputs = self.engine.step_tokens(self._on_forward)  # texts are decoded on the output thread
        except Exception:  # one bad step must not kill the loop
            log.exception("engine step failed; failing the running requests")
            outputs = self.engine.fail_running("internal error during the engine step")
        self.num_steps += 1
        self._check_health()
        record = None
        if self.metrics is not None:  # a snapshot here; Prometheus updated on the output thread
            record = functools.partial(self.metrics.record_step, self.engine.stats(time.perf_counter() - start))
            if time.monotonic() - self._adapters_recorded > ADAPTER_METRICS_PERIOD_S:
                self._adapters_recorded = time.monotonic()
                # only the labelled adapters have gauges: not a walk over thousands registered
                self.metrics.record_adapters(self.engine.lora.info(self.metrics.adapter_label.values()))
        return outputs, record

    @property
    def num_in_flight(self) -> int:
        """Requests submitted whose stream has not ended yet."""
        with self._lock:
            return len(self._streams)

    @property
    def healthy(self) -> bool:
        return self.unhealthy_reason is None

    def _check_health(self) -> None:
        limit = self.engine.config.scheduler.max_failed_steps
        if self.unhealthy_reason is None and self.engine.failed_steps_in_a_row >= limit:
            self.unhealthy_reason = (f"{self.engine.failed_steps_in_a_row} engine steps failed in a row "
                                     f"(max_failed_steps={limit}); the device or model may be broken")
            log.error("engine unhealthy: %s", self.unhealthy_reason)
            if self.on_unhealthy is not None:
                self.on_unhealthy(self.unhealthy_reason)

    def _drain_commands(self) -> None:
        while True:
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                self._apply(kind, arg)
            except LoraplexError as exc:
                log.warning("command %s failed: %s", kind, exc)

    def _apply(self, kind: str, arg) -> None:
        if kind == "add":
            self.engine.add_request(arg)
        elif kind == "abort":
            out = self.engine.abort(arg)
            self._deliver([out] if out else [])
        elif kind == "call":
            fn, future = arg
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self.engine))
                except Exception as exc:  # noqa: BLE001 - handed to the caller
                    future.set_exception(exc)

    def _hold(self, outputs: list[RequestOutput], before: Callable[[], None] | None = None) -> None:
        """Keep deltas (with the texts the engine left to decode, and what the output thread
        runs before delivering them) for the output thread."""
        undecoded = self.engine.take_undecoded()
        if outputs or undecoded or before is not None:
            self._held.append((outputs, undecoded, before))

    def _on_forward(self) -> None:
        """A step's forward starts: the output thread takes the previous step's deltas now, and
        its Python runs while the forward's kernels have released the GIL (handed over at once,
        it would contend with this thread's scheduling and packing for it)."""
        self._forward_started = True
        self._flush()

    def _flush(self) -> None:
        assert self._publisher is not None  # started before the engine thread runs
        for outputs, undecoded, before in self._held:
            self._publisher.publish(outputs, undecoded, before)
        self._held = []

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Queue deltas for the output thread now, after any held ones."""
        self._hold(outputs)
        self._flush()

    def _deliver_one(self, out: RequestOutput) -> None:
        """On the output thread: one delta to its stream (the last one ends it)."""
        with self._lock:
            stream = self._streams.get(out.request_id)
            if out.finished:
                self._streams.pop(out.request_id, None)
        if out.finished and self.metrics is not None:
            self.metrics.record_request(out)
        if stream is not None:
            stream.put(out)

    def _shutdown(self) -> None:
        self._drain_commands()
        for request_id in list(self.engine.requests):
            out = self.engine.abort(request_id)
            self._deliver([out] if out else [])
        assert self._publisher is not None
        self._publisher.close()  # every delta queued reaches its stream before the streams end
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            stream.close()
