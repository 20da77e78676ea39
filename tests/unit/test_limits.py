"""Per-tenant limiter: concurrency cap, tokens-per-minute sliding window, queue cap, thread safety."""

from __future__ import annotations

import sys
import threading

import pytest

from loraplex_server.api.limits import TenantLimiter
from loraplex_server.tenancy import RateLimitError, TenantLimits


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def limiter_with(limits: dict[str, TenantLimits], t0: float = 1000.0) -> tuple[TenantLimiter, FakeClock]:
    clock = FakeClock(t0)
    return TenantLimiter(lambda tenant: limits.get(tenant, TenantLimits()), clock=clock), clock


def test_concurrency_cap_and_release():
    limiter, _ = limiter_with({"acme": TenantLimits(max_concurrent=2)})
    first, second = limiter.admit("acme"), limiter.admit("acme")
    assert limiter.in_flight("acme") == 2
    with pytest.raises(RateLimitError, match=r"'acme' has 2 requests in flight \(limit 2\)") as info:
        limiter.admit("acme")
    assert info.value.retry_after_s == pytest.approx(1.0)
    assert limiter.in_flight("acme") == 2  # a refusal takes no slot
    first.release()
    assert limiter.in_flight("acme") == 1
    third = limiter.admit("acme")
    assert limiter.in_flight("acme") == 2
    second.release()
    third.release()
    assert limiter.in_flight("acme") == 0


def test_release_is_idempotent_and_ticket_is_a_context_manager():
    limiter, _ = limiter_with({"acme": TenantLimits(max_concurrent=2)})
    keep = limiter.admit("acme")
    ticket = limiter.admit("acme")
    ticket.release()
    ticket.release()
    assert ticket.released and limiter.in_flight("acme") == 1  # not 0: the second release did nothing
    with limiter.admit("acme") as held:
        assert held.tenant == "acme" and limiter.in_flight("acme") == 2
    assert held.released and limiter.in_flight("acme") == 1
    with pytest.raises(KeyError):
        with limiter.admit("acme"):
            raise KeyError("boom")
    assert limiter.in_flight("acme") == 1
    keep.release()
    keep.release()
    assert limiter.in_flight("acme") == 0


def test_unlimited_tenant_is_never_refused():
    limiter, _ = limiter_with({})
    tickets = [limiter.admit("free") for _ in range(1000)]
    limiter.record_tokens("free", 10**9)
    limiter.admit("free").release()
    assert limiter.in_flight("free") == 1000
    for t in tickets:
        t.release()


def test_tokens_per_minute_refuses_with_retry_after():
    limiter, clock = limiter_with({"acme": TenantLimits(tokens_per_minute=100)}, t0=1000.0)
    limiter.record_tokens("acme", 60)
    clock.t = 1010.0
    limiter.admit("acme").release()  # 60 < 100
    limiter.record_tokens("acme", 40)
    clock.t = 1020.0
    with pytest.raises(RateLimitError, match=r"generated 100 tokens in the last minute \(limit 100\)") as info:
        limiter.admit("acme")
    # the 60 tokens of second 1000 leave the window at 1060, leaving 40 < 100
    assert info.value.retry_after_s == pytest.approx(40.0)
    clock.t = 1059.5
    with pytest.raises(RateLimitError) as info:
        limiter.admit("acme")
    assert info.value.retry_after_s == pytest.approx(0.5)
    clock.t = 1060.0
    limiter.admit("acme").release()
    assert limiter.tokens_in_window("acme") == 40


def test_retry_after_waits_for_as_many_buckets_as_needed():
    limiter, clock = limiter_with({"acme": TenantLimits(tokens_per_minute=100)}, t0=0.0)
    for second in (0.0, 10.0, 20.0):
        clock.t = second
        limiter.record_tokens("acme", 50)
    clock.t = 30.0
    with pytest.raises(RateLimitError) as info:
        limiter.admit("acme")
    # dropping second 0 leaves 100 (still at the limit); dropping second 10 too leaves 50: at t=70
    assert info.value.retry_after_s == pytest.approx(40.0)


def test_retry_after_is_at_least_a_tenth_of_a_second():
    limiter, clock = limiter_with({"acme": TenantLimits(tokens_per_minute=10)}, t0=0.0)
    limiter.record_tokens("acme", 10)
    clock.t = 59.99
    with pytest.raises(RateLimitError) as info:
        limiter.admit("acme")
    assert info.value.retry_after_s == pytest.approx(0.1)


def test_window_slides_and_tokens_expire():
    limiter, clock = limiter_with({}, t0=0.0)
    limiter.record_tokens("acme", 5)
    clock.t = 0.9
    limiter.record_tokens("acme", 5)  # same second bucket
    clock.t = 30.0
    limiter.record_tokens("acme", 7)
    assert limiter.tokens_in_window("acme") == 17
    clock.t = 59.99
    assert limiter.tokens_in_window("acme") == 17
    clock.t = 60.0
    assert limiter.tokens_in_window("acme") == 7
    clock.t = 90.0
    assert limiter.tokens_in_window("acme") == 0
    assert limiter._tenants == {}  # idle tenants are forgotten: memory stays bounded


