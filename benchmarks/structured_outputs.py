"""Structured outputs: decode step time with constrained rows, and grammar compile time.

    python benchmarks/structured_outputs.py [--seqs 64] [--constrained 16] [--steps 32] [--repeats 3]

Step time: ``seqs`` greedy requests on the embedded SmolLM2-135M decode together; in one run none
is constrained, in the other ``constrained`` of them follow a 30-field JSON schema (same prompts,
same batch size). Runs alternate ``repeats`` times; medians of the pure decode steps are reported,
with the time spent filling and applying the grammar masks. Compile time: the same 30-field schema
compiled cold (a fresh cache, tokenizer vocabulary already read) and looked up again (cached).
Issue 15 target: at most 10% step overhead with 16 of 64 rows constrained.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import loraplex_server.engine.sampler as sampler_module
from loraplex_server.config import GuidedConfig, engine_config_from_env
from loraplex_server.engine.engine import LLMEngine
from loraplex_server.engine.guided import GrammarCache, Guide
from loraplex_server.engine.request import Constraint, Prompt, SamplingParams


def thirty_field_schema() -> str:
    kinds = [{"type": "string", "maxLength": 24}, {"type": "integer"}, {"type": "boolean"},
             {"enum": ["red", "green", "blue"]}, {"type": "number"}]
    props = {f"field_{i:02d}": kinds[i % len(kinds)] for i in range(30)}
    return json.dumps({"type": "object", "properties": props, "required": list(props),
                       "additionalProperties": False})


class TimedMask:
    """Wraps a function (the sampler's ``mask_constrained_rows``, ``Guide.accept``) and adds up the
    time spent in it."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args):
        start = time.perf_counter()
        try:
            return self.fn(*args)
        finally:
            self.seconds += time.perf_counter() - start


def measure(engine: LLMEngine, timers: tuple[TimedMask, TimedMask], seqs: int, constrained: int, steps: int) -> dict:
    timer, accept_timer = timers  # grammar masks in the sampler; matcher advance per accepted token
    schema = Constraint("json_schema", spec=thirty_field_schema())
    for i in range(seqs):
        prompt = Prompt(token_ids=tuple(range(100 + i, 116 + i)))
        if i < constrained:
            sampling = SamplingParams(max_new_tokens=steps + 64, constraint=schema)
        else:
            sampling = SamplingParams(max_new_tokens=steps + 64, ignore_eos=True)
        engine.add_request(engine.make_request(prompt, sampling))
    engine.step()
    while engine.last_batch != (seqs, seqs):  # compiles, prefill: until a pure decode step of all rows
        engine.step()
    totals, masks, accepts = [], [], []
    for _ in range(steps):
        timer.seconds = accept_timer.seconds = 0.0
        start = time.perf_counter()
        engine.step()
        totals.append((time.perf_counter() - start) * 1e3)
        masks.append(timer.seconds * 1e3)
        accepts.append(accept_timer.seconds * 1e3)
        assert engine.last_batch == (seqs, seqs), f"a row finished inside the timed window: {engine.last_batch}"
    for request_id in list(engine.requests):
        engine.abort(request_id)
    return {"constrained": constrained, "step_ms": statistics.median(totals), "mask_ms": statistics.median(masks),
            "accept_ms": statistics.median(accepts)}


def compile_times(engine: LLMEngine) -> dict:
    constraint = Constraint("json_schema", spec=thirty_field_schema())
    backend = engine.grammars.backend()  # the tokenizer vocabulary is read once per engine
    cache = GrammarCache(GuidedConfig(), lambda: backend)
    start = time.perf_counter()
    cache.get(constraint).result()
    cold = time.perf_counter() - start
    start = time.perf_counter()
    cache.get(constraint).result()
    cached = time.perf_counter() - start
    return {"cold_ms": cold * 1e3, "cached_ms": cached * 1e3}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, default=64)
    p.add_argument("--constrained", type=int, default=16)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    config = engine_config_from_env(model=dict(threads=args.threads),
                                    scheduler=dict(max_num_seqs=args.seqs, max_num_batched_tokens=2048))
    engine = LLMEngine(config)
    mask_timer = sampler_module.mask_constrained_rows = TimedMask(sampler_module.mask_constrained_rows)
    accept_timer = TimedMask(Guide.accept)

    def timed_accept(guide: Guide, token_id: int) -> bool:  # a function: binds as a method, the timer would not
        return accept_timer(guide, token_id)

    Guide.accept = timed_accept  # type: ignore[method-assign,assignment]  # timed, for this process only
    timers = (mask_timer, accept_timer)
    measure(engine, timers, 4, 2, 4)  # warm-up (and the grammar compiled once)
    runs: dict[int, list[dict]] = {0: [], args.constrained: []}
    for _ in range(args.repeats):
        for n in runs:
            runs[n].append(measure(engine, timers, args.seqs, n, args.steps))
    step = {n: statistics.median(r["step_ms"] for r in rows) for n, rows in runs.items()}
    mask = statistics.median(r["mask_ms"] for r in runs[args.constrained])
    accept = statistics.median(r["accept_ms"] for r in runs[args.constrained])
    pairs = [(round(a["step_ms"], 1), round(b["step_ms"], 1))
             for a, b in zip(runs[0], runs[args.constrained], strict=True)]
    result = {"seqs": args.seqs, "constrained": args.constrained, "threads": args.threads,
              "dtype": str(engine.loaded.dtype), "step_ms_none": step[0], "step_ms_constrained": step[args.constrained],
              "mask_ms": mask, "accept_ms": accept, "runs_ms": pairs, "overhead": step[args.constrained] / step[0] - 1,
              **compile_times(engine)}
    print(f"{engine.loaded.name} {result['dtype']}, {args.threads} thread(s), {args.seqs} decoding rows, "
          f"median of {args.steps} steps x {args.repeats} runs")
    print("| constrained rows | step ms | grammar masks ms | matcher advance ms |\n|---:|---:|---:|---:|")
    print(f"| 0 | {step[0]:.1f} | 0 | 0 |\n"
          f"| {args.constrained} | {step[args.constrained]:.1f} | {mask:.2f} | {accept:.2f} |")
    print(f"per run (none, constrained) ms: {pairs}")
    print(f"overhead {100 * result['overhead']:+.1f}%; 30-field schema compile: cold {result['cold_ms']:.1f} ms, "
          f"cached {result['cached_ms']:.3f} ms")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
