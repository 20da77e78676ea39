"""``loraplex-server``: flags -> Config (with config file and env, see config.py) -> serve()."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import load_config, parse_adapters, parse_size, parse_switch
from .errors import LoraplexError
from .logs import setup_logging

log = logging.getLogger("loraplex_server")

# flag -> (section, field, type, help)
FLAGS: list[tuple[str, str, str, Callable[[str], Any], str]] = [
    ("--model", "model", "model", str, "HF model directory, .gguf file, or (with --load-format dummy) a preset "
                                       "or config.json; default: the embedded SmolLM2-135M-Instruct"),
    ("--load-format", "model", "load_format", str, "auto | safetensors | gguf | dummy"),
    ("--device", "model", "device", str, "auto | cpu | cuda | cuda:N"),
    ("--dtype", "model", "dtype", str, "auto | float32 | bfloat16 | float16"),
    ("--threads", "model", "threads", int, "torch CPU threads (default: half the cores)"),
    ("--max-model-len", "model", "max_model_len", int, "context length cap (default: the model's)"),
    ("--cuda-graphs", "model", "cuda_graphs", str, "auto | on | off: decode steps as CUDA graph replays "
                                                   "(auto: on a CUDA device)"),
    ("--cuda-graph-max-batch", "model", "cuda_graph_max_batch", int, "largest decode batch captured "
                                                                     "(default: --max-num-seqs)"),
    ("--cpu-kernels", "model", "cpu_kernels", str, "auto | off: native CPU kernels (decode attention "
                                                   "read in place; built once with the C++ compiler)"),
    ("--cpu-gemm", "model", "cpu_gemm", str, "onednn | torch: CPU linears on weights packed once for "
                                             "oneDNN (default), or F.linear (MKL)"),
    ("--kv-cache-bytes", "cache", "kv_cache_bytes", parse_size, "KV cache budget, e.g. 512MiB or 8G"),
    ("--block-size", "cache", "block_size", int, "tokens per KV block"),
    ("--prefix-caching", "cache", "prefix_caching", parse_switch, "on | off: reuse the KV blocks of prompt "
                                                                  "prefixes already computed (per adapter version; "
                                                                  "default on)"),
    ("--memory-pool", "cache", "memory_pool", str, "auto | separate | unified: adapter weights in a row "
                                                   "pool of their own, or paged with the KV blocks in "
                                                   "--kv-cache-bytes; auto (default): unified over the KV "
                                                   "budget plus the row pool's bytes where it can run"),
    ("--max-batch-tokens", "scheduler", "max_num_batched_tokens", int, "token budget per engine step"),
    ("--max-num-seqs", "scheduler", "max_num_seqs", int, "cap on running sequences"),
    ("--max-queued-requests", "scheduler", "max_queued_requests", int, "requests in flight before "
                                                                       "RESOURCE_EXHAUSTED"),
    ("--max-loras", "lora", "max_loras", int, "device slots: distinct adapters resident / per step"),
    ("--max-cpu-loras", "lora", "max_cpu_loras", int, "adapters kept loaded in host memory"),
    ("--max-lora-rank", "lora", "max_lora_rank", int, "largest adapter rank accepted"),
    ("--lora-pool-rows", "lora", "lora_pool_rows", int, "LoRA weight rows per layer (an adapter of rank r "
     "holds r; default max_loras * max_lora_rank)"),
    ("--adapter-root", "lora", "adapter_root", Path, "adapter sources resolve inside this directory"),
    ("--host", "server", "host", str, "address to bind"),
    ("--port", "server", "port", int, "gRPC port (default 50051)"),
    ("--metrics-port", "server", "metrics_port", int, "Prometheus /metrics port (default 9090; -1 = off)"),
    ("--http-port", "server", "http_port", int, "OpenAI-compatible HTTP API port (default 8000; -1 = off)"),
    ("--http-host", "server", "http_host", str, "address the HTTP API binds (default: --host)"),
    ("--grace-period", "server", "grace_period_s", float, "seconds in-flight requests get on SIGTERM"),
    ("--keys-file", "server", "keys_file", Path, "API keys (TOML, sha256-hashed; reloaded on change); "
                                                  "without it the server runs open"),
    ("--fairness", "scheduler", "fairness", str, "vtc (fair share across tenants) | fcfs"),
    ("--max-slot-bypass-steps", "scheduler", "max_slot_bypass_steps", int, "steps a request waiting for a "
     "LoRA slot may be passed over by requests for adapters already in the batch (0: strict order)"),
    ("--max-adapter-bytes", "lora", "max_adapter_bytes", parse_size, "adapter weights file size limit"),
    ("--grammar-cache-size", "guided", "grammar_cache_size", int, "compiled grammars kept (LRU) for "
                                                                   "structured outputs"),
    ("--max-constraint-bytes", "guided", "max_constraint_bytes", parse_size, "size limit of a JSON schema, "
                                                                             "regex, grammar or choice list"),
    ("--log-level", "server", "log_level", str, "DEBUG | INFO | WARNING | ERROR"),
    ("--state-dir", "server", "state_dir", Path, "directory of the adapter registry (SQLite): adapters loaded "
                                                 "with LoadAdapter survive restarts; unset = not persisted"),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loraplex-server",
                                description="Loraplex multi-LoRA server (gRPC and OpenAI-compatible HTTP).")
    p.add_argument("--config", type=Path, default=None, help="TOML config file (also $LORAPLEX_CONFIG)")
    for flag, _section, field, kind, doc in FLAGS:
        p.add_argument(flag, dest=field, type=kind, default=None, help=doc)
    p.add_argument("--adapter-discovery", action="store_true", default=None,
                   help="register every adapter directory under --adapter-root, now and when added")
    p.add_argument("--adapter", action="append", default=None, metavar="NAME=PATH",
                   help="adapter to load at start (repeatable); PATH resolves inside --adapter-root")
    return p


def flag_values(args: argparse.Namespace) -> dict[str, dict]:
    values: dict[str, dict] = {}
    for _flag, section, field, _kind, _doc in FLAGS:
        values.setdefault(section, {})[field] = getattr(args, field)
    values["server"]["adapters"] = parse_adapters(args.adapter) if args.adapter else None
    values["server"]["adapter_discovery"] = args.adapter_discovery
    return values


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(flag_values(args), args.config)
    except (ValueError, OSError) as exc:
        print(f"loraplex-server: bad configuration: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.server.log_level)
    from .api.server import serve  # heavy imports (torch) only once the flags are valid

    try:
        asyncio.run(serve(config))
    except LoraplexError as exc:
        log.error("start-up failed: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
