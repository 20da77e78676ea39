"""Issue #12 item 3: a burst cannot exceed a tenant's ``max_queued`` (check and count are atomic).

The servicer runs against a fake engine loop whose ``submit`` blocks until released, which holds
the first request exactly in the window between the queue check and the engine accepting it."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest

from loraplex.v1 import loraplex_pb2 as pb
from loraplex_server.api.calls import ServingState
from loraplex_server.api.limits import TenantLimiter
from loraplex_server.api.servicer import LoraplexServicer
from loraplex_server.engine.request import FinishReason, RequestOutput
from loraplex_server.metrics import Metrics
from loraplex_server.tenancy import RateLimitError, TenantLimits


class BlockingLoop:
    """``submit`` signals ``entered`` then waits for ``release``; the stream yields one final output."""

    def __init__(self):
        self.entered, self.release = threading.Event(), threading.Event()

    def submit(self, prompt, sampling, adapter_id, request_id, tenant):
        if self.entered.is_set():  # a second request got past the queue check: don't block it
            return _FinishedStream(request_id)
        self.entered.set()
        assert self.release.wait(30)
        return _FinishedStream(request_id)

    def abort(self, request_id):
        pass


class _FinishedStream:
    def __init__(self, request_id):
        self.request_id = request_id

    async def __aiter__(self):
        yield RequestOutput(request_id=self.request_id, token_ids=(), text="", finished=True, finish_reason=FinishReason.LENGTH)


def _servicer(max_queued: int) -> tuple[LoraplexServicer, BlockingLoop, TenantLimiter]:
    limiter = TenantLimiter(lambda tenant: TenantLimits(max_queued=max_queued))
    loop = BlockingLoop()
    state = ServingState(metrics=Metrics(), limiter=limiter, loop=loop)
    return LoraplexServicer(state), loop, limiter


async def _drain(servicer, rid):
    call = SimpleNamespace(principal=None, tenant="acme", request_id="")
    return [out async for out in servicer._deltas(pb.GenerateRequest(prompt="hi", request_id=rid), call)]


def test_a_burst_cannot_pass_the_queue_check_before_the_first_is_counted():
    servicer, loop, limiter = _servicer(max_queued=1)

    async def scenario():
        first = asyncio.create_task(_drain(servicer, "first"))
        await asyncio.to_thread(loop.entered.wait, 30)  # the first is inside submit, not yet counted before
        try:
            with pytest.raises(RateLimitError, match="queued"):
                await _drain(servicer, "second")
        finally:
            loop.release.set()
        assert (await first)[-1].finished
        assert limiter.queued("acme") == 0 and limiter.in_flight("acme") == 0
        assert len(await _drain(servicer, "third")) == 1  # the slot came back
    asyncio.run(scenario())


def test_a_refused_submit_gives_the_queue_slot_back():
    servicer, loop, limiter = _servicer(max_queued=1)
    loop.submit = lambda *args: (_ for _ in ()).throw(RateLimitError("engine full", 1.0))

    async def scenario():
        with pytest.raises(RateLimitError):
            await _drain(servicer, "refused")
        assert limiter.queued("acme") == 0 and limiter.in_flight("acme") == 0
    asyncio.run(scenario())
