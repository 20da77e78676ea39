"""Host time per decode step: everything a step does besides the model forward.

    python benchmarks/host_overhead.py [--seqs 64 256] [--adapters 16] [--steps 32]

A 2-layer, hidden-64 Llama keeps the real 49,152-token vocabulary (dummy weights), so the forward
is nearly free and what remains is the engine's own work per step: scheduling, packing the batch
and its LoRA mapping, sampling over the vocabulary, detokenizing-free output processing. For each
batch size, ``seqs`` requests (half on the base model, half spread over ``adapters`` adapters when
there are any) are prefilled, then ``steps`` pure decode steps are timed; the runner's
``forward_logits`` and its sampler are timed separately. The sampler is its own column: on a GPU
its work (argmax over N x vocab logits) runs on the device, on the CPU it is a memory-bound pass
over the logits (256 x 49,152 fp32 = 50 MB). "host" is what remains: the engine's Python work per
step. As in ``EngineLoop``, a step is ``step_tokens()``: the text of requests without stop strings
is decoded on the loop's output thread, timed here apart ("text", after the step, not overlapped).
Then the same requests run through ``EngineLoop`` itself, consumed on the main thread: "host in
EngineLoop" is the engine thread's host time per decode step there, with the output thread and the
consumer beside it (they share the GIL). Prints a Markdown table (ms per step).
Issue target: host time <= 3 ms at 256 sequences with 16 adapters.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic_adapters import write_adapter

from loraplex_server.config import engine_config_from_env
from loraplex_server.engine.engine import LLMEngine
from loraplex_server.engine.loop import EngineLoop
from loraplex_server.engine.output import decode_texts
from loraplex_server.engine.request import Prompt, SamplingParams
from loraplex_server.lora.ids import AdapterId

TINY_LLAMA = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=49152, max_position_embeddings=2048,
                  rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


class Timed:
    """Wraps a callable (``runner.forward_logits``, the sampler) and adds up the time spent in it."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args):
        start = time.perf_counter()
        try:
            return self.fn(*args)
        finally:
            self.seconds += time.perf_counter() - start

    def __getattr__(self, name):  # the sampler's other methods (release) pass through
        return getattr(self.fn, name)


def workload(seqs: int, adapters: list[str], steps: int):
    """(prompt, sampling, adapter) of each request: half on the base model, half over the adapters."""
    names: list[str | None] = [None] * max(1, seqs // 2 if adapters else seqs)
    names += [adapters[i % len(adapters)] for i in range(seqs - len(names))] if adapters else []
    for i, name in enumerate(names[:seqs]):
        yield (Prompt(token_ids=tuple(range(10 + i % 50, 26 + i % 50))),
               SamplingParams(max_new_tokens=steps + 2, ignore_eos=True), AdapterId(name) if name else None)


def measure(engine: LLMEngine, timers: dict[str, Timed], seqs: int, adapters: list[str], steps: int) -> dict:
    for prompt, sampling, adapter in workload(seqs, adapters, steps):
        engine.add_request(engine.make_request(prompt, sampling, adapter))
    while engine.last_batch != (seqs, seqs):  # prefill (and any chunks) until a pure decode step
        engine.step()
    times: dict[str, list[float]] = {"step": [], "forward": [], "sampling": [], "host": [], "text": []}
    for _ in range(steps):
        for timer in timers.values():
            timer.seconds = 0.0
        start = time.perf_counter()
        engine.step_tokens()
        total = time.perf_counter() - start
        decode_texts(engine.take_undecoded())
        text = time.perf_counter() - start - total
        forward, sampling = timers["forward"].seconds, timers["sampling"].seconds
        for name, seconds in (("step", total), ("forward", forward), ("sampling", sampling),
                              ("host", total - forward - sampling), ("text", text)):
            times[name].append(seconds * 1e3)
    while engine.has_work:
        engine.step()
    return {"seqs": seqs, **{f"{name}_ms": statistics.median(values) for name, values in times.items()},
            "loop_host_ms": measure_in_loop(engine, timers, seqs, adapters, steps)}


def measure_in_loop(engine: LLMEngine, timers: dict[str, Timed], seqs: int, adapters: list[str], steps: int) -> float:
    """The same requests through ``EngineLoop``, consumed on this thread as a front end would: the
    engine thread's host time per pure-decode step (median), with the output thread decoding and
    delivering beside it (both take turns on the GIL)."""
    hosts: list[float] = []
    step_tokens = engine.step_tokens

    def timed_step(before_forward=None):
        for timer in timers.values():
            timer.seconds = 0.0
        start = time.perf_counter()
        outputs = step_tokens(before_forward)
        if engine.last_batch == (seqs, seqs):
            hosts.append((time.perf_counter() - start - timers["forward"].seconds - timers["sampling"].seconds) * 1e3)
        return outputs
    engine.step_tokens = timed_step  # type: ignore[method-assign]  # timed, on this engine only
    try:
        with EngineLoop(engine) as loop:
            streams = [loop.submit(prompt, sampling, adapter) for prompt, sampling, adapter in
                       workload(seqs, adapters, steps)]
            for stream in streams:
                stream.result()
    finally:
        engine.step_tokens = step_tokens  # type: ignore[method-assign]
    return statistics.median(hosts)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, nargs="+", default=[64, 256])
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "config.json"
        config_path.write_text(json.dumps(TINY_LLAMA))
        config = engine_config_from_env(
            model=dict(model=str(config_path), load_format="dummy", device="cpu", dtype="float32",
                       threads=args.threads),
            scheduler=dict(max_num_seqs=max(args.seqs), max_num_batched_tokens=max(512, 16 * max(args.seqs))),
            lora=dict(max_loras=max(1, args.adapters), max_lora_rank=16),
            cache=dict(num_blocks=max(args.seqs) * 8))
        engine = LLMEngine(config)
        adapters = []
        for i in range(args.adapters):
            engine.lora.add_adapter(AdapterId(f"a{i}"), write_adapter(Path(tmp) / f"a{i}", engine.loaded.model.config,
                                                           (8, 16)[i % 2], seed=i))
            adapters.append(f"a{i}")
        runner = engine.runner
        timers = {"forward": Timed(runner.forward_logits), "sampling": Timed(runner.sampler)}
        runner.forward_logits = timers["forward"]  # type: ignore[method-assign]  # timed, on this engine only
        runner.sampler = timers["sampling"]  # type: ignore[assignment]
        measure(engine, timers, 4, adapters, 4)  # warm-up
        rows = [measure(engine, timers, seqs, adapters, args.steps) for seqs in args.seqs]
    print(f"threads={args.threads} adapters={args.adapters} (median of {args.steps} decode steps, ms)")
    print("| sequences | step | forward | sampling | host (step - forward - sampling) | text (output thread) "
          "| host in EngineLoop |\n|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['seqs']} | {row['step_ms']:.2f} | {row['forward_ms']:.2f} | {row['sampling_ms']:.2f} "
              f"| {row['host_ms']:.2f} | {row['text_ms']:.2f} | {row['loop_host_ms']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
