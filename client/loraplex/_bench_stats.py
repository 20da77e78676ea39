"""Pure helpers of ``loraplex.bench``: length distributions, popularity weights, Poisson arrival
schedules and latency summaries. Stdlib only, no I/O, everything seeded by the caller's RNG."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import accumulate

__all__ = [
    "LatencyStats",
    "LengthDist",
    "arrival_times",
    "choose",
    "percentile",
    "popularity_weights",
    "summarize",
]


# ---------------------------------------------------------------- length distributions


@dataclass(frozen=True)
class LengthDist:
    """A token-count distribution parsed from ``"fixed:N"``, ``"uniform:LO:HI"`` (integers,
    both ends included) or ``"normal:MEAN:STD"`` (rounded, clipped at >= 1)."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> LengthDist:
        """Parse a spec; ``ValueError`` names what is wrong."""
        text = str(spec).strip()
        kind, _, rest = text.partition(":")
        parts = rest.split(":") if rest else []
        try:
            if kind == "fixed" and len(parts) == 1:
                n = int(parts[0])
                if n < 1:
                    raise ValueError("the length must be >= 1")
                return cls("fixed", n)
            if kind == "uniform" and len(parts) == 2:
                lo, hi = int(parts[0]), int(parts[1])
                if not 1 <= lo <= hi:
                    raise ValueError("need 1 <= LO <= HI")
                return cls("uniform", lo, hi)
            if kind == "normal" and len(parts) == 2:
                mean, std = float(parts[0]), float(parts[1])
                if not (math.isfinite(mean) and math.isfinite(std)) or std < 0:
                    raise ValueError("need a finite MEAN and a finite STD >= 0")
                return cls("normal", mean, std)
        except ValueError as exc:
            raise ValueError(f"bad length spec {text!r}: {exc}") from None
        raise ValueError(f"bad length spec {text!r}: expected fixed:N, uniform:LO:HI or "
                         "normal:MEAN:STD")

    def sample(self, rng: random.Random) -> int:
        """One length (always >= 1)."""
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        return max(1, round(rng.gauss(self.a, self.b)))

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"fixed:{int(self.a)}"
        if self.kind == "uniform":
            return f"uniform:{int(self.a)}:{int(self.b)}"
        return f"normal:{self.a:g}:{self.b:g}"


# ---------------------------------------------------------------- popularity and arrivals


def popularity_weights(n: int, popularity: str, zipf_alpha: float = 1.0) -> list[float]:
    """Normalised weights of ``n`` adapters: ``"uniform"``, or ``"zipf"`` where rank k (1 = the
    first listed) has weight proportional to ``1 / k**zipf_alpha``."""
    if n < 1:
        raise ValueError("need at least one adapter")
    if popularity == "uniform":
        raw = [1.0] * n
    elif popularity == "zipf":
        if not zipf_alpha > 0:
            raise ValueError(f"zipf_alpha must be > 0, got {zipf_alpha}")
        raw = [1.0 / k ** zipf_alpha for k in range(1, n + 1)]
    else:
        raise ValueError(f"popularity must be 'uniform' or 'zipf', got {popularity!r}")
    total = sum(raw)
    return [w / total for w in raw]


def choose(items: Sequence[str], weights: Sequence[float], count: int,
           rng: random.Random) -> list[str]:
    """``count`` draws from ``items`` with ``weights`` (one ``rng.random()`` per draw)."""
    return rng.choices(list(items), cum_weights=list(accumulate(weights)), k=count)


def arrival_times(count: int, rate: float, rng: random.Random) -> list[float]:
    """Poisson-process arrival offsets in seconds: the first at 0, then exponential gaps of mean
    ``1 / rate``."""
    if not rate > 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    times: list[float] = []
    t = 0.0
    for i in range(count):
        if i:
            t += rng.expovariate(rate)
        times.append(t)
    return times


# ---------------------------------------------------------------- summaries


def percentile(values: Iterable[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation between closest ranks (numpy's
    default): rank ``q/100 * (n-1)`` of the sorted values. ``None`` for no values."""
    data = sorted(values)
    if not data:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within [0, 100], got {q}")
    rank = q / 100 * (len(data) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (rank - lo)


@dataclass(frozen=True)
class LatencyStats:
    """Mean and percentiles of one latency, in seconds (``None`` when ``count`` is 0)."""

    count: int = 0
    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None


def summarize(values: Iterable[float]) -> LatencyStats:
    """Count, mean, p50, p90 and p99 of ``values``."""
    data = sorted(values)
    if not data:
        return LatencyStats()
    return LatencyStats(count=len(data), mean=math.fsum(data) / len(data),
                        p50=percentile(data, 50), p90=percentile(data, 90),
                        p99=percentile(data, 99))
