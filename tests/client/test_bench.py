"""``loraplex.bench`` against the fake in-process server (fake_loraplex_server.py).

``BenchFake`` streams exactly ``max_new_tokens`` one-token chunks (optionally with a per-token
delay), counts concurrent streams and records when each one arrived. Timing checks run the bench
on a ``VirtualClock`` (time that moves only when the bench sleeps or the fake server spends its
token delay), so they are exact and do not depend on how busy the machine is.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import sys
import threading
import time
from collections import Counter

import grpc
import pytest

from fake_loraplex_server import FakeLoraplex, serve_fake
from loraplex._bench_stats import arrival_times, popularity_weights
from loraplex.bench import (
    TOKEN_ID_RANGE,
    BenchClock,
    BenchConfig,
    BenchResult,
    LengthDist,
    RequestRecord,
    percentile,
    plan_requests,
    run_bench,
    summarize,
)
from loraplex.cli import main
from loraplex.v1 import loraplex_pb2 as pb


class VirtualClock:
    """The bench's clock in virtual seconds, starting at 0.

    ``sleep(s)`` first lets the event loop run (so requests just dispatched read their start time
    at the current instant), then moves the time on by ``s``, plus ``late`` (a sleep that
    overshoots), or minus ``early`` when ``s > 2 * early`` (a sleep that ends early). ``advance``
    is for the fake server: its token delay spent in virtual time.
    """

    def __init__(self, late: float = 0.0, early: float = 0.0) -> None:
        self.t = 0.0
        self.late, self.early = late, early
        self.sleeps: list[float] = []
        self.lock = threading.Lock()

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.t += seconds

    async def sleep(self, seconds: float) -> None:
        assert seconds > 0 and len(self.sleeps) < 10_000, "the bench slept for nothing, or forever"
        self.sleeps.append(seconds)
        await asyncio.sleep(0)
        self.advance(seconds + self.late - (self.early if seconds > 2 * self.early else 0.0))

    @property
    def bench(self) -> BenchClock:
        return BenchClock(now=self.now, sleep=self.sleep)


def expected_starts(arrivals: list[float], late: float) -> list[float]:
    """Reference: when each request starts if every sleep overshoots by ``late`` and the bench
    waits for each arrival on the schedule (not for the gap since the previous start)."""
    t, starts = 0.0, []
    for arrival in arrivals:
        if arrival > t:
            t = arrival + late
        starts.append(t)
    return starts


class BenchFake(FakeLoraplex):
    """A fake whose GenerateStream honours ``max_new_tokens`` and counts streams in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.token_delay = 0.0                      # seconds before each token
        self.clock: VirtualClock | None = None      # set: the token delay is virtual, not slept
        self.abort_after_tokens: int | None = None  # then fail the stream with INTERNAL
        self.in_flight = 0
        self.max_in_flight = 0
        self.arrivals: list[tuple[float, tuple[int, ...]]] = []  # (time.monotonic(), prompt ids) per stream

    def GenerateStream(self, request, context):  # noqa: N802
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.arrivals.append((time.monotonic(), tuple(request.prompt_token_ids.ids)))
        try:
            self._enter("GenerateStream", request, context)
            n = request.sampling.max_new_tokens or 16
            for i in range(n):
                if self.abort_after_tokens is not None and i == self.abort_after_tokens:
                    context.abort(grpc.StatusCode.INTERNAL, "boom")
                if self.token_delay and self.clock is not None:
                    self.clock.advance(self.token_delay)
                elif self.token_delay:
                    time.sleep(self.token_delay)
                chunk = pb.GenerateStreamResponse(text=f"t{i} ", token_ids=[1000 + i],
                                                  adapter_id=request.adapter_id)
                if i == n - 1:
                    chunk.finish_reason = pb.FINISH_REASON_LENGTH
                    chunk.usage.CopyFrom(pb.Usage(prompt_tokens=len(request.prompt_token_ids.ids),
                                                  completion_tokens=n))
                yield chunk
        finally:
            with self.lock:
                self.in_flight -= 1

    def stream_requests(self) -> list[pb.GenerateRequest]:
        return [call.request for call in self.calls_of("GenerateStream")]


