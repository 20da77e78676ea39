"""``HttpFrontEnd``: uvicorn serving the FastAPI app as a task on the running asyncio loop (the
grpc.aio server's), on a socket we bind ourselves (port 0 works; a bind error raises here)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn

log = logging.getLogger(__name__)
START_POLL_S = 0.005


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # the process's SIGTERM handling (drain) stays ours
        yield


def bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


class HttpFrontEnd:
    def __init__(self, app, host: str, port: int):
        self.app, self.host, self.requested_port = app, host, port
        self.port: int | None = None
        self._server: _Server | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        sock = bind(self.host, self.requested_port)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, lifespan="off", access_log=False, log_config=None, log_level="warning",
                                timeout_keep_alive=30)
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what start-up raised
                raise OSError(f"the HTTP server on {self.host}:{self.port} did not start")
            await asyncio.sleep(START_POLL_S)

    async def stop(self, grace: float) -> None:
        """Stop accepting; in-flight responses get ``grace`` seconds."""
        if self._server is None or self._task is None:
            return
        # uvicorn annotates it int; it is passed to asyncio.wait_for, where a float works
        self._server.config.timeout_graceful_shutdown = max(grace, 0.01)  # type: ignore[assignment]
        self._server.should_exit = True
        try:
            await self._task
        except (Exception, SystemExit):
            log.exception("HTTP server stopped with an error")
