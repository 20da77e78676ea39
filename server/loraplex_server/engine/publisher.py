"""The engine loop's output thread: decode deferred text, then hand each delta to its stream.

The engine thread queues each step's deltas (with the ``PendingText`` of those still without text)
and goes on to the next step; this thread decodes them and delivers them in the order queued, so
a request's deltas arrive in order and after every delta queued before its final one. On the CPU
the forward releases the GIL in its kernels, so this work overlaps the next step; on a GPU it
overlaps the device step. The queue holds at most ``max_steps`` steps: when the thread falls that
far behind, the engine thread waits (back-pressure rather than unbounded memory).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from .output import PendingText, decode_texts
from .request import RequestOutput

log = logging.getLogger(__name__)
_CLOSE = None


class OutputPublisher:
    def __init__(self, deliver: Callable[[RequestOutput], None], max_steps: int = 8):
        """``deliver(delta)`` hands one delta to its consumer (on this thread)."""
        self._deliver = deliver
        self._queue: queue.Queue[tuple[list[RequestOutput], list[PendingText], Callable[[], None] | None] | None] = \
            queue.Queue(max_steps)
        self._thread = threading.Thread(target=self._run, name="loraplex-output", daemon=True)
        self._thread.start()

    def publish(self, outputs: list[RequestOutput], undecoded: list[PendingText],
                before: Callable[[], None] | None = None) -> None:
        """Queue one batch of deltas (any thread; blocks while ``max_steps`` batches wait);
        ``before()`` runs on this thread before they are delivered (the step's metrics)."""
        if outputs or undecoded or before is not None:
            self._queue.put((outputs, undecoded, before))

    def close(self, timeout: float = 10.0) -> None:
        """Deliver everything queued so far, then end the thread."""
        self._queue.put(_CLOSE)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (item := self._queue.get()) is not _CLOSE:
            outputs, undecoded, before = item
            if before is not None:
                try:
                    before()
                except Exception:  # metrics must not stop the deltas
                    log.exception("recording a step's metrics failed")
            decode_texts(undecoded)
            for out in outputs:
                try:
                    self._deliver(out)
                except Exception:  # one consumer's failure must not stop the others
                    log.exception("delivering a delta of request %s failed", out.request_id)
