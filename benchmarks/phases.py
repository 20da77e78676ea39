"""Pieces of ``offline.py``: logging, the alternating timed runs, the Loraplex profile and the
scaling runs (Loraplex with 1..512 lazily registered adapters)."""

from __future__ import annotations

import operator
import time
from collections.abc import Callable
from pathlib import Path

import report
from peers import (
    ModelSpec,
    RunResult,
    Workload,
    assign_adapters,
    free_memory,
    loraplex_engine,
    make_prompts,
    run_loraplex,
    warm_up_loraplex,
)

from loraplex_server.lora.ids import AdapterId


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def describe(run: RunResult) -> str:
    s = report.summarize(run)
    ttft = f"{s['ttft_s']['p99']:.2f}s" if s["ttft_s"] else "n/a"
    return (f"{run.system}: {s['output_tokens_per_s']:.1f} tok/s, {s['requests_per_s']:.2f} req/s, "
            f"e2e p99 {s['e2e_s']['p99']:.2f}s, TTFT p99 {ttft}, wall {run.wall_s:.1f}s {run.extra or ''}")


def check_lengths(run: RunResult, new_tokens: int) -> None:
    bad = [i for i, r in enumerate(run.records) if len(r.tokens) != new_tokens]
    if bad:
        raise RuntimeError(f"{run.system}: requests {bad[:5]} did not generate exactly {new_tokens} tokens")


def alternate(runners: dict[str, Callable[[], RunResult]], repeats: int) -> dict[str, RunResult]:
    """Each system's timed run in turn, ``repeats`` rounds (so slow drifts of the machine hit every
    system alike); the fastest run of each is kept, with every run's tok/s in ``extra``."""
    best: dict[str, RunResult] = {}
    all_tps: dict[str, list[float]] = {s: [] for s in runners}
    for _ in range(repeats):
        for system, run_once in runners.items():
            run = run_once()
            log(describe(run))
            all_tps[system].append(round(run.output_tokens / run.wall_s, 2))
            if system not in best or run.wall_s < best[system].wall_s:
                best[system] = run
    for system, run in best.items():
        run.extra["repeats_output_tokens_per_s"] = all_tps[system]
    return best


def profile_loraplex(engine, work: Workload, label: str) -> str:
    """cProfile of one full run: where the engine's step time goes (% of all engine.step time)."""
    import cProfile
    import pstats

    log(f"profiling {label} (cProfile)")
    prof = cProfile.Profile()
    prof.enable()
    run = run_loraplex(engine, work, "profile")
    prof.disable()
    # (file, line, function) -> (primitive calls, calls, own s, cumulative s, callers); not in typeshed
    table = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    step_total = next((v[3] for k, v in table.items() if k[2] == "step" and k[0].endswith("engine.py")), None)
    if step_total is None:
        raise RuntimeError("engine.step is not in the profile")
    steps = run.extra["steps"] + run.extra["idle_steps"]
    lines = [f"== {label}: {len(work)} requests, {run.output_tokens} tokens, {run.wall_s:.1f}s under the profiler, "
             f"{steps} engine steps ({run.extra['idle_steps']} with nothing scheduled), engine.step total "
             f"{step_total:.2f}s = {1e3 * step_total / max(steps, 1):.1f} ms/step; {run.extra}",
             "percentages are of the total engine.step time; ms/step = per engine step on average", ""]
    rows = [(ct, tt, nc, f"{Path(file).name}:{line}({func})")
            for (file, line, func), (_cc, nc, tt, ct, _callers) in table.items()]
    for title, key in (("by cumulative time", 0), ("by own time", 1)):
        lines.append(f"top 30 {title}")
        lines.append(f"{'cum s':>8} {'cum %':>6} {'ms/step':>8} {'own s':>8} {'own %':>6} {'calls':>9}  function")
        for ct, tt, nc, name in sorted(rows, key=operator.itemgetter(key), reverse=True)[:30]:
            lines.append(f"{ct:8.2f} {100 * ct / step_total:6.1f} {1e3 * ct / max(steps, 1):8.1f} {tt:8.2f} "
                         f"{100 * tt / step_total:6.1f} {nc:9d}  {name}")
        lines.append("")
    return "\n".join(lines) + "\n"


def scaling_engine(args, spec: ModelSpec, pool: dict[str, Path], names: list[str], count: int, vocab: int):
    """A fresh engine with ``count`` adapters registered lazily; every adapter starts cold, on disk."""
    engine = loraplex_engine(spec, max_loras=args.scaling_max_loras, max_cpu_loras=args.scaling_max_cpu_loras,
                             max_lora_rank=args.max_lora_rank, max_num_seqs=args.max_num_seqs,
                             max_batch_tokens=args.max_batch_tokens, kv_cache_bytes=args.kv_cache_bytes)
    start = time.perf_counter()
    for name in names[:count]:
        engine.lora.add_adapter(AdapterId(name), pool[name], eager=False)
    register_s = time.perf_counter() - start
    warm_up_loraplex(engine, [None, None], vocab)  # base only
    return engine, register_s


def run_scaling(args, spec: ModelSpec, pool: dict[str, Path], names: list[str],
                vocab: int) -> tuple[dict, str | None]:
    prompts = make_prompts(args.scaling_requests, args.prompt_tokens, vocab, args.seed + 1)
    scaling = {"max_loras": args.scaling_max_loras, "max_cpu_loras": args.scaling_max_cpu_loras,
               "requests": args.scaling_requests, "prompt_tokens": args.prompt_tokens,
               "new_tokens": args.scaling_new_tokens, "dist": args.scaling_dist, "points": [], "base": None}
    latencies = {}

    def workload(count: int) -> Workload:
        adapters = assign_adapters(args.scaling_requests, names[:count], args.seed, args.scaling_dist)
        return Workload(prompts, adapters, args.scaling_new_tokens)

    counts = ([0] if not args.no_scaling_base else []) + list(args.scaling)
    for count in counts:
        engine, register_s = scaling_engine(args, spec, pool, names, count, vocab)
        run = run_loraplex(engine, workload(count), f"scale{count}")
        check_lengths(run, args.scaling_new_tokens)
        run.extra["register_s"] = round(register_s, 3)
        log(f"scaling {count} adapters: " + describe(run))
        point = dict(report.summarize(run), adapters=count)
        point.pop("label")
        if count == 0:
            scaling["base"] = point
        else:
            scaling["points"].append(point)
            latencies[str(count)] = report.raw_latencies(run)
        engine.lora.registry.close()
        del engine
        free_memory()
    scaling["ratio"] = report.scaling_ratio(scaling["points"])
    scaling["latencies"] = latencies
    profile_text = None
    if args.profile and args.scaling:
        top = max(args.scaling)
        engine, _ = scaling_engine(args, spec, pool, names, top, vocab)
        profile_text = profile_loraplex(engine, workload(top),
                                        f"scaling point, {top} adapters (cold, lazily registered)")
        engine.lora.registry.close()
        del engine
        free_memory()
    return scaling, profile_text


