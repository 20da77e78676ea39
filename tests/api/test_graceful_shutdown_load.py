"""Graceful shutdown under load: with 50 streams in flight (half already running, half arriving
while the drain starts), each stream either completes within the grace period or is refused
UNAVAILABLE before its first chunk; none is cut mid-stream."""

from __future__ import annotations

import asyncio
import threading
import time

from helpers import ASSETS
from loraplex import Client
from loraplex import errors as cerr

NEW = 8


def test_sigterm_with_50_streams_in_flight_cuts_none_mid_stream(start_server):
    srv = start_server(ASSETS / "adapters", adapters=[("upper", "upper")], max_seqs=64, num_blocks=512)
    results: dict[int, tuple[list, Exception | None]] = {}

    def consume(i: int, client: Client) -> None:
        chunks: list = []
        try:
            for chunk in client.generate_stream(f"Story {i}:", adapter_id="upper" if i % 2 else "",
                                                max_new_tokens=NEW, ignore_eos=True):
                chunks.append(chunk)
            results[i] = (chunks, None)
        except cerr.LoraplexError as exc:
            results[i] = (chunks, exc)
    with Client(srv.target, timeout=120, retries=0) as client:
        first = [threading.Thread(target=consume, args=(i, client)) for i in range(25)]
        for t in first:
            t.start()
        deadline = time.monotonic() + 60
        while len(srv.engine.requests) < 25 and not results and time.monotonic() < deadline:
            time.sleep(0.01)  # wait (bounded) until the first 25 are inside the engine
        stop = asyncio.run_coroutine_threadsafe(srv.server.stop(60), srv.loop)  # what SIGTERM runs
        second = [threading.Thread(target=consume, args=(i, client)) for i in range(25, 50)]
        for t in second:
            t.start()
        stop.result(120)
        for t in first + second:
            t.join(60)
    assert len(results) == 50
    completed = refused = 0
    for i, (chunks, error) in sorted(results.items()):
        if error is None:
            assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == NEW, i
            completed += 1
        else:
            assert isinstance(error, cerr.UnavailableError) and chunks == [], (i, error, len(chunks))
            refused += 1
    assert completed > 0