@pytest.fixture
def bench_fake():
    """A started BenchFake with more server threads than any test's concurrency, so the server
    would see it if the client overshot."""
    servicer = BenchFake()
    server = serve_fake(servicer, max_workers=48)
    yield servicer
    server.stop(None).wait(5)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("LORAPLEX_TARGET", raising=False)
    monkeypatch.delenv("LORAPLEX_API_KEY", raising=False)


def config(fake, **kwargs) -> BenchConfig:
    defaults = dict(target=fake.target, prompt_len="fixed:4", output_len="fixed:2", warmup=0,
                    timeout_s=10.0)
    return BenchConfig(**{**defaults, **kwargs})


# ---------------------------------------------------------------- stats on known data


def test_percentile_linear_interpolation_hand_computed():
    data = [10, 1, 9, 2, 8, 3, 7, 4, 6, 5]  # 1..10, unsorted
    assert percentile(data, 0) == 1
    assert percentile(data, 100) == 10
    assert percentile(data, 50) == pytest.approx(5.5)    # rank 4.5
    assert percentile(data, 90) == pytest.approx(9.1)    # rank 8.1 -> 9 + 0.1
    assert percentile(data, 99) == pytest.approx(9.91)   # rank 8.91 -> 9 + 0.91
    assert percentile([3, 1, 2], 50) == 2
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile([1], 101)


def test_summarize_hand_computed():
    stats = summarize([0.4, 0.1, 0.3, 0.2])
    assert stats.count == 4
    assert stats.mean == pytest.approx(0.25)
    assert stats.p50 == pytest.approx(0.25)   # rank 1.5
    assert stats.p90 == pytest.approx(0.37)   # rank 2.7 -> 0.3 + 0.7 * 0.1
    assert stats.p99 == pytest.approx(0.397)  # rank 2.97
    empty = summarize([])
    assert (empty.count, empty.mean, empty.p50, empty.p90, empty.p99) == (0, None, None, None, None)


def test_request_record_ttft_tpot_e2e():
    rec = RequestRecord(0, "a", 8, 5, start_s=1.0, end_s=2.2, first_token_s=1.5,
                        chunk_times_s=[1.5, 1.7, 2.1], output_tokens=5)  # one chunk had 3 tokens
    assert rec.ttft_s == pytest.approx(0.5)
    assert rec.tpot_s == pytest.approx((2.1 - 1.5) / 4)
    assert rec.e2e_s == pytest.approx(1.2)
    one = RequestRecord(1, "a", 8, 1, start_s=0.0, end_s=0.3, first_token_s=0.2,
                        chunk_times_s=[0.2], output_tokens=1)
    assert one.tpot_s is None and one.ttft_s == pytest.approx(0.2)


def test_result_from_known_records():
    cfg = BenchConfig(adapters=["a", "b", ""], warmup=0)
    recs = [
        RequestRecord(0, "a", 10, 4, start_s=0.0, end_s=1.0, first_token_s=0.1,
                      chunk_times_s=[0.1, 0.4, 0.7, 1.0], output_tokens=4),
        RequestRecord(1, "a", 20, 3, start_s=0.5, end_s=2.0, first_token_s=0.8,
                      chunk_times_s=[0.8, 1.4, 2.0], output_tokens=3),
        RequestRecord(2, "b", 5, 3, start_s=1.0, end_s=1.5, first_token_s=1.2,
                      chunk_times_s=[1.2], output_tokens=1, error="ResourceExhaustedError",
                      error_code="RESOURCE_EXHAUSTED"),
        RequestRecord(3, "", 5, 3, start_s=1.0, end_s=1.1, error="NotFoundError",
                      error_code="NOT_FOUND"),
    ]
    res = BenchResult.from_records(cfg, recs)
    assert res.duration_s == pytest.approx(2.0)          # first start 0.0 -> last end 2.0
    assert (res.sent, res.completed, res.failed) == (4, 2, 2)
    assert res.errors == {"RESOURCE_EXHAUSTED": 1, "NOT_FOUND": 1}
    assert (res.prompt_tokens, res.output_tokens) == (30, 7)  # failed requests left out
    assert res.requests_per_s == pytest.approx(1.0)
    assert res.output_tokens_per_s == pytest.approx(3.5)
    assert res.total_tokens_per_s == pytest.approx(18.5)
    assert res.ttft.mean == pytest.approx(0.2)           # 0.1 and 0.3
    assert res.tpot.mean == pytest.approx(0.45)          # 0.9/3 and 1.2/2
    assert res.e2e.p50 == pytest.approx(1.25)            # 1.0 and 1.5
    assert res.adapter_requests == {"a": 2, "b": 1, "": 1}
    assert res.adapter_completed == {"a": 2, "b": 0, "": 0}
    assert res.short_outputs == 0
    recs[1].output_tokens = 2   # the server stopped early: flagged, since lengths must be exact
    assert BenchResult.from_records(cfg, recs).short_outputs == 1


