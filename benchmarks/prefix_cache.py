"""Prefix caching benchmark: per-adapter system prompts computed once instead of per request.

    python benchmarks/prefix_cache.py            # the issue's workload (about 15 minutes on this CPU)
    python benchmarks/prefix_cache.py --quick    # a few requests, short prompts: smoke test (a minute)

Workload (the embedded SmolLM2-135M-Instruct by default, fp32, greedy): ``--adapters`` synthetic
adapters (all 7 modules, ranks 8/16/32), each with its own system prompt of about
``--system-tokens`` tokens; ``--requests`` chat requests (that system prompt, then a short
question) whose adapters follow a Zipf popularity; exactly ``--new-tokens`` output tokens each. Every
request arrives at t0 (the offline mode, as ``offline.py``), so TTFT counts queueing.

The same workload runs on a fresh engine with prefix caching off and on, in the same process,
alternating which goes first; each engine warms up first (kernels, adapter loads) on prompts that
share nothing with the workload. Reported per mode (median over ``--repeats``): TTFT p50/p99, output
tokens/s and the prefix cache hit rate. Then the overhead run: random prompts that share no block
(``--overhead-*``), caching on vs off, alternating, output tokens/s and CPU seconds per token.

Writes a JSON result (``--json``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import (
    ModelSpec,
    RunResult,
    Workload,
    assign_adapters,
    free_memory,
    make_prompts,
    run_loraplex,
    warm_up_loraplex,
    write_adapter_pool,
)

from loraplex_server.config import CacheConfig, EngineConfig, LoraConfig, SchedulerConfig, default_cache_dir, parse_size
from loraplex_server.engine.engine import LLMEngine
from loraplex_server.engine.inputs import InputProcessor
from loraplex_server.engine.request import ChatMessage, Prompt
from loraplex_server.lora.ids import AdapterId

WORDS = ("the account support team order refund invoice shipping policy customer product warranty return "
         "delivery payment card bank transfer status tracking number address email phone hours weekend "
         "holiday store online mobile app login password reset security privacy data request answer "
         "always never politely briefly clearly include mention avoid escalate manager ticket priority "
         "urgent standard express international domestic fee discount coupon loyalty points member plan "
         "monthly annual upgrade downgrade cancel renew trial free premium basic limit device browser").split()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke test")
    p.add_argument("--model", default=None, help="HF directory or .gguf (default: the embedded SmolLM2-135M)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--system-tokens", type=int, default=1000)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--zipf-alpha", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=1, help="on/off pairs of the shared-prompt run")
    p.add_argument("--overhead-requests", type=int, default=64)
    p.add_argument("--overhead-prompt-tokens", type=int, default=256)
    p.add_argument("--overhead-new-tokens", type=int, default=32)
    p.add_argument("--overhead-repeats", type=int, default=3, help="on/off pairs of the random-prompt run")
    p.add_argument("--kv-cache-bytes", type=parse_size, default=parse_size("4G"),
                   help="room for every running sequence without sharing: caching changes compute, not admission")
    p.add_argument("--max-batch-tokens", type=int, default=512)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adapter-dir", type=Path, default=default_cache_dir() / "bench-adapters")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.adapters, args.system_tokens, args.requests, args.new_tokens = 4, 96, 16, 8
        args.overhead_requests, args.overhead_prompt_tokens, args.overhead_new_tokens = 8, 64, 4
        args.overhead_repeats, args.kv_cache_bytes = 1, parse_size("256M")
    return args


def system_prompt(tokenizer, target_tokens: int, seed: int) -> str:
    """Seeded pseudo-English instructions of about ``target_tokens`` tokens."""
    rng = random.Random(seed)
    sentences, count = [f"You are support assistant number {seed}."], 0
    while count < target_tokens:
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 16))).capitalize() + "."
        sentences.append(sentence)
        count += len(tokenizer.encode(" " + sentence, add_special_tokens=False))
    return " ".join(sentences)


def chat_workload(inputs: InputProcessor, args, names: list[str]) -> Workload:
    """Chat requests (system prompt of their adapter + a short question) as token ids."""
    tokenizer = inputs.tokenizer
    systems = {name: system_prompt(tokenizer, args.system_tokens, i) for i, name in enumerate(names)}
    adapters = assign_adapters(args.requests, names, args.seed, "zipf", args.zipf_alpha)
    rng = random.Random(args.seed + 1)
    prompts = []
    for i, adapter in enumerate(adapters):
        assert adapter is not None  # names is not empty
        question = f"Customer {i} asks: can I {rng.choice(WORDS)} my {rng.choice(WORDS)} {rng.randint(2, 99)} times?"
        messages = (ChatMessage("system", systems[adapter]), ChatMessage("user", question))
        prompts.append(inputs.token_ids(Prompt(messages=messages)))
    return Workload(prompts, list(adapters), args.new_tokens)


def make_engine(args, spec: ModelSpec, pool: dict[str, Path], caching: bool) -> LLMEngine:
    config = EngineConfig(
        model=spec.model_config(),
        cache=CacheConfig(kv_cache_bytes=args.kv_cache_bytes, prefix_caching=caching),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.max_batch_tokens, max_num_seqs=args.max_num_seqs),
        lora=LoraConfig(max_loras=len(pool), max_cpu_loras=len(pool), max_lora_rank=32))
    engine = LLMEngine(config, loaded=spec.load())
    for name, path in pool.items():
        engine.lora.add_adapter(AdapterId(name), path)
    warm_up_loraplex(engine, list(pool), engine.loaded.model.config.vocab_size)
    return engine


def run_mode(args, spec, pool, work: Workload, caching: bool, tag: str) -> dict:
    engine = make_engine(args, spec, pool, caching)
    queries, hits = engine.blocks.query_tokens, engine.blocks.hit_tokens
    result = run_loraplex(engine, work, "on" if caching else "off", tag)
    queries, hits = engine.blocks.query_tokens - queries, engine.blocks.hit_tokens - hits
    del engine
    free_memory()
    return summarize(result, hits / queries if queries else 0.0)


def summarize(result: RunResult, hit_rate: float) -> dict:
    ttfts = sorted(r.ttft for r in result.records if r.ttft is not None)  # Loraplex times every first token
    pct = lambda q: ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))]  # noqa: E731
    return dict(wall_s=round(result.wall_s, 3), output_tok_s=round(result.output_tokens / result.wall_s, 2),
                ttft_p50_s=round(pct(0.50), 3), ttft_p99_s=round(pct(0.99), 3), hit_rate=round(hit_rate, 4),
                cpu_s_per_token=round(result.extra["cpu_per_wall"] * result.wall_s / result.output_tokens, 6),
                preemptions=result.extra["preemptions"], tokens=[r.tokens for r in result.records])


def alternate(args, spec, pool, work: Workload, repeats: int, label: str) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for rep in range(repeats):
        for caching in ((False, True) if rep % 2 == 0 else (True, False)):
            mode = "on" if caching else "off"
            log(f"{label}: caching {mode}, repeat {rep + 1}/{repeats}")
            runs[mode].append(run_mode(args, spec, pool, work, caching, f"-{label}-{rep}"))
            log(f"  {({k: v for k, v in runs[mode][-1].items() if k != 'tokens'})}")
    return runs


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def report(shared: dict[str, list[dict]], overhead: dict[str, list[dict]]) -> tuple[dict, str]:
    off, on = shared["off"], shared["on"]
    summary: dict[str, Any] = {
        mode: {k: median(runs, k) for k in ("ttft_p50_s", "ttft_p99_s", "output_tok_s", "hit_rate")}
        for mode, runs in shared.items()}
    summary["ttft_p50_speedup"] = round(median(off, "ttft_p50_s") / median(on, "ttft_p50_s"), 2)
    summary["throughput_gain"] = round(median(on, "output_tok_s") / median(off, "output_tok_s"), 2)
    summary["same_tokens"] = all(a["tokens"] == b["tokens"] for a, b in zip(off, on, strict=True))
    ov = {mode: {k: median(runs, k) for k in ("output_tok_s", "cpu_s_per_token")} for mode, runs in overhead.items()}
    summary["overhead"] = ov
    summary["overhead_tok_s_pct"] = round(100 * (1 - ov["on"]["output_tok_s"] / ov["off"]["output_tok_s"]), 2)
    summary["overhead_cpu_pct"] = round(100 * (ov["on"]["cpu_s_per_token"] / ov["off"]["cpu_s_per_token"] - 1), 2)
    lines = [
        "| prefix caching | TTFT p50 (s) | TTFT p99 (s) | output tok/s | cache hit rate |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode in ("off", "on"):
        s = summary[mode]
        lines.append(f"| {mode} | {s['ttft_p50_s']:.2f} | {s['ttft_p99_s']:.2f} | {s['output_tok_s']:.1f} | "
                     f"{100 * s['hit_rate']:.1f}% |")
    lines.append(f"| on vs off | {summary['ttft_p50_speedup']:.2f}x lower | "
                 f"{median(off, 'ttft_p99_s') / median(on, 'ttft_p99_s'):.2f}x lower | "
                 f"{summary['throughput_gain']:.2f}x higher | |")
    lines += ["", "| random prompts (no shared block) | output tok/s | CPU ms per output token |", "|---|---:|---:|"]
    for mode in ("off", "on"):
        lines.append(f"| caching {mode} | {ov[mode]['output_tok_s']:.1f} | {1000 * ov[mode]['cpu_s_per_token']:.2f} |")
    lines.append(f"| overhead | {summary['overhead_tok_s_pct']:+.2f}% | {summary['overhead_cpu_pct']:+.2f}% |")
    return summary, "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = ModelSpec(args.model, "auto", args.device, args.dtype, args.threads, args.seed)
    probe = spec.load()
    config, vocab = probe.model.config, probe.model.config.vocab_size
    pool = write_adapter_pool(args.adapter_dir, config, args.adapters, [8, 16, 32])
    shared_work = chat_workload(InputProcessor(probe.tokenizer, vocab, 1 << 20, 1 << 30), args, list(pool))
    del probe
    lengths = [len(p) for p in shared_work.prompts]
    log(f"{len(shared_work)} chat requests, prompts {min(lengths)}-{max(lengths)} tokens, "
        f"{len(set(shared_work.adapters))} adapters used")
    shared = alternate(args, spec, pool, shared_work, args.repeats, "shared")
    names = list(pool)
    random_work = Workload(make_prompts(args.overhead_requests, args.overhead_prompt_tokens, vocab, args.seed + 7),
                           [names[i % len(names)] for i in range(args.overhead_requests)], args.overhead_new_tokens)
    overhead = alternate(args, spec, pool, random_work, args.overhead_repeats, "random")
    summary, table = report(shared, overhead)
    print(table)
    results = dict(args={k: str(v) for k, v in vars(args).items()}, summary=summary,
                   runs={"shared": strip(shared), "random": strip(overhead)}, table=table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return results


def strip(runs: dict[str, list[dict]]) -> dict[str, list[dict]]:
    return {mode: [{k: v for k, v in r.items() if k != "tokens"} for r in rs] for mode, rs in runs.items()}


if __name__ == "__main__":
    main()
