"""A load generator for a running Loraplex server (like ``vllm bench serve``).

    from loraplex.bench import BenchConfig, run_bench

    result = run_bench(BenchConfig(target="localhost:50051", concurrency=8, num_requests=64,
                                   adapters=["a", "b", "c"], popularity="zipf",
                                   prompt_len="uniform:32:128", output_len="fixed:64"))
    print(result.to_markdown())

or from the shell: ``loraplex bench --concurrency 8 --num-requests 64 --adapters a,b,c``.

Every request goes through :class:`loraplex.AsyncClient.generate_stream` on one shared channel, or
with ``backend="openai"`` (``--backend openai --target localhost:8000``) through the OpenAI-compatible
HTTP API: streamed ``/v1/completions`` on one aiohttp session (``loraplex._bench_openai``).
Prompts are random token ids (in ``[100, 20000)``) so the prompt length is exact, and outputs use
``max_new_tokens`` with ``ignore_eos`` and greedy decoding so the output length is exact too.

Two load shapes:

* ``mode="closed"``: ``concurrency`` streams, each sending its next request as soon as the
  previous one ends, so at most ``concurrency`` requests are ever in flight.
* ``mode="open"``: requests arrive as a Poisson process of ``rate`` requests per second,
  whatever is already in flight (this measures queueing at a given offered load).

``duration_s`` caps the run: no request starts after it (requests in flight finish, bounded by
``timeout_s``). ``warmup`` requests are sent one by one first and left out of every number.
Everything random (adapters, lengths, token ids, arrivals) comes from ``seed``, so two runs with
the same config send the same requests.

Metrics (seconds): TTFT = first chunk carrying tokens - request start; TPOT = (last token chunk -
first token chunk) / (output tokens - 1), for requests with at least 2 tokens; E2E = end - start.
They, the token counts and the throughputs cover completed requests only; failed ones are counted
by status code (``RESOURCE_EXHAUSTED``, ``DEADLINE_EXCEEDED``, ...; the exception class name for
errors without one). Throughputs divide by the measured duration: first request start to last
request end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from loraplex._bench_stats import (
    LatencyStats,
    LengthDist,
    arrival_times,
    choose,
    percentile,
    popularity_weights,
    summarize,
)
from loraplex.client import DEFAULT_TARGET, AsyncClient
from loraplex.errors import LoraplexError

__all__ = [
    "BenchClock",
    "BenchConfig",
    "BenchResult",
    "LatencyStats",
    "LengthDist",
    "RequestPlan",
    "RequestRecord",
    "percentile",
    "plan_requests",
    "run_bench",
    "run_bench_async",
    "summarize",
]

TOKEN_ID_RANGE = (100, 20000)  # prompt token ids are drawn from [100, 20000)
MODES = ("closed", "open")
POPULARITIES = ("uniform", "zipf")
BACKENDS = ("grpc", "openai")


# ---------------------------------------------------------------- configuration


@dataclass
class BenchConfig:
    """What to send, how fast, and to which server (checked when created: ``ValueError``)."""

    target: str = DEFAULT_TARGET
    api_key: str | None = None
    mode: str = "closed"                  # "closed" (concurrency streams) or "open" (Poisson rate)
    concurrency: int = 8                  # closed loop: requests in flight
    rate: float | None = None             # open loop: mean arrivals per second
    num_requests: int = 64                # measured requests (warm-up excluded)
    duration_s: float | None = None       # no request starts after this many seconds
    adapters: list[str] = field(default_factory=lambda: [""])  # "" = the base model
    popularity: str = "uniform"           # "uniform" or "zipf" (rank 1 = first listed)
    zipf_alpha: float = 1.0
    prompt_len: str = "fixed:64"          # fixed:N, uniform:LO:HI or normal:MEAN:STD
    output_len: str = "fixed:64"
    seed: int = 0
    timeout_s: float | None = 300.0       # deadline of each request (None: none)
    warmup: int = 2                       # requests sent first, one at a time, not measured
    backend: str = "grpc"                 # "grpc" (GenerateStream) or "openai" (HTTP /v1/completions, SSE)

    def __post_init__(self) -> None:
        if isinstance(self.adapters, str):
            raise ValueError("adapters must be a list of adapter ids, not a string")
        self.adapters = [str(a) for a in self.adapters]
        if not self.adapters:
            raise ValueError("adapters must name at least one adapter ('' = the base model)")
        if self.mode not in MODES:
            raise ValueError(f"mode must be 'closed' or 'open', got {self.mode!r}")
        if self.mode == "closed" and (isinstance(self.concurrency, bool) or self.concurrency < 1):
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency!r}")
        if self.mode == "open" and (self.rate is None or not self.rate > 0):
            raise ValueError(f"open mode needs a rate > 0 (requests/s), got {self.rate!r}")
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"duration_s must be > 0, got {self.duration_s}")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        popularity_weights(len(self.adapters), self.popularity, self.zipf_alpha)
        LengthDist.parse(self.prompt_len)
        LengthDist.parse(self.output_len)

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-able values; the API key is never written out."""
        data = dataclasses.asdict(self)
        data["api_key"] = "<redacted>" if self.api_key else None
        return data


