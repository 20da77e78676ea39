"""Retry policy shared by the sync and async clients.

Only idempotent calls are retried, only on ``UNAVAILABLE``, with exponential backoff and
jitter, and never past the call's overall deadline.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import grpc

from loraplex.errors import status_code_of


@dataclass(frozen=True)
class RetryPolicy:
    """``retries`` extra attempts; the n-th wait is ``initial * multiplier**n`` capped at ``maximum``,
    jittered down to between half and all of that."""

    retries: int = 3
    initial: float = 0.1
    multiplier: float = 2.0
    maximum: float = 2.0

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")

    def backoff(self, attempt: int) -> float:
        """The wait in seconds after failed attempt number ``attempt`` (0-based)."""
        ceiling = min(self.maximum, self.initial * self.multiplier ** attempt)
        return ceiling * random.uniform(0.5, 1.0)

    def next_delay(self, err: grpc.RpcError, attempt: int, idempotent: bool,
                   deadline: float | None) -> float | None:
        """The wait before retrying after ``err``, or ``None`` if the error must be raised."""
        if not idempotent or attempt >= self.retries:
            return None
        if status_code_of(err) != grpc.StatusCode.UNAVAILABLE:
            return None
        delay = self.backoff(attempt)
        if deadline is not None and time.monotonic() + delay >= deadline:
            return None
        return delay


def deadline_after(timeout: float | None) -> float | None:
    """The monotonic time at which a call with ``timeout`` seconds must be over."""
    return None if timeout is None else time.monotonic() + timeout


def remaining(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` (never negative), or ``None`` for no deadline."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())