# ---------------------------------------------------------------- config, plans, distributions


def test_length_specs():
    rng = random.Random(1)
    assert [LengthDist.parse("fixed:64").sample(rng) for _ in range(3)] == [64, 64, 64]
    uni = [LengthDist.parse("uniform:3:5").sample(rng) for _ in range(300)]
    assert set(uni) == {3, 4, 5}
    normal = [LengthDist.parse("normal:2:5").sample(rng) for _ in range(500)]
    assert min(normal) == 1 and all(isinstance(n, int) for n in normal)  # clipped at 1
    wide = [LengthDist.parse("normal:64:16").sample(rng) for _ in range(2000)]
    assert statistics.mean(wide) == pytest.approx(64, abs=1.5)
    for bad in ("fixed:0", "uniform:9:3", "normal:5:-1", "zipf:3", "fixed", "fixed:x", ""):
        with pytest.raises(ValueError):
            LengthDist.parse(bad)


def test_config_is_checked():
    for kwargs in ({"mode": "open"}, {"mode": "burst"}, {"concurrency": 0},
                   {"adapters": []}, {"adapters": "a,b"}, {"popularity": "pareto"},
                   {"popularity": "zipf", "zipf_alpha": 0}, {"prompt_len": "fixed:0"},
                   {"num_requests": 0}, {"timeout_s": 0}, {"duration_s": -1}, {"warmup": -1}):
        with pytest.raises(ValueError):
            BenchConfig(**kwargs)
    BenchConfig(mode="open", rate=2.5)


def test_plans_are_reproducible_and_independent():
    cfg = BenchConfig(adapters=["a", "b", "c"], prompt_len="uniform:1:50", num_requests=40,
                      seed=3)
    assert plan_requests(cfg) == plan_requests(cfg)
    other = BenchConfig(adapters=["a", "b", "c"], prompt_len="uniform:1:50", num_requests=40,
                        seed=4)
    assert plan_requests(other) != plan_requests(cfg)
    # the output lengths have their own stream: changing them does not change adapters or prompts
    longer = BenchConfig(adapters=["a", "b", "c"], prompt_len="uniform:1:50", num_requests=40,
                         seed=3, output_len="uniform:1:9", warmup=5)
    assert [(p.adapter_id, p.token_ids) for p in plan_requests(longer)] == \
        [(p.adapter_id, p.token_ids) for p in plan_requests(cfg)]


def test_poisson_arrival_schedule():
    rate = 20.0
    times = arrival_times(5000, rate, random.Random(0))
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert times[0] == 0.0 and all(g >= 0 for g in gaps)
    mean = statistics.mean(gaps)
    assert mean == pytest.approx(1 / rate, rel=0.04)
    assert statistics.pstdev(gaps) / mean == pytest.approx(1.0, rel=0.06)   # exponential: CV 1
    below = sum(g < 1 / rate for g in gaps) / len(gaps)
    assert below == pytest.approx(1 - math.exp(-1), abs=0.03)                # P(X < mean)


def test_zipf_weights():
    w = popularity_weights(3, "zipf", 1.0)
    assert w == pytest.approx([6 / 11, 3 / 11, 2 / 11])
    assert popularity_weights(4, "uniform") == [0.25] * 4


# ---------------------------------------------------------------- against the fake server


def test_closed_loop_never_exceeds_concurrency(bench_fake):
    bench_fake.token_delay = 0.01
    result = run_bench(config(bench_fake, concurrency=3, num_requests=12, output_len="fixed:4",
                              warmup=1))
    assert result.completed == 12 and result.errors == {}
    assert bench_fake.max_in_flight == 3          # reached, never exceeded
    assert len(bench_fake.stream_requests()) == 13
    assert result.ttft.count == 12 and result.tpot.count == 12
    for r in result.records:  # one time per token chunk, in order, between start and end
        assert len(r.chunk_times_s) == 4 and r.chunk_times_s == sorted(r.chunk_times_s)
        assert r.start_s <= r.first_token_s == r.chunk_times_s[0] and r.chunk_times_s[-1] <= r.end_s
    assert result.e2e.p50 >= 0.03   # the server slept 4 x 10 ms in each (a lower bound cannot flake)


