"""The server: grpc.aio + standard health + reflection + /metrics, and the OpenAI-compatible HTTP API
(uvicorn on the same asyncio loop, ``api/http``); graceful SIGTERM drain of both.

Start-up order: the port opens at once with health NOT_SERVING; the model loads in a worker
thread, start-up adapters are registered, adapters stored in ``--state-dir`` are restored, one
warm-up request runs, then health turns SERVING.
On SIGTERM: health NOT_SERVING, new requests UNAVAILABLE (HTTP 503), in-flight ones get the grace period.
After ``max_failed_steps`` engine steps fail in a row, health turns NOT_SERVING (the log says why).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import threading
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from loraplex.v1 import loraplex_pb2 as pb
from loraplex.v1 import loraplex_pb2_grpc as pb_grpc

from ..config import Config
from ..engine.engine import LLMEngine
from ..errors import LoraplexError
from ..metrics import Metrics
from .discovery import AdapterDiscovery
from .http.app import build_app
from .http.server import HttpFrontEnd
from .servicer import LoraplexServicer
from .startup import EngineFactory, bring_up_engine, load_startup_adapters, serving_state

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LoraplexService"].full_name
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DRAIN_POLL_S = 0.02


class LoraplexServer:
    def __init__(self, config: Config, engine_factory: EngineFactory = LLMEngine, metrics: Metrics | None = None):
        self.config = config
        self.engine_factory = engine_factory
        self.state = serving_state(config, metrics)
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http_port: int | None = None  # the OpenAI-compatible HTTP API's bound port (None: off)
        self.serving = False  # what the health service says (SERVING); /health reports it too
        self._http: HttpFrontEnd | None = None
        self._grpc: grpc.aio.Server | None = None
        self._metrics_http: Any = None  # prometheus_client's WSGI server, once started
        self._ready: asyncio.Task | None = None
        self.discovery: AdapterDiscovery | None = None
        self._discovery_task: asyncio.Task | None = None

    async def start(self) -> None:
        """Open the ports (health NOT_SERVING) and begin loading the model in the background."""
        server = grpc.aio.server(options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                          ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
        pb_grpc.add_LoraplexServiceServicer_to_server(LoraplexServicer(self.state), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        cfg = self.config.server
        self.port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
        await server.start()
        self._grpc = server
        if cfg.http_port >= 0:
            await self._start_http(cfg)
        if cfg.metrics_port >= 0:
            self._metrics_http, _ = start_http_server(cfg.metrics_port, addr=cfg.host,
                                                      registry=self.state.metrics.registry)
            self.metrics_port = self._metrics_http.server_port
        log.info("listening", extra={"fields": {"port": self.port, "metrics_port": self.metrics_port,
                                                "http_port": self.http_port}})
        self._ready = asyncio.create_task(self._bring_up())

    async def _start_http(self, cfg) -> None:
        http = self._http = HttpFrontEnd(build_app(self.state, lambda: self.serving), cfg.resolved_http_host,
                                         cfg.http_port)
        try:
            await http.start()
        except OSError as exc:  # e.g. the port is taken: fail start-up cleanly (exit code 1)
            self._http = None
            if self._grpc is not None:
                await self._grpc.stop(0)
            raise LoraplexError(f"cannot serve HTTP on {cfg.resolved_http_host}:{cfg.http_port}: {exc}") from exc
        self.http_port = http.port

    async def _set_health(self, status) -> None:
        self.serving = status == health_pb2.HealthCheckResponse.SERVING
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def _bring_up(self) -> None:
        aio = asyncio.get_running_loop()

        def unhealthy(reason: str) -> None:  # on the engine thread
            asyncio.run_coroutine_threadsafe(self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING), aio)
        startup = aio.run_in_executor(None, functools.partial(
            bring_up_engine, self.config, self.state, self.engine_factory, on_unhealthy=unhealthy,
            prepare=functools.partial(load_startup_adapters, config=self.config, state=self.state)))
        try:
            loop = await asyncio.shield(startup)
            if self.config.server.adapter_discovery and self.config.engine.lora.adapter_root is not None:
                self.discovery = AdapterDiscovery(loop, self.config.engine.lora.adapter_root)
                await asyncio.to_thread(self.discovery.sweep)
                self._discovery_task = asyncio.create_task(self.discovery.run())
        except asyncio.CancelledError:  # stopped while starting: stop the loop once start-up is over
            startup.add_done_callback(_stop_started_loop)
            raise
        self.state.loop = loop
        if not self.state.draining and loop.healthy:
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)
            info = loop.server_info()
            log.info("serving", extra={"fields": {"model": info.model, "device": info.device,
                                                  "adapters": [n for n, _ in self.config.server.adapters]}})

    async def wait_ready(self) -> None:
        """Return once serving; raise what start-up raised (bad model, bad start-up adapter)."""
        assert self._ready is not None, "start() first"
        await asyncio.shield(self._ready)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new requests, let in-flight ones finish within ``grace``."""
        if self.state.draining:
            return
        self.state.draining = True
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        grace = self.config.server.grace_period_s if grace is None else grace
        log.info("draining", extra={"fields": {"grace_s": grace}})
        left = await self._drain_engine(grace)
        stops = [self._grpc.stop(left)] if self._grpc is not None else []
        if self._http is not None:
            stops.append(self._http.stop(left))
        await asyncio.gather(*stops)
        for task in (self._ready, self._discovery_task):
            if task is not None and not task.done():
                task.cancel()
        if self.state.loop is not None:
            await asyncio.to_thread(self.state.loop.shutdown)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        if self.state.store is not None:
            self.state.store.close()
        log.info("stopped")


    async def _drain_engine(self, grace: float) -> float:
        """Wait (at most ``grace``) until the engine has no request in flight; returns the grace left.

        Until then the gRPC server keeps accepting calls, so one arriving now reaches our handler and
        is refused UNAVAILABLE (``draining``) rather than cancelled by gRPC's own shutdown."""
        clock = asyncio.get_running_loop().time
        deadline = clock() + grace
        # Polls a count the engine thread keeps: there is no asyncio event to await.
        while self.state.loop is not None and self.state.loop.num_in_flight and clock() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(DRAIN_POLL_S)
        return max(0.0, deadline - clock())


def _stop_started_loop(startup: asyncio.Future) -> None:
    """Start-up finished after its task was cancelled: stop the loop it started (off the event loop)."""
    if not startup.cancelled() and startup.exception() is None:
        threading.Thread(target=startup.result().shutdown, name="loraplex-stop-engine", daemon=True).start()


async def serve(config: Config, engine_factory: EngineFactory = LLMEngine) -> None:
    """Run until SIGTERM/SIGINT, then drain gracefully. Raises if start-up fails."""
    server = LoraplexServer(config, engine_factory)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    ready = asyncio.ensure_future(server.wait_ready())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait([ready, stopping], return_when=asyncio.FIRST_COMPLETED)
    failure = ready.exception() if ready.done() else None
    if failure is not None:
        await server.stop(0)
        raise failure
    await stopping
    await server.stop()
