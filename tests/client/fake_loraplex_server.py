"""A fake, in-process Loraplex gRPC server for the client and CLI tests (no model, no torch).

The fixtures that start it live in this directory's conftest.py.

``FakeLoraplex`` answers from canned messages, records every call (method, request,
metadata), and can be told to fail the next calls of a method with a status code, to be slow,
or to stream forever so that client-side cancellation can be observed.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

from loraplex.v1 import loraplex_pb2 as pb
from loraplex.v1 import loraplex_pb2_grpc as pb_grpc

STREAM_PIECES = ("Hel", "lo", " world")


@dataclass
class Failure:
    """One queued failure: abort the call with ``code``, ``details`` and trailing metadata."""

    code: grpc.StatusCode
    details: str = ""
    trailing: tuple[tuple[str, str], ...] = ()


@dataclass
class Call:
    """What the fake received."""

    method: str
    request: Any
    metadata: dict[str, str]


def _abort(context: grpc.ServicerContext, failure: Failure) -> None:
    if failure.trailing:
        context.set_trailing_metadata(failure.trailing)
    context.abort(failure.code, failure.details)


class FakeHealth(health.HealthServicer):
    """The stock health servicer, plus queued failures and a call counter."""

    def __init__(self) -> None:
        super().__init__()
        self.failures: list[Failure] = []
        self.checks = 0
        self.set("", health_pb2.HealthCheckResponse.SERVING)
        self.set("loraplex.v1.LoraplexService", health_pb2.HealthCheckResponse.SERVING)

    def Check(self, request, context):  # noqa: N802 (gRPC naming)
        self.checks += 1
        if self.failures:
            _abort(context, self.failures.pop(0))
        return super().Check(request, context)


def canned_generate_response() -> pb.GenerateResponse:
    """The Generate answer (adapter_id and request_id are echoed from the request)."""
    return pb.GenerateResponse(
        text="Hello world", token_ids=[10, 11, 12], finish_reason=pb.FINISH_REASON_STOP,
        usage=pb.Usage(prompt_tokens=4, completion_tokens=3),
        logprobs=[pb.TokenLogprob(token_id=10, logprob=-0.5,
                                  top=[pb.TopLogprob(token_id=10, logprob=-0.5),
                                       pb.TopLogprob(token_id=99, logprob=-1.25)])],
    )


def canned_adapters() -> dict[str, pb.AdapterInfo]:
    """Two registered adapters."""
    return {
        "upper": pb.AdapterInfo(adapter_id="upper", rank=8, target_modules=["q_proj", "v_proj"],
                                state=pb.ADAPTER_STATE_DEVICE, pinned=True, request_count=12,
                                source="upper", size_bytes=1024),
        "json": pb.AdapterInfo(adapter_id="json", rank=16, target_modules=["o_proj"],
                               state=pb.ADAPTER_STATE_DISK, request_count=0, source="json",
                               size_bytes=2048),
    }


class FakeLoraplex(pb_grpc.LoraplexServiceServicer):
    """Canned LoraplexService; see the module docstring."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[Call] = []
        self.failures: dict[str, list[Failure]] = defaultdict(list)
        self.delay = 0.0                  # seconds every call waits (interrupted by cancellation)
        self.stream_forever = False       # GenerateStream never ends by itself
        self.stream_interval = 0.0        # pause between streamed chunks
        self.stream_abort_after: tuple[int, Failure] | None = None  # fail after n chunks
        self.stream_sent = 0
        self.stream_ended = threading.Event()  # set when a forever stream terminates
        self.ends_at_once = False         # answer as an instruct model does a raw prompt: EOS, no text
        self.adapters = canned_adapters()
        self.info = pb.GetServerInfoResponse(
            model="SmolLM2-135M", dtype="float32", device="cpu", max_loras=4, max_lora_rank=64,
            context_length=2048, version="0.1.0", max_cpu_loras=16, kv_cache_tokens=8192)
        self.health = FakeHealth()
        self.target = ""

    def fail(self, method: str, code: grpc.StatusCode, times: int = 1, details: str = "",
             trailing: tuple[tuple[str, str], ...] = ()) -> None:
        """Make the next ``times`` calls of ``method`` fail with ``code``."""
        self.failures[method].extend(Failure(code, details, trailing) for _ in range(times))

    def calls_of(self, method: str) -> list[Call]:
        """The recorded calls of one method, in order."""
        return [call for call in self.calls if call.method == method]

    def _enter(self, method: str, request: Any, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.calls.append(Call(method, request, dict(context.invocation_metadata())))
            failure = self.failures[method].pop(0) if self.failures[method] else None
        if failure is not None:
            _abort(context, failure)
        end = time.monotonic() + self.delay
        while time.monotonic() < end and context.is_active():
            time.sleep(0.01)

    def Generate(self, request, context):  # noqa: N802
        self._enter("Generate", request, context)
        response = canned_generate_response()
        if self.ends_at_once:
            response = pb.GenerateResponse(token_ids=[2], finish_reason=pb.FINISH_REASON_EOS,
                                           usage=pb.Usage(prompt_tokens=4, completion_tokens=1))
        response.adapter_id = request.adapter_id
        response.request_id = request.request_id or "srv-1"
        return response

    def _chunk(self, request: pb.GenerateRequest, text: str, last: bool) -> pb.GenerateStreamResponse:
        chunk = pb.GenerateStreamResponse(text=text, token_ids=[len(text)],
                                          adapter_id=request.adapter_id,
                                          request_id=request.request_id or "srv-1")
        if last:
            chunk.finish_reason = pb.FINISH_REASON_EOS
            chunk.usage.CopyFrom(pb.Usage(prompt_tokens=4, completion_tokens=len(STREAM_PIECES)))
        return chunk

    def GenerateStream(self, request, context):  # noqa: N802
        self._enter("GenerateStream", request, context)
        if self.stream_forever:
            context.add_callback(self.stream_ended.set)
            while context.is_active():
                self.stream_sent += 1
                yield self._chunk(request, f"t{self.stream_sent} ", last=False)
                time.sleep(self.stream_interval)
            return
        if self.ends_at_once:  # one chunk: the EOS token, no text
            yield pb.GenerateStreamResponse(token_ids=[2], finish_reason=pb.FINISH_REASON_EOS,
                                            usage=pb.Usage(prompt_tokens=4, completion_tokens=1),
                                            adapter_id=request.adapter_id, request_id="srv-1")
            return
        for i, piece in enumerate(STREAM_PIECES):
            if self.stream_abort_after and i == self.stream_abort_after[0]:
                _abort(context, self.stream_abort_after[1])
            self.stream_sent += 1
            yield self._chunk(request, piece, last=i == len(STREAM_PIECES) - 1)
            time.sleep(self.stream_interval)

    def LoadAdapter(self, request, context):  # noqa: N802
        self._enter("LoadAdapter", request, context)
        info = pb.AdapterInfo(adapter_id=request.adapter_id, rank=4, target_modules=["q_proj"],
                              state=pb.ADAPTER_STATE_CPU, pinned=request.pin,
                              source=request.source, size_bytes=512)
        self.adapters[request.adapter_id] = info
        return pb.LoadAdapterResponse(adapter=info)

    def UnloadAdapter(self, request, context):  # noqa: N802
        self._enter("UnloadAdapter", request, context)
        if self.adapters.pop(request.adapter_id, None) is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"adapter {request.adapter_id!r} not found")
        return pb.UnloadAdapterResponse()

    def ListAdapters(self, request, context):  # noqa: N802
        self._enter("ListAdapters", request, context)
        return pb.ListAdaptersResponse(adapters=list(self.adapters.values()))

    def GetServerInfo(self, request, context):  # noqa: N802
        self._enter("GetServerInfo", request, context)
        return self.info


def serve_fake(servicer: FakeLoraplex, max_workers: int = 8):
    """Start ``servicer`` (and its health service) on a free local port; sets ``servicer.target``.

    Returns the grpc server; stop it with ``server.stop(None).wait(5)``.
    """
    from concurrent import futures
    from grpc_health.v1 import health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers))
    pb_grpc.add_LoraplexServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(servicer.health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.target = f"127.0.0.1:{port}"
    return server
