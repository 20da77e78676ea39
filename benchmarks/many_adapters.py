"""Many registered adapters: throughput with requests spread over 1 / 16 / 256 / 1,000 of 10,000.

    python benchmarks/many_adapters.py                 # the full run (SmolLM2-135M fp32, 1 thread)
    python benchmarks/many_adapters.py --quick         # tiny dummy model and sizes (< 1 min)

One in-process engine registers ``--registered`` rank-4 adapters (all 7 modules) lazily, as
``--adapter-discovery`` does: the directories under ``~/.cache/loraplex/many-adapters`` hold hard
links to the files of ``--files`` written adapters (same bytes under many ids: fine for throughput,
small on disk). It reports the registration time and the host memory it cost (RSS after minus
before, per registered adapter). Then, for each ``--distinct`` count D, ``--requests`` requests
(32 prompt tokens, 64 greedy output tokens each) whose adapters are drawn uniformly from the first D
ids. All requests arrive at t0 and the engine runs at most ``--concurrency`` of them at a time
(``max_num_seqs``): a closed loop of that many clients without think time. Points run in order on
the same engine, so adapters loaded by one point may still be cached in the next.

Prints a Markdown table (output tok/s and its ratio to D=1) and writes JSON to ``--json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report
from offline import SMOKE_MODEL, git_info, host_info, model_config, model_name
from peers import ModelSpec, Workload, loraplex_engine, make_prompts, run_loraplex, shape_key, warm_up_loraplex
from phases import check_lengths, describe, log
from synthetic_adapters import write_linked_pool

from loraplex_server.config import default_cache_dir, parse_size
from loraplex_server.lora.ids import AdapterId

# (full run, --quick) defaults of the size options.
SIZES = {"registered": (10_000, 300), "distinct": ([1, 16, 256, 1000], [1, 4, 16]), "requests": (128, 16),
         "concurrency": (32, 8), "prompt_tokens": (32, 8), "new_tokens": (64, 8), "max_loras": (16, 4),
         "max_cpu_loras": (64, 8)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny dummy model and tiny sizes (under a minute)")
    p.add_argument("--registered", type=int, help="adapters registered (lazily)")
    p.add_argument("--distinct", type=int, nargs="+", help="distinct adapters the requests are spread over")
    p.add_argument("--requests", type=int, help="requests per point")
    p.add_argument("--concurrency", type=int, help="requests running at once (max_num_seqs)")
    p.add_argument("--prompt-tokens", type=int)
    p.add_argument("--new-tokens", type=int)
    p.add_argument("--max-loras", type=int, help="device slots")
    p.add_argument("--max-cpu-loras", type=int, help="adapters kept in host memory")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--max-lora-rank", type=int, default=None, help="largest rank a slot may hold (default: --rank)")
    p.add_argument("--lora-pool-rows", type=int, default=None,
                   help="rank rows of the LoRA row pool (default: max_loras x max_lora_rank)")
    p.add_argument("--memory-pool", choices=["separate", "unified"], default="separate",
                   help="adapter weights in their own row pool, or paged with the KV cache")
    p.add_argument("--kv-cache-bytes", type=parse_size, default=None,
                   help="KV cache budget (with --memory-pool unified: KV blocks and adapters together)")
    p.add_argument("--files", type=int, default=8, help="distinct adapter files behind the hard links")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adapter-dir", type=Path, default=None,
                   help="where the adapter directories are kept (default: ~/.cache/loraplex/many-adapters; "
                        "with --quick, a temporary directory)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    for name, (full, quick) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if max(args.distinct) > args.registered:
        p.error(f"--distinct {max(args.distinct)} is more than --registered {args.registered}")
    return args


def rss_bytes() -> int:
    """This process's resident set size now (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def register_all(engine, paths: list[Path]) -> dict:
    """Register every path lazily (id = directory name); time and host memory it cost."""
    gc.collect()
    before = rss_bytes()
    start = time.perf_counter()
    for path in paths:
        engine.lora.add_adapter(AdapterId(path.name), path, eager=False)
    seconds = time.perf_counter() - start
    gc.collect()
    grown = rss_bytes() - before
    return {"registered": len(paths), "register_s": round(seconds, 2), "rss_before_mib": round(before / 2**20, 1),
            "rss_growth_mib": round(grown / 2**20, 1), "bytes_per_adapter": round(grown / len(paths))}


