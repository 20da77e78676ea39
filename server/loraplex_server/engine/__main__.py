"""Smoke usage: ``python -m loraplex_server.engine [--adapter NAME=PATH ...] [--prompt TEXT ...]``.

Loads the model (default: the embedded SmolLM2-135M-Instruct), registers adapters, and generates
for every (prompt, adapter) pair in one continuous batch, printing each answer.
"""

from __future__ import annotations

import argparse
import logging
import time

from ..config import engine_config_from_env
from ..lora.ids import AdapterId
from .engine import LLMEngine
from .loop import EngineLoop
from .request import ChatMessage, Prompt, SamplingParams


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loraplex_server.engine", description=__doc__)
    p.add_argument("--model", default=None, help="HF directory, .gguf file, or (dummy) preset/config")
    p.add_argument("--load-format", default=None, choices=["auto", "safetensors", "gguf", "dummy"])
    p.add_argument("--device", default=None, help="default: $LORAPLEX_DEVICE, else auto")
    p.add_argument("--dtype", default=None, help="default: $LORAPLEX_DTYPE, else auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH")
    p.add_argument("--prompt", action="append", default=[])
    p.add_argument("--max-new-tokens", type=int, default=48)
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace, environ=None):
    """Flags given win over ``LORAPLEX_*``; flags not given (None) leave the environment's value."""
    return engine_config_from_env(environ, model=dict(model=args.model, load_format=args.load_format,
                                                      device=args.device, dtype=args.dtype, threads=args.threads))


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    engine = LLMEngine(config_from_args(args))
    adapters: list[AdapterId | None] = [None]
    for spec in args.adapter:
        name, _, path = spec.partition("=")
        adapter_id = AdapterId(name)
        engine.lora.add_adapter(adapter_id, path)
        adapters.append(adapter_id)
    prompts = args.prompt or ["Name three colours of the rainbow.", "What is the capital of Italy?"]
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens)
    with EngineLoop(engine) as loop:
        start = time.perf_counter()
        streams = [(p, a, loop.submit(Prompt(messages=(ChatMessage("user", p),)), sampling, a))
                   for p in prompts for a in adapters]
        results = [(p, a, s.result()) for p, a, s in streams]
        elapsed = time.perf_counter() - start
    tokens = sum(r.completion_tokens for _, _, r in results)
    for prompt, adapter, result in results:
        print(f"--- [{adapter or 'base'}] {prompt}\n{result.text.strip()}\n")
    print(f"{len(results)} requests, {tokens} tokens in {elapsed:.2f}s ({tokens / elapsed:.1f} tokens/s)")


if __name__ == "__main__":
    main()