def test_closed_loop_of_one_is_sequential(bench_fake):
    bench_fake.token_delay = 0.005
    result = run_bench(config(bench_fake, concurrency=1, num_requests=5))
    assert result.completed == 5 and bench_fake.max_in_flight == 1
    recs = sorted(result.records, key=lambda r: r.start_s)
    assert all(a.end_s <= b.start_s for a, b in zip(recs, recs[1:]))


def open_config(fake, **kwargs) -> BenchConfig:
    return config(fake, mode="open", rate=20.0, num_requests=20, output_len="fixed:1", seed=7,
                  **kwargs)


def test_open_loop_starts_each_request_at_its_planned_arrival(bench_fake):
    """Virtual time: every request starts exactly on plan, never early, and the bench slept
    exactly the gaps of the Poisson schedule (a dispatcher that ignored the plan sends them all at
    0 and never sleeps)."""
    cfg = open_config(bench_fake)
    planned = [p.arrival_s for p in plan_requests(cfg)]
    assert (planned[-1] - planned[0]) / 19 == pytest.approx(1 / 20.0, rel=0.35)  # this seed vs the rate
    clock = VirtualClock()
    result = run_bench(cfg, clock.bench)
    assert result.completed == 20 and len(bench_fake.stream_requests()) == 20
    records = sorted(result.records, key=lambda r: r.index)
    assert [r.scheduled_s for r in records] == planned
    for r in records:
        assert r.scheduled_s <= r.start_s <= r.scheduled_s + 1e-9
    assert result.max_arrival_lag_s == pytest.approx(0.0, abs=1e-9)
    gaps = [b - a for a, b in zip(planned, planned[1:])]
    assert [s for s in clock.sleeps if s > 1e-9] == pytest.approx(gaps, abs=1e-9)


def test_open_loop_lateness_is_measured_and_does_not_accumulate(bench_fake):
    """Every sleep overshoots by 30 ms: a request that waited starts 30 ms late, one already due
    starts at once, and the lateness never builds up over the run (the bench waits for each
    planned arrival, not for the gap since the previous start). max_arrival_lag_s reports it."""
    late = 0.03
    cfg = open_config(bench_fake)
    planned = [p.arrival_s for p in plan_requests(cfg)]
    assert any(b - a < late for a, b in zip(planned, planned[1:]))  # some start without sleeping
    result = run_bench(cfg, VirtualClock(late=late).bench)
    assert result.completed == 20
    starts = [r.start_s for r in sorted(result.records, key=lambda r: r.index)]
    expected = expected_starts(planned, late)
    assert starts == pytest.approx(expected, abs=1e-9)
    lags = [s - p for s, p in zip(starts, planned)]
    assert max(lags) == pytest.approx(late, abs=1e-9) and min(lags) == pytest.approx(0.0, abs=1e-9)
    assert result.max_arrival_lag_s == pytest.approx(late, abs=1e-9)


def test_open_loop_never_starts_early_when_a_sleep_ends_early(bench_fake):
    """Sleeps that wake 4 ms early (asyncio may wake timers early by its clock resolution): the
    bench checks the time again and sleeps the rest, so no request starts before its arrival."""
    cfg = open_config(bench_fake)
    planned = [p.arrival_s for p in plan_requests(cfg)]
    clock = VirtualClock(early=0.004)
    result = run_bench(cfg, clock.bench)
    assert result.completed == 20
    for r in result.records:
        assert r.scheduled_s <= r.start_s <= r.scheduled_s + 1e-9
    woke_early = sum(b - a > 0.008 for a, b in zip(planned, planned[1:]))
    assert woke_early > 5 and len(clock.sleeps) >= 19 + woke_early  # each of those slept again


