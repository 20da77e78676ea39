"""Per-tenant admission limits: concurrent requests, queued requests, generated tokens per minute.

:class:`TenantLimiter` reads each tenant's :class:`~loraplex_server.tenancy.TenantLimits` through a
callable (usually ``KeyStore.limits_for``), so limit changes in a reloaded keys file apply to the
next admission. ``weight`` is not enforced here; it is for the scheduler's fair share.

Tokens-per-minute is a 60 s sliding window with 1 s resolution: tokens recorded at time ``t`` count
until ``floor(t) + 60``. Each tenant keeps at most ~60 per-second buckets, so recording and
checking are O(1) amortised.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Self

from ..tenancy import RateLimitError, TenantLimits

WINDOW_S = 60.0
CONCURRENCY_RETRY_AFTER_S = 1.0
QUEUE_RETRY_AFTER_S = 1.0
MIN_RETRY_AFTER_S = 0.1


class _TenantState:
    """In-flight count and the token window of one tenant. Guarded by the limiter's lock."""

    __slots__ = ("buckets", "in_flight", "queued", "window_tokens")

    def __init__(self) -> None:
        self.in_flight = 0
        self.queued = 0  # admitted requests that have not produced output yet
        self.buckets: deque[list[int]] = deque()  # [second, tokens], oldest first
        self.window_tokens = 0

    def expire(self, now: float) -> None:
        """Drop the buckets that left the window (bucket ``s`` counts until ``s + 60``)."""
        while self.buckets and self.buckets[0][0] + WINDOW_S <= now:
            self.window_tokens -= self.buckets.popleft()[1]

    def add(self, now: float, tokens: int) -> None:
        """Add ``tokens`` to the bucket of second ``floor(now)`` (or the newest, if time went back)."""
        second = math.floor(now)
        if self.buckets and self.buckets[-1][0] >= second:
            self.buckets[-1][1] += tokens
        else:
            self.buckets.append([second, tokens])
        self.window_tokens += tokens

    def retry_after(self, now: float, limit: int) -> float:
        """Seconds until enough buckets expire to bring the window under ``limit``."""
        remaining = self.window_tokens
        for second, tokens in self.buckets:
            remaining -= tokens
            if remaining < limit:
                return max(MIN_RETRY_AFTER_S, second + WINDOW_S - now)
        return MIN_RETRY_AFTER_S  # not reached: an empty window is under any limit >= 1

    def idle(self) -> bool:
        return self.in_flight == 0 and self.queued == 0 and not self.buckets


class Ticket:
    """One admitted request. ``release()`` (idempotent) or leave the ``with`` block to free the slot.

    A ticket starts queued (it counts against ``max_queued``) until ``started()`` or ``release()``."""

    __slots__ = ("_limiter", "_released", "queued", "tenant")

    def __init__(self, limiter: TenantLimiter, tenant: str):
        self._limiter = limiter
        self.tenant = tenant
        self._released = False
        self.queued = True

    def started(self) -> None:
        """The request produced its first output: it no longer counts as queued (idempotent)."""
        if self.queued:  # unlocked fast path for every later delta; _dequeue re-checks under the lock
            self._limiter._dequeue(self)

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """Give the concurrency slot back; later calls do nothing."""
        self._limiter._release(self)

    def record_tokens(self, n: int) -> None:
        """Shorthand for ``limiter.record_tokens(ticket.tenant, n)``."""
        self._limiter.record_tokens(self.tenant, n)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


class TenantLimiter:
    """Admits or refuses requests per tenant (RateLimitError with ``retry_after_s``). Thread-safe."""

    def __init__(self, limits_for: Callable[[str], TenantLimits], clock: Callable[[], float] = time.monotonic):
        self._limits_for = limits_for
        self._clock = clock
        self._lock = threading.Lock()
        self._tenants: dict[str, _TenantState] = {}

    def admit(self, tenant: str) -> Ticket:
        """Take a concurrency slot and a queue slot for ``tenant``, or raise RateLimitError.

        Refused when the tenant has ``max_queued`` admitted requests that have not started yet,
        when the tenant already has ``max_concurrent`` requests in flight (retry after ~1 s)
        or generated ``tokens_per_minute`` tokens or more in the last 60 s (retry after the time
        until enough of the window expires, at least 0.1 s).
        """
        limits = self._limits_for(tenant)  # outside our lock: it may take the key store's lock
        with self._lock:  # check and count in one critical section: a burst cannot overshoot
            now = self._clock()
            state = self._tenants.get(tenant) or _TenantState()
            if limits.max_queued is not None and state.queued >= limits.max_queued:
                raise RateLimitError(f"tenant {tenant!r} has {state.queued} requests queued "
                                     f"(limit {limits.max_queued})", QUEUE_RETRY_AFTER_S)
            if limits.max_concurrent is not None and state.in_flight >= limits.max_concurrent:
                raise RateLimitError(
                    f"tenant {tenant!r} has {state.in_flight} requests in flight (limit {limits.max_concurrent})",
                    CONCURRENCY_RETRY_AFTER_S)
            if limits.tokens_per_minute is not None:
                state.expire(now)
                if state.window_tokens >= limits.tokens_per_minute:
                    raise RateLimitError(
                        f"tenant {tenant!r} generated {state.window_tokens} tokens in the last minute "
                        f"(limit {limits.tokens_per_minute})",
                        state.retry_after(now, limits.tokens_per_minute))
            state.in_flight += 1
            state.queued += 1
            self._tenants[tenant] = state
        return Ticket(self, tenant)

    def record_tokens(self, tenant: str, n: int) -> None:
        """Count ``n`` generated tokens for ``tenant`` at the current time."""
        if n < 0:
            raise ValueError(f"token count must be >= 0, got {n}")
        if n == 0:
            return
        with self._lock:
            now = self._clock()
            state = self._tenants.setdefault(tenant, _TenantState())
            state.expire(now)
            state.add(now, n)

    def queued(self, tenant: str) -> int:
        """Requests of ``tenant`` admitted that have not produced output yet."""
        with self._lock:
            state = self._tenants.get(tenant)
            return state.queued if state else 0

    def in_flight(self, tenant: str) -> int:
        """Requests of ``tenant`` admitted and not yet released."""
        with self._lock:
            state = self._tenants.get(tenant)
            return state.in_flight if state else 0

    def tokens_in_window(self, tenant: str) -> int:
        """Tokens ``tenant`` generated in the current 60 s window."""
        with self._lock:
            state = self._tenants.get(tenant)
            if state is None:
                return 0
            state.expire(self._clock())
            self._forget_if_idle(tenant, state)
            return state.window_tokens

    def _dequeue(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket.queued:
                ticket.queued = False
                self._tenants[ticket.tenant].queued -= 1

    def _release(self, ticket: Ticket) -> None:
        self._dequeue(ticket)
        with self._lock:
            if ticket._released:
                return
            ticket._released = True
            state = self._tenants[ticket.tenant]
            state.in_flight -= 1
            state.expire(self._clock())
            self._forget_if_idle(ticket.tenant, state)

    def _forget_if_idle(self, tenant: str, state: _TenantState) -> None:
        """Drop a tenant with nothing in flight and an empty window, so memory stays bounded."""
        if state.idle():
            self._tenants.pop(tenant, None)