def run_point(engine, args, names: list[str], distinct: int, vocab: int) -> dict:
    rng = random.Random(args.seed + distinct)
    adapters: list[str | None] = [rng.choice(names[:distinct]) for _ in range(args.requests)]
    work = Workload(make_prompts(args.requests, args.prompt_tokens, vocab, args.seed), adapters, args.new_tokens)
    run = run_loraplex(engine, work, "loraplex_lora", f"d{distinct}")
    check_lengths(run, args.new_tokens)
    log(f"{distinct} distinct: " + describe(run))
    point = dict(report.summarize(run), distinct=distinct)
    point.pop("label")
    return point


def markdown(results: dict) -> str:
    reg, cfg = results["registration"], results["config"]
    lines = [f"# Many adapters: {reg['registered']:,} registered, {cfg['requests']} requests at concurrency "
             f"{cfg['concurrency']}, max_loras {cfg['max_loras']}, max_cpu_loras {cfg['max_cpu_loras']}, "
             + (f"unified memory pool of {cfg['kv_cache_bytes'] or 'the default'} bytes"
                if cfg.get("memory_pool") == "unified"
                else f"LoRA pool rows {cfg.get('lora_pool_rows') or 'max_loras x max_lora_rank'}"),
             "", f"Model {cfg['model']}, {cfg['dtype']}, {cfg['threads']} thread(s); {cfg['prompt_tokens']} prompt "
             f"+ {cfg['new_tokens']} output tokens. Registration: {reg['register_s']} s, RSS "
             f"+{reg['rss_growth_mib']} MiB = {reg['bytes_per_adapter']:,} bytes per registered adapter.", "",
             "| distinct adapters | output tok/s | vs 1 | e2e p50 / p99 (s) | slot loads | CPU loads |",
             "|---:|---:|---:|---:|---:|---:|"]
    for p in results["points"]:
        e2e, extra = p["e2e_s"], p["extra"]
        lines.append(f"| {p['distinct']:,} | {p['output_tokens_per_s']:.1f} | {p['ratio_vs_1']:.2f} | "
                     f"{e2e['p50']:.2f} / {e2e['p99']:.2f} | {extra['slot_loads']} | {extra['cpu_loads']} |")
    return "\n".join(lines) + "\n"


def run(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="loraplex-many-") as tmp:
        spec = ModelSpec(threads=args.threads, seed=args.seed)
        if args.quick:
            (Path(tmp) / "config.json").write_text(json.dumps(SMOKE_MODEL))
            spec = ModelSpec(str(Path(tmp) / "config.json"), "dummy", threads=args.threads, seed=args.seed)
        base_config = model_config(spec)
        root = args.adapter_dir or (Path(tmp) if args.quick else default_cache_dir() / "many-adapters")
        root = root / f"{shape_key(base_config)}-r{args.rank}"
        log(f"writing / reusing {args.registered} adapter directories under {root}")
        paths = write_linked_pool(root, base_config, args.registered, args.rank, args.files)
        engine = loraplex_engine(spec, max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras,
                                 max_lora_rank=args.max_lora_rank or args.rank, max_num_seqs=args.concurrency,
                                 lora_pool_rows=args.lora_pool_rows, memory_pool=args.memory_pool,
                                 kv_cache_bytes=args.kv_cache_bytes)
        registration = register_all(engine, paths)
        log(f"registration: {registration}")
        vocab = base_config.vocab_size
        warm_up_loraplex(engine, [None, paths[-1].name], vocab)  # an adapter outside every point's range
        names = [p.name for p in paths]
        points = [run_point(engine, args, names, d, vocab) for d in args.distinct]
        engine.lora.close()
    one = next((p["output_tokens_per_s"] for p in points if p["distinct"] == 1), points[0]["output_tokens_per_s"])
    for p in points:
        p["ratio_vs_1"] = round(p["output_tokens_per_s"] / one, 3)
    config = {k: getattr(args, k) for k in SIZES} | {"rank": args.rank, "files": args.files, "threads": args.threads,
                                                     "max_lora_rank": args.max_lora_rank or args.rank,
                                                     "lora_pool_rows": args.lora_pool_rows,
                                                     "memory_pool": args.memory_pool,
                                                     "kv_cache_bytes": args.kv_cache_bytes,
                                                     "dtype": spec.dtype, "model": model_name(spec)}
    results = {"config": config, "registration": registration, "points": points, "host": host_info(),
               "git": git_info()}
    print(markdown(results))
    if args.json:
        report.write_json(args.json, results)
    return results


if __name__ == "__main__":
    run()