def test_open_loop_does_not_wait_for_responses(bench_fake):
    """Each request takes >= 0.25 s of real server time, while virtual arrivals are due at once:
    a loop that awaited each response before the next arrival would never have 2 in flight."""
    bench_fake.token_delay = 0.05
    result = run_bench(config(bench_fake, mode="open", rate=50.0, num_requests=12,
                              output_len="fixed:5", seed=1), VirtualClock().bench)
    assert result.completed == 12
    assert bench_fake.max_in_flight >= 4


def test_zipf_skews_toward_first_adapter(bench_fake):
    adapters = ["a", "b", "c", "d"]
    zipf = run_bench(config(bench_fake, adapters=adapters, popularity="zipf", zipf_alpha=1.2,
                            num_requests=120, concurrency=8, prompt_len="fixed:1",
                            output_len="fixed:1"))
    server_counts = Counter(r.adapter_id for r in bench_fake.stream_requests())
    assert zipf.adapter_completed == {a: server_counts[a] for a in adapters}
    del bench_fake.calls[:]
    uniform = run_bench(config(bench_fake, adapters=adapters, popularity="uniform",
                               num_requests=120, concurrency=8, prompt_len="fixed:1",
                               output_len="fixed:1"))
    z, u = zipf.adapter_completed, uniform.adapter_completed
    assert sum(z.values()) == sum(u.values()) == 120
    assert z["a"] == max(z.values()) and z["a"] > 0.4 * 120   # expected share 0.53
    assert z["a"] > z["b"] > z["d"]
    assert max(u.values()) < 0.35 * 120 and min(u.values()) > 0.15 * 120
    assert z["a"] > u["a"] + 20


def test_exact_lengths_reach_the_server(bench_fake):
    cfg = config(bench_fake, prompt_len="uniform:3:40", output_len="normal:6:3", num_requests=15,
                 concurrency=4, adapters=["", "x"], warmup=2)
    result = run_bench(cfg)
    reqs = bench_fake.stream_requests()
    assert len(reqs) == 17
    plans = plan_requests(cfg, warmup=True) + plan_requests(cfg)
    assert sorted((tuple(r.prompt_token_ids.ids), r.sampling.max_new_tokens, r.adapter_id)
                  for r in reqs) == \
        sorted((p.token_ids, p.max_new_tokens, p.adapter_id) for p in plans)
    lo, hi = TOKEN_ID_RANGE
    for r in reqs:
        assert r.WhichOneof("input") == "prompt_token_ids"
        assert all(lo <= t < hi for t in r.prompt_token_ids.ids)
        assert r.sampling.ignore_eos and r.sampling.temperature == 0
    assert len({len(r.prompt_token_ids.ids) for r in reqs}) > 3   # lengths do vary
    for rec in result.records:
        assert rec.output_tokens == rec.max_new_tokens
    measured = plan_requests(cfg)
    assert result.output_tokens == sum(p.max_new_tokens for p in measured)
    assert result.prompt_tokens == sum(len(p.token_ids) for p in measured)


def test_fixed_lengths_are_exact(bench_fake):
    result = run_bench(config(bench_fake, prompt_len="fixed:64", output_len="fixed:7",
                              num_requests=4, concurrency=2))
    for r in bench_fake.stream_requests():
        assert len(r.prompt_token_ids.ids) == 64 and r.sampling.max_new_tokens == 7
    assert result.output_tokens == 28 and result.prompt_tokens == 256


def test_warmup_is_excluded(bench_fake):
    result = run_bench(config(bench_fake, adapters=["p", "q", "r"], warmup=2, num_requests=4,
                              concurrency=1))
    reqs = bench_fake.stream_requests()
    assert len(reqs) == 6 and [r.adapter_id for r in reqs[:2]] == ["p", "q"]
    assert result.sent == 4 and result.completed == 4


def test_errors_counted_by_code_without_stopping(bench_fake):
    bench_fake.fail("GenerateStream", grpc.StatusCode.RESOURCE_EXHAUSTED, times=2,
                    details="queue full")
    bench_fake.fail("GenerateStream", grpc.StatusCode.NOT_FOUND, times=1)
    result = run_bench(config(bench_fake, num_requests=7, concurrency=1))
    assert result.errors == {"RESOURCE_EXHAUSTED": 2, "NOT_FOUND": 1}
    assert (result.sent, result.completed, result.failed) == (7, 4, 3)
    failed = [r for r in result.records if not r.ok]
    assert {r.error for r in failed} == {"ResourceExhaustedError", "NotFoundError"}
    assert result.e2e.count == 4 and result.output_tokens == 8