@dataclass(frozen=True)
class RequestPlan:
    """One request to send: ``arrival_s`` is its planned start (open loop only)."""

    index: int
    adapter_id: str
    token_ids: tuple[int, ...]
    max_new_tokens: int
    arrival_s: float | None = None


def _rng(seed: int, stream: str) -> random.Random:
    # one independent, reproducible stream per purpose: changing the output lengths does not
    # change which adapters are picked, and the warm-up does not shift the measured requests
    return random.Random(f"loraplex-bench:{seed}:{stream}")


def plan_requests(config: BenchConfig, *, warmup: bool = False) -> list[RequestPlan]:
    """The requests a run sends, in order (``warmup=True``: the warm-up ones), from the seed.

    Measured requests draw their adapters by popularity; warm-up requests take the adapters in
    list order (so the first few adapters are loaded before measuring).
    """
    count = config.warmup if warmup else config.num_requests
    tag = "warmup:" if warmup else ""
    if warmup:
        adapters = [config.adapters[i % len(config.adapters)] for i in range(count)]
    else:
        weights = popularity_weights(len(config.adapters), config.popularity, config.zipf_alpha)
        adapters = choose(config.adapters, weights, count, _rng(config.seed, "adapters"))
    arrivals: list[float | None] = [None] * count
    if config.mode == "open" and not warmup:
        rate = float(config.rate or 0)
        arrivals = list(arrival_times(count, rate, _rng(config.seed, "arrivals")))
    prompt_dist = LengthDist.parse(config.prompt_len)
    output_dist = LengthDist.parse(config.output_len)
    prompt_rng = _rng(config.seed, tag + "prompt_len")
    output_rng = _rng(config.seed, tag + "output_len")
    ids_rng = _rng(config.seed, tag + "token_ids")
    lo, hi = TOKEN_ID_RANGE
    plans = []
    for i in range(count):
        prompt_len = prompt_dist.sample(prompt_rng)
        output_len = output_dist.sample(output_rng)
        token_ids = tuple(ids_rng.randrange(lo, hi) for _ in range(prompt_len))
        plans.append(RequestPlan(i, adapters[i], token_ids, output_len, arrivals[i]))
    return plans


# ---------------------------------------------------------------- time


@dataclass(frozen=True)
class BenchClock:
    """Where the bench reads the time (seconds, monotonic) and how it waits for an arrival.

    The default is the real one; tests pass a virtual clock to check the open loop's schedule and
    lateness exactly, without depending on how busy the machine is.
    """

    now: Callable[[], float] = time.perf_counter
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep


REAL_CLOCK = BenchClock()


# ---------------------------------------------------------------- one request


