"""Adapter lifecycle costs on the in-process engine.

    python benchmarks/adapter_lifecycle.py [--threads 1] [--adapters 24]

1. Load latency: cold (disk -> host memory: read, validate, convert) and warm (host -> device slot).
2. Decode step time with and without adapter loads running concurrently in the background loader.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic_adapters import write_adapter

from loraplex_server.config import engine_config_from_env
from loraplex_server.engine.engine import LLMEngine
from loraplex_server.engine.request import Prompt, SamplingParams
from loraplex_server.lora.ids import AdapterId, VersionKey


def load_latencies(engine: LLMEngine, paths: list[Path]) -> tuple[list[float], list[float]]:
    lora, cold, warm = engine.lora, [], []
    for i, path in enumerate(paths):
        version = lora.add_adapter(AdapterId(f"lat{i}"), path, eager=False)
        start = time.perf_counter()
        lora.registry.ensure_loading(version.key)
        while not lora.registry.ready(version.key):
            time.sleep(0.0005)
        cold.append(time.perf_counter() - start)
        start = time.perf_counter()
        lora.activate({version.key}, set())
        warm.append(time.perf_counter() - start)
    return cold, warm


def step_times(engine: LLMEngine, steps: int, background: list[VersionKey] | None = None) -> list[float]:
    for i in range(8):
        engine.add_request(engine.make_request(Prompt(token_ids=tuple(range(100 + i, 116 + i))),
                                               SamplingParams(max_new_tokens=steps + 1, ignore_eos=True)))
    engine.step()
    pending = list(background or [])
    times = []
    while engine.has_work:
        if pending:  # keep the loader busy: one new load per step
            engine.lora.registry.ensure_loading(pending.pop())
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--adapters", type=int, default=24)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args(argv)
    config = engine_config_from_env(model=dict(threads=args.threads),
                                    lora=dict(max_loras=4, max_cpu_loras=64, max_lora_rank=args.rank))
    engine = LLMEngine(config)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [write_adapter(Path(tmp) / f"a{i}", engine.loaded.model.config, args.rank, seed=i)
                 for i in range(args.adapters)]
        cold, warm = load_latencies(engine, paths[: args.adapters // 2])
        quiet = step_times(engine, args.steps)
        keys = [engine.lora.add_adapter(AdapterId(f"bg{i}"), path, eager=False).key
                for i, path in enumerate(paths[args.adapters // 2:])]
        busy = step_times(engine, args.steps, keys)
    size_mb = engine.lora.registry.current(AdapterId("lat0")).meta.size_bytes / 1e6
    print(f"model={engine.loaded.name} threads={args.threads} adapter: rank {args.rank}, all 7 modules, "
          f"{size_mb:.1f} MB resident")
    print(f"cold load (disk -> host, validated): median {statistics.median(cold) * 1e3:.1f} ms, "
          f"max {max(cold) * 1e3:.1f} ms over {len(cold)}")
    print(f"warm load (host -> device slot):     median {statistics.median(warm) * 1e3:.1f} ms, "
          f"max {max(warm) * 1e3:.1f} ms")
    q, b = statistics.median(quiet), statistics.median(busy)
    print(f"decode step (batch 8): median {q * 1e3:.1f} ms quiet, {b * 1e3:.1f} ms with a load running "
          f"each step ({b / q:.2f}x); p90 {sorted(quiet)[int(.9 * len(quiet))] * 1e3:.1f} / "
          f"{sorted(busy)[int(.9 * len(busy))] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
