"""Decode tokens/s of the in-process engine: batch sizes x (base only | N distinct adapters).

    python benchmarks/decode_throughput.py [--batch 1 16] [--adapters 4] [--new-tokens 64]

Each configuration submits ``batch`` requests (short prompts, ignore_eos), runs the prefill, then
times only the decode steps. Every row of the table is measured in the same run, on the same engine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic_adapters import write_adapter

from loraplex_server.config import engine_config_from_env
from loraplex_server.engine.engine import LLMEngine
from loraplex_server.engine.request import Prompt, SamplingParams
from loraplex_server.lora.ids import AdapterId


def measure(engine: LLMEngine, batch: int, adapters: Sequence[str | None], new_tokens: int) -> float:
    for i in range(batch):
        adapter = adapters[i % len(adapters)]
        engine.add_request(engine.make_request(Prompt(token_ids=tuple(range(100 + i, 116 + i))),
                                               SamplingParams(max_new_tokens=new_tokens, ignore_eos=True),
                                               AdapterId(adapter) if adapter else None))
    engine.step()  # prefill (all prompts fit one step)
    decoded, start = 0, time.perf_counter()
    while engine.has_work:
        decoded += len(engine.step())
    if engine.loaded.device.type == "cuda":
        import torch
        torch.cuda.synchronize()
    return decoded / (time.perf_counter() - start)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=None)
    p.add_argument("--load-format", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    config = engine_config_from_env(
        model=dict(model=args.model, load_format=args.load_format, device=args.device, dtype=args.dtype,
                   threads=args.threads),
        lora=dict(max_loras=max(args.adapters, 1), max_lora_rank=args.rank))
    engine = LLMEngine(config)
    names: list[str | None] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.adapters):
            path = write_adapter(Path(tmp) / f"a{i}", engine.loaded.model.config, args.rank, seed=i)
            engine.lora.add_adapter(AdapterId(f"a{i}"), path)
            names.append(f"a{i}")
        measure(engine, 2, [None, *names], 4)  # warm-up
        print(f"model={engine.loaded.name} device={engine.loaded.device} dtype={engine.loaded.dtype} "
              f"threads={config.resolved_threads()} rank={args.rank}")
        print(f"| batch | base tok/s | with {args.adapters} adapters tok/s | ratio |")
        print("|---:|---:|---:|---:|")
        for batch in args.batch:
            base = max(measure(engine, batch, [None], args.new_tokens) for _ in range(args.repeats))
            lora = max(measure(engine, batch, names or [None], args.new_tokens) for _ in range(args.repeats))
            print(f"| {batch} | {base:.1f} | {lora:.1f} | {lora / base:.2f} |")


if __name__ == "__main__":
    main()
