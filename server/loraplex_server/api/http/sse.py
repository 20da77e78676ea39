"""Server-Sent Events: the response class, event encoding, and n choices interleaved in one stream.

A client that goes away ends the stream at once (we listen for ``http.disconnect`` whatever the
ASGI spec version), and closing the event generator cancels every choice, which aborts its request
in the engine (its KV blocks freed).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Sequence

from starlette.responses import StreamingResponse

from ...engine.request import RequestOutput
from ..service import Generation

DONE = b"data: [DONE]\n\n"


def event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


class SSEResponse(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(self, content, headers=None):
        super().__init__(content, headers={"cache-control": "no-cache", **(headers or {})})

    async def __call__(self, scope, receive, send) -> None:
        streaming = asyncio.ensure_future(self.stream_response(send))
        watching = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait({streaming, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (streaming, watching):
                task.cancel()
            results = await asyncio.gather(streaming, watching, return_exceptions=True)
            await self.body_iterator.aclose()  # type: ignore[attr-defined]  # ours: an async generator
        error = results[0]
        if isinstance(error, Exception) and not isinstance(error, OSError):
            raise error


async def interleave(generations: Sequence[Generation]) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """(choice index, delta) of all generations as they come; closing it cancels them all."""
    if len(generations) == 1:  # the common case: no tasks, no queue
        try:
            async for out in generations[0]:
                yield 0, out
        finally:
            generations[0].cancel()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, generation: Generation) -> None:
        try:
            async for out in generation:
                queue.put_nowait((index, out, None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((index, None, exc))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(generations)]
    try:
        remaining = len(tasks)
        while remaining:
            index, out, exc = await queue.get()
            if exc is not None:
                raise exc
            remaining -= out.finished
            yield index, out
    finally:
        for task in tasks:
            task.cancel()
        for generation in generations:
            generation.cancel()