def test_window_holds_at_most_a_minute_of_buckets():
    limiter, clock = limiter_with({"acme": TenantLimits(tokens_per_minute=10**9)}, t0=0.0)
    for i in range(600):
        clock.t = i * 0.5
        limiter.record_tokens("acme", 1)
    assert len(limiter._tenants["acme"].buckets) <= 61
    assert limiter.tokens_in_window("acme") == 120  # seconds 240..299, two records each


def test_record_tokens_validates_count():
    limiter, _ = limiter_with({})
    with pytest.raises(ValueError):
        limiter.record_tokens("acme", -1)
    limiter.record_tokens("acme", 0)
    assert limiter.tokens_in_window("acme") == 0


def test_ticket_record_tokens_counts_for_its_tenant():
    limiter, _ = limiter_with({})
    with limiter.admit("acme") as ticket:
        ticket.record_tokens(12)
    assert limiter.tokens_in_window("acme") == 12 and limiter.tokens_in_window("other") == 0


def test_queue_cap():
    limiter, _ = limiter_with({"acme": TenantLimits(max_queued=3)})
    tickets = [limiter.admit("acme") for _ in range(3)]
    with pytest.raises(RateLimitError, match=r"'acme' has 3 requests queued \(limit 3\)") as info:
        limiter.admit("acme")
    assert info.value.retry_after_s == pytest.approx(1.0)
    limiter.admit("other").release()
    tickets[0].started()  # no longer queued: one more may queue
    tickets.append(limiter.admit("acme"))
    with pytest.raises(RateLimitError):
        limiter.admit("acme")
    for ticket in tickets:
        ticket.release()
    assert limiter.queued("acme") == limiter.in_flight("acme") == 0


def test_tenants_are_independent():
    limits = {"a": TenantLimits(max_concurrent=1, tokens_per_minute=10), "b": TenantLimits(max_concurrent=1,
                                                                                         tokens_per_minute=10)}
    limiter, _ = limiter_with(limits)
    held = limiter.admit("a")
    with pytest.raises(RateLimitError):
        limiter.admit("a")
    other = limiter.admit("b")
    assert limiter.in_flight("a") == 1 and limiter.in_flight("b") == 1
    other.release()
    limiter.record_tokens("a", 10)
    held.release()
    with pytest.raises(RateLimitError):
        limiter.admit("a")
    limiter.admit("b").release()
    assert limiter.tokens_in_window("b") == 0


def test_limit_changes_apply_to_the_next_admission():
    limits = {"acme": TenantLimits(max_concurrent=1)}
    limiter, _ = limiter_with(limits)
    held = limiter.admit("acme")
    with pytest.raises(RateLimitError):
        limiter.admit("acme")
    limits["acme"] = TenantLimits(max_concurrent=2)  # e.g. the keys file was reloaded
    limiter.admit("acme").release()
    held.release()


def test_threads_never_exceed_the_cap_and_counts_balance():
    cap, threads_n, rounds = 3, 8, 400
    limiter = TenantLimiter(lambda tenant: TenantLimits(max_concurrent=cap, tokens_per_minute=10**9))
    guard = threading.Lock()
    state = {"now": 0, "peak": 0, "admitted": 0}
    errors: list[BaseException] = []

    def worker():
        try:
            for _ in range(rounds):
                try:
                    ticket = limiter.admit("acme")
                except RateLimitError:
                    continue
                with guard:
                    state["now"] += 1
                    state["peak"] = max(state["peak"], state["now"])
                    state["admitted"] += 1
                ticket.record_tokens(1)
                with guard:
                    state["now"] -= 1
                ticket.release()
                ticket.release()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    workers = [threading.Thread(target=worker) for _ in range(threads_n)]
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so races show up
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        sys.setswitchinterval(old_interval)
    assert not errors
    assert 1 <= state["peak"] <= cap
    assert limiter.in_flight("acme") == 0
    assert limiter.tokens_in_window("acme") == state["admitted"]


def test_tenant_limits_and_rate_limit_error_values():
    assert TenantLimits() == TenantLimits(None, None, None, 1.0)
    for bad in (dict(max_concurrent=0), dict(max_queued=-2), dict(tokens_per_minute=1.5),
                dict(weight=0.0), dict(weight=-1), dict(weight=float("nan")), dict(weight="1")):
        with pytest.raises(ValueError):
            TenantLimits(**bad)
    err = RateLimitError("slow down", 2.25)
    assert str(err) == "slow down" and err.retry_after_s == 2.25
    assert err.trailing_metadata() == (("retry-after-s", "2.250"),)


def test_state_is_read_and_changed_under_the_lock():
    # Thread races rarely show under CPython's GIL, so check directly that the clock (read next to
    # every state change) is only ever called with the limiter's lock held.
    seen: list[bool] = []
    limiter: TenantLimiter

    def clock() -> float:
        seen.append(limiter._lock.locked())
        return 0.0

    limiter = TenantLimiter(lambda tenant: TenantLimits(max_concurrent=1, tokens_per_minute=100), clock=clock)
    ticket = limiter.admit("acme")
    with pytest.raises(RateLimitError):
        limiter.admit("acme")
    ticket.record_tokens(5)
    ticket.release()
    assert limiter.tokens_in_window("acme") == 5
    assert len(seen) >= 4 and all(seen)