def test_midstream_failure_is_an_error_and_its_tokens_are_not_counted(bench_fake):
    bench_fake.abort_after_tokens = 2
    result = run_bench(config(bench_fake, num_requests=3, output_len="fixed:5"))
    assert result.errors == {"INTERNAL": 3} and result.completed == 0
    assert all(r.output_tokens == 2 for r in result.records)
    assert result.output_tokens == 0 and result.ttft.count == 0
    assert result.output_tokens_per_s == 0.0


def test_request_timeout_is_deadline_exceeded(bench_fake):
    bench_fake.token_delay = 0.1
    result = run_bench(config(bench_fake, num_requests=2, output_len="fixed:20", timeout_s=0.3))
    assert result.errors == {"DEADLINE_EXCEEDED": 2}
    assert all(r.e2e_s < 1.5 for r in result.records)


def test_unreachable_server_counts_unavailable(dead_target):
    result = run_bench(BenchConfig(target=dead_target, num_requests=3, warmup=1, timeout_s=5))
    assert result.errors == {"UNAVAILABLE": 3} and result.completed == 0
    assert result.warmup_errors == {"UNAVAILABLE": 1}
    md = result.to_markdown()
    assert "| Errors | UNAVAILABLE: 3 |" in md and "| Warm-up errors | UNAVAILABLE: 1 |" in md


def test_duration_caps_the_run(bench_fake):
    """Virtual time: the fake server spends 5 x 20 ms per request, so one at a time the closed loop
    starts requests at 0, 0.1 and 0.2 s and none at 0.3 s, past duration_s = 0.25 s. The open loop
    sends exactly the planned arrivals before duration_s and sleeps no further."""
    bench_fake.clock = VirtualClock()
    bench_fake.token_delay = 0.02
    closed = run_bench(config(bench_fake, concurrency=1, num_requests=100, output_len="fixed:5",
                              duration_s=0.25), bench_fake.clock.bench)
    assert closed.sent == closed.completed == 3
    assert [r.start_s for r in sorted(closed.records, key=lambda r: r.index)] == \
        pytest.approx([0.0, 0.1, 0.2], abs=1e-9)
    assert closed.e2e.mean == pytest.approx(0.1, abs=1e-9)  # the 5 token delays, exactly
    bench_fake.clock = None
    bench_fake.token_delay = 0.0
    cfg = config(bench_fake, mode="open", rate=20.0, num_requests=100, duration_s=0.4,
                 output_len="fixed:1")
    clock = VirtualClock()
    opened = run_bench(cfg, clock.bench)
    in_time = [p.arrival_s for p in plan_requests(cfg) if p.arrival_s < 0.4]
    assert opened.sent == opened.completed == len(in_time) < 100
    assert clock.t == pytest.approx(in_time[-1], abs=1e-9)  # no sleep towards an arrival past the cap


def test_openai_backend_times_chunks_on_the_bench_clock():
    """The HTTP sender reads the same clock as the rest of the bench (chunk times are ``now - t0``)."""
    from loraplex._bench_openai import OpenAISender

    clock = VirtualClock()
    sender = OpenAISender("127.0.0.1:1", None, None, now=clock.now)
    record = RequestRecord(0, "", 4, 2, start_s=0.0)
    clock.advance(10.5)
    sender._chunk({"choices": [{"text": "a"}]}, record, t0=10.0)
    clock.advance(0.25)
    sender._chunk({"choices": [{"text": "b"}]}, record, t0=10.0)
    sender._chunk({"choices": [], "usage": {"completion_tokens": 2}}, record, t0=10.0)
    assert record.first_token_s == 0.5 and record.chunk_times_s == [0.5, 0.75]
    assert record.output_tokens == 2 and record.tpot_s == pytest.approx(0.25)


# ---------------------------------------------------------------- output