@dataclass
class RequestRecord:
    """What one request did; times are seconds since the measured run began."""

    index: int
    adapter_id: str
    prompt_tokens: int
    max_new_tokens: int
    start_s: float
    end_s: float = 0.0
    scheduled_s: float | None = None        # open loop: the planned arrival
    first_token_s: float | None = None
    chunk_times_s: list[float] = field(default_factory=list)  # every chunk that carried tokens
    output_tokens: int = 0
    error: str | None = None                # exception class name
    error_code: str | None = None           # gRPC status name (else the class name)

    @property
    def ok(self) -> bool:
        """Finished without an error."""
        return self.error is None

    @property
    def ttft_s(self) -> float | None:
        """Time to the first chunk carrying tokens."""
        return None if self.first_token_s is None else self.first_token_s - self.start_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (``None`` below 2 tokens)."""
        if self.output_tokens < 2 or not self.chunk_times_s:
            return None
        return (self.chunk_times_s[-1] - self.chunk_times_s[0]) / (self.output_tokens - 1)

    @property
    def e2e_s(self) -> float:
        """Start to end."""
        return self.end_s - self.start_s


async def _send(client: Any, plan: RequestPlan, config: BenchConfig,
                t0: float, clock: BenchClock = REAL_CLOCK) -> RequestRecord:
    """One request through ``client``: an AsyncClient (gRPC) or an ``OpenAISender`` (HTTP)."""
    record = RequestRecord(plan.index, plan.adapter_id, len(plan.token_ids), plan.max_new_tokens,
                           start_s=clock.now() - t0, scheduled_s=plan.arrival_s)
    try:
        if not isinstance(client, AsyncClient):
            await client.send(plan, record, t0)
            record.end_s = clock.now() - t0
            return record
        stream = client.generate_stream(
            token_ids=plan.token_ids, adapter_id=plan.adapter_id,
            max_new_tokens=plan.max_new_tokens, ignore_eos=True, temperature=0.0,
            timeout=config.timeout_s)
        async for chunk in stream:
            if chunk.token_ids:
                now = clock.now() - t0
                if record.first_token_s is None:
                    record.first_token_s = now
                record.chunk_times_s.append(now)
                record.output_tokens += len(chunk.token_ids)
    except LoraplexError as exc:
        record.error, record.error_code = type(exc).__name__, exc.code.name
    except Exception as exc:  # noqa: BLE001 - a benchmark counts failures, it does not stop
        record.error = record.error_code = type(exc).__name__
    record.end_s = clock.now() - t0
    return record


# ---------------------------------------------------------------- the two loops


async def _closed_loop(client: AsyncClient, plans: list[RequestPlan], config: BenchConfig,
                       t0: float, records: list[RequestRecord], clock: BenchClock = REAL_CLOCK) -> None:
    queue = iter(plans)  # shared by the workers; next() never interleaves on one event loop

    async def worker() -> None:
        for plan in queue:
            if config.duration_s is not None and clock.now() - t0 >= config.duration_s:
                return
            records.append(await _send(client, plan, config, t0, clock))

    await asyncio.gather(*(worker() for _ in range(min(config.concurrency, len(plans)))))


async def _open_loop(client: AsyncClient, plans: list[RequestPlan], config: BenchConfig,
                     t0: float, records: list[RequestRecord], clock: BenchClock = REAL_CLOCK) -> float:
    """Start each request at its planned arrival (never before it, even when a sleep ends early);
    return the largest start lag behind plan."""
    tasks = []
    max_lag = 0.0
    for plan in plans:
        arrival = plan.arrival_s or 0.0
        if config.duration_s is not None and arrival >= config.duration_s:
            break
        while (wait := arrival - (clock.now() - t0)) > 0:
            await clock.sleep(wait)
        max_lag = max(max_lag, -wait)
        tasks.append(asyncio.create_task(_send(client, plan, config, t0, clock)))
    records.extend(await asyncio.gather(*tasks))
    return max_lag


# ---------------------------------------------------------------- result


@dataclass
class BenchResult:
    """The numbers of one run; latencies in seconds. ``records`` holds every measured request."""

    config: BenchConfig
    duration_s: float
    sent: int
    completed: int
    errors: dict[str, int]
    prompt_tokens: int
    output_tokens: int
    requests_per_s: float
    output_tokens_per_s: float
    total_tokens_per_s: float
    ttft: LatencyStats
    tpot: LatencyStats
    e2e: LatencyStats
    adapter_requests: dict[str, int]
    adapter_completed: dict[str, int]
    short_outputs: int = 0   # completed with fewer/more tokens than max_new_tokens (not exact)
    warmup_errors: dict[str, int] = field(default_factory=dict)
    max_arrival_lag_s: float | None = None  # open loop: how far behind plan a request started
    records: list[RequestRecord] = field(default_factory=list, repr=False)

    @property
    def failed(self) -> int:
        """Requests that ended in an error."""
        return sum(self.errors.values())

    @classmethod
    def from_records(cls, config: BenchConfig, records: Sequence[RequestRecord],
                     duration_s: float | None = None, **extra: Any) -> BenchResult:
        """Aggregate ``records``; ``duration_s`` defaults to first start -> last end."""
        records = sorted(records, key=lambda r: r.index)
        if duration_s is None:
            duration_s = (max(r.end_s for r in records) - min(r.start_s for r in records)
                          if records else 0.0)
        done = [r for r in records if r.ok]
        prompt_tokens = sum(r.prompt_tokens for r in done)
        output_tokens = sum(r.output_tokens for r in done)

        def per_s(value: float) -> float:
            return value / duration_s if duration_s > 0 else 0.0

        order = {a: i for i, a in enumerate(config.adapters)}

        def by_adapter(rs: Sequence[RequestRecord]) -> dict[str, int]:
            counts = Counter(r.adapter_id for r in rs)
            return {a: counts.get(a, 0) for a in sorted(set(config.adapters) | set(counts),
                                                         key=lambda a: order.get(a, len(order)))}

        return cls(
            config=config, duration_s=duration_s, sent=len(records), completed=len(done),
            errors=dict(Counter(r.error_code or str(r.error) for r in records if not r.ok).most_common()),
            prompt_tokens=prompt_tokens, output_tokens=output_tokens,
            requests_per_s=per_s(len(done)), output_tokens_per_s=per_s(output_tokens),
            total_tokens_per_s=per_s(prompt_tokens + output_tokens),
            ttft=summarize(r.ttft_s for r in done if r.ttft_s is not None),
            tpot=summarize(r.tpot_s for r in done if r.tpot_s is not None),
            e2e=summarize(r.e2e_s for r in done),
            adapter_requests=by_adapter(records), adapter_completed=by_adapter(done),
            short_outputs=sum(r.output_tokens != r.max_new_tokens for r in done),
            records=list(records), **extra)

    def to_dict(self, include_requests: bool = False) -> dict[str, Any]:
        """JSON-able: the config (API key redacted), counts, throughputs and latencies in seconds;
        ``include_requests`` adds one entry per measured request."""
        data: dict[str, Any] = {
            "config": self.config.to_dict(),
            "duration_s": self.duration_s, "sent": self.sent, "completed": self.completed,
            "failed": self.failed, "errors": dict(self.errors),
            "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
            "requests_per_s": self.requests_per_s,
            "output_tokens_per_s": self.output_tokens_per_s,
            "total_tokens_per_s": self.total_tokens_per_s,
            "ttft_s": dataclasses.asdict(self.ttft), "tpot_s": dataclasses.asdict(self.tpot),
            "e2e_s": dataclasses.asdict(self.e2e),
            "adapter_requests": dict(self.adapter_requests),
            "adapter_completed": dict(self.adapter_completed),
            "short_outputs": self.short_outputs,
            "warmup_errors": dict(self.warmup_errors),
            "max_arrival_lag_s": self.max_arrival_lag_s,
        }
        if include_requests:
            data["requests"] = [
                {**dataclasses.asdict(r), "ttft_s": r.ttft_s, "tpot_s": r.tpot_s, "e2e_s": r.e2e_s}
                for r in self.records]
        return data

    def to_markdown(self) -> str:
        """A summary table, a latency table (milliseconds) and a per-adapter table."""
        cfg = self.config
        load = (f"closed loop, concurrency {cfg.concurrency}" if cfg.mode == "closed"
                else f"open loop, Poisson {cfg.rate:g} req/s")
        errors = ", ".join(f"{code}: {n}" for code, n in self.errors.items()) or "0"
        rows = [
            ("Target", f"`{cfg.target}`"), ("Load", load),
            ("Prompt / output tokens", f"{cfg.prompt_len} / {cfg.output_len}"),
            ("Duration (s)", f"{self.duration_s:.2f}"),
            ("Completed / sent", f"{self.completed} / {self.sent}"), ("Errors", errors),
            ("Requests/s", f"{self.requests_per_s:.2f}"),
            ("Output tokens/s", f"{self.output_tokens_per_s:.1f}"),
            ("Total tokens/s", f"{self.total_tokens_per_s:.1f}"),
        ]
        if self.short_outputs:
            rows.append(("Outputs not of the requested length", str(self.short_outputs)))
        if self.warmup_errors:
            rows.append(("Warm-up errors", ", ".join(f"{code}: {n}"
                                                     for code, n in self.warmup_errors.items())))
        if self.max_arrival_lag_s is not None:
            rows.append(("Max arrival lag (ms)", f"{self.max_arrival_lag_s * 1000:.1f}"))
        lines = ["| Metric | Value |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in rows]
        lines += ["", "| Latency (ms) | mean | p50 | p90 | p99 |", "|---|---|---|---|---|"]
        for name, stats in (("TTFT", self.ttft), ("TPOT", self.tpot), ("E2E", self.e2e)):
            cells = [_ms(getattr(stats, key)) for key in ("mean", "p50", "p90", "p99")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", "| Adapter | sent | completed |", "|---|---|---|"]
        for adapter, sent in self.adapter_requests.items():
            name = adapter or "(base)"
            lines.append(f"| {name} | {sent} | {self.adapter_completed.get(adapter, 0)} |")
        return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


# ---------------------------------------------------------------- running


async def run_bench_async(config: BenchConfig, clock: BenchClock = REAL_CLOCK) -> BenchResult:
    """Run the benchmark on the current event loop (see the module docstring); every time it
    records or waits on comes from ``clock``."""
    warmups, plans = plan_requests(config, warmup=True), plan_requests(config)
    if config.backend == "openai":
        from loraplex._bench_openai import OpenAISender
        connection: Any = OpenAISender(config.target, config.api_key, config.timeout_s, now=clock.now)
    else:
        connection = AsyncClient(config.target, api_key=config.api_key)
    async with connection as client:
        warm_t0 = clock.now()
        warm_records = [await _send(client, plan, config, warm_t0, clock) for plan in warmups]
        records: list[RequestRecord] = []
        t0 = clock.now()
        lag = None
        if config.mode == "closed":
            await _closed_loop(client, plans, config, t0, records, clock)
        else:
            lag = await _open_loop(client, plans, config, t0, records, clock)
    warmup_errors = dict(Counter(r.error_code for r in warm_records if not r.ok))
    return BenchResult.from_records(config, records, warmup_errors=warmup_errors,
                                    max_arrival_lag_s=lag)


def run_bench(config: BenchConfig, clock: BenchClock = REAL_CLOCK) -> BenchResult:
    """Run the benchmark and return its result (blocking; starts its own event loop, so call
    :func:`run_bench_async` instead from inside a running loop)."""
    return asyncio.run(run_bench_async(config, clock))


# ---------------------------------------------------------------- command line