def test_json_and_markdown(bench_fake):
    result = run_bench(config(bench_fake, adapters=["", "x"], num_requests=6, concurrency=2,
                              api_key="s3cret-key", output_len="fixed:3"))
    data = result.to_dict()
    text = json.dumps(data)
    assert "s3cret-key" not in text
    back = json.loads(text)
    assert back["config"]["concurrency"] == 2 and back["config"]["adapters"] == ["", "x"]
    assert back["config"]["api_key"] == "<redacted>"
    assert back["completed"] == 6 and back["errors"] == {} and back["output_tokens"] == 18
    for key in ("ttft_s", "tpot_s", "e2e_s"):
        assert set(back[key]) == {"count", "mean", "p50", "p90", "p99"}
        assert back[key]["p50"] <= back[key]["p90"] <= back[key]["p99"]
    assert back["output_tokens_per_s"] == pytest.approx(18 / back["duration_s"])
    assert sum(back["adapter_completed"].values()) == 6
    assert "requests" not in back and back["short_outputs"] == 0
    full = json.loads(json.dumps(result.to_dict(include_requests=True)))
    assert len(full["requests"]) == 6 and full["requests"][0]["output_tokens"] == 3

    md = result.to_markdown()
    lines = md.splitlines()
    assert all(line.startswith("|") and line.endswith("|") for line in lines if line)
    assert "| Completed / sent | 6 / 6 |" in lines
    assert "| Errors | 0 |" in lines
    assert any(line.startswith("| TTFT |") for line in lines)
    assert any(line.startswith("| TPOT |") for line in lines)
    assert any(line.startswith("| (base) |") for line in lines)
    assert "| Latency (ms) | mean | p50 | p90 | p99 |" in lines


# ---------------------------------------------------------------- CLI


def test_cli_bench_end_to_end(bench_fake, capsys, tmp_path):
    out = tmp_path / "out.json"
    code = main(["--target", bench_fake.target, "--timeout", "5", "bench", "--concurrency", "2",
                 "--num-requests", "6", "--adapters", "a,b", "--popularity", "zipf",
                 "--zipf-alpha", "1.2", "--prompt-len", "fixed:7", "--output-len", "fixed:3",
                 "--seed", "1", "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "| Completed / sent | 6 / 6 |" in captured.out
    assert "closed loop, concurrency 2" in captured.out
    data = json.loads(out.read_text())
    assert data["completed"] == 6 and data["output_tokens"] == 18
    cfg = data["config"]
    assert (cfg["mode"], cfg["concurrency"], cfg["timeout_s"], cfg["popularity"]) == \
        ("closed", 2, 5.0, "zipf")
    assert cfg["adapters"] == ["a", "b"] and cfg["zipf_alpha"] == 1.2 and cfg["seed"] == 1
    reqs = bench_fake.stream_requests()
    assert len(reqs) == 8   # 2 warm-up + 6
    assert {r.adapter_id for r in reqs} <= {"a", "b"}
    assert all(len(r.prompt_token_ids.ids) == 7 and r.sampling.max_new_tokens == 3 for r in reqs)
    assert bench_fake.max_in_flight <= 2


def test_cli_bench_open_loop_base_model(bench_fake, capsys):
    code = main(["--target", bench_fake.target, "bench", "--rate", "100", "--num-requests", "5",
                 "--adapters", "", "--warmup", "0", "--prompt-len", "uniform:2:4",
                 "--output-len", "fixed:2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "open loop, Poisson 100 req/s" in captured.out
    assert "| (base) | 5 | 5 |" in captured.out
    assert [r.adapter_id for r in bench_fake.stream_requests()] == [""] * 5


def test_cli_bench_usage_errors(bench_fake, capsys):
    base = ["--target", bench_fake.target, "bench"]
    assert main(base + ["--prompt-len", "bogus:1"]) == 2
    assert "bad length spec" in capsys.readouterr().err
    assert main(base + ["--concurrency", "2", "--rate", "1"]) == 2
    assert main(base + ["--concurrency", "0"]) == 2
    capsys.readouterr()
    assert bench_fake.stream_requests() == []


def test_cli_bench_unreachable_exits_3(dead_target, capsys):
    code = main(["--target", dead_target, "bench", "--num-requests", "2", "--warmup", "0"])
    captured = capsys.readouterr()
    assert code == 3
    assert "UNAVAILABLE: 2" in captured.out and "no request completed" in captured.err


def test_cli_bench_openai_without_aiohttp_names_the_extra(dead_target, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "aiohttp", None)  # as in a client installed without [bench]
    code = main(["--target", dead_target, "bench", "--backend", "openai", "--num-requests", "1"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert "needs aiohttp: pip install 'loraplex[bench]'" in captured.err
