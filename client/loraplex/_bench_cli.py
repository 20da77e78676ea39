"""The ``loraplex bench`` subcommand: flags -> BenchConfig -> run -> tables (and JSON)."""

from __future__ import annotations

import argparse
import json
from typing import Any, TextIO

from loraplex.bench import BACKENDS, POPULARITIES, BenchConfig, LengthDist, run_bench


def _length_spec(text: str) -> str:
    try:
        return str(LengthDist.parse(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its "invalid ... value" message
    return parse


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def parse_adapters(text: str) -> list[str]:
    """``"a,b,c"`` -> ``["a", "b", "c"]``; ``""`` -> ``[""]`` (the base model); an empty item
    in a list (``",a"``) is the base model too."""
    return [item.strip() for item in text.split(",")]


def add_bench_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``loraplex bench`` on the CLI's subparsers."""
    p = sub.add_parser(
        "bench", help="load-test the server and print latency/throughput",
        description="Drive the server with generated requests and report TTFT, TPOT, end-to-end "
                    "latency and throughput. The global --timeout is each request's deadline "
                    "(default 300 s).")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=_positive(int), metavar="N",
                      help="closed loop: N requests in flight (the default, with N=8)")
    load.add_argument("--rate", type=_positive(float), metavar="R",
                      help="open loop: Poisson arrivals at R requests/s")
    p.add_argument("--num-requests", type=_positive(int), default=64, metavar="N",
                   help="measured requests (default %(default)s)")
    p.add_argument("--duration", type=_positive(float), metavar="S",
                   help="start no request after S seconds")
    p.add_argument("--warmup", type=_non_negative_int, default=2, metavar="N",
                   help="unmeasured requests sent first (default %(default)s)")
    p.add_argument("--adapters", type=parse_adapters, default=[""], metavar="IDS",
                   help='comma-separated adapter ids; "" is the base model (default)')
    p.add_argument("--popularity", choices=POPULARITIES, default="uniform")
    p.add_argument("--zipf-alpha", type=_positive(float), default=1.0, metavar="A")
    p.add_argument("--prompt-len", type=_length_spec, default="fixed:64", metavar="DIST",
                   help="fixed:N, uniform:LO:HI or normal:MEAN:STD (default %(default)s)")
    p.add_argument("--output-len", type=_length_spec, default="fixed:64", metavar="DIST",
                   help="same forms (default %(default)s)")
    p.add_argument("--seed", type=_non_negative_int, default=0)
    p.add_argument("--backend", choices=BACKENDS, default="grpc",
                   help="grpc (GenerateStream) or openai (the HTTP API's streamed /v1/completions; --target "
                        "is then the HTTP address, e.g. localhost:8000; needs aiohttp)")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON to PATH")
    p.add_argument("--include-requests", action="store_true",
                   help="with --json: add one entry per request")
    p.set_defaults(handler=cmd_bench)
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The :class:`BenchConfig` of parsed ``loraplex ... bench`` arguments."""
    open_loop = args.rate is not None
    return BenchConfig(
        target=args.target, api_key=args.api_key, mode="open" if open_loop else "closed",
        concurrency=args.concurrency or 8, rate=args.rate, num_requests=args.num_requests,
        duration_s=args.duration, adapters=args.adapters, popularity=args.popularity,
        zipf_alpha=args.zipf_alpha, prompt_len=args.prompt_len, output_len=args.output_len,
        seed=args.seed, timeout_s=args.timeout if args.timeout is not None else 300.0,
        warmup=args.warmup, backend=args.backend)


def cmd_bench(client: Any, args: argparse.Namespace, io: Any) -> int:
    """``bench``: run, print the Markdown tables, write ``--json``. Exit 0 if any request
    completed; else 3 if every failure was UNAVAILABLE, else 2. (``client`` is unused: the
    benchmark opens its own asyncio channel.)"""
    del client
    err: TextIO = io.stderr
    try:
        config = config_from_args(args)
    except ValueError as exc:
        err.write(f"error: {exc}\n")
        return 2
    if config.backend == "openai":
        from loraplex._bench_openai import import_aiohttp

        try:
            import_aiohttp()
        except ImportError as exc:
            err.write(f"error: {exc}\n")
            return 2
    load = (f"{config.concurrency} concurrent" if config.mode == "closed"
            else f"{config.rate:g} req/s Poisson")
    err.write(f"bench: {config.num_requests} requests ({load}, {config.warmup} warm-up) "
              f"against {config.target}\n")
    result = run_bench(config)
    io.stdout.write(result.to_markdown() + "\n")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result.to_dict(include_requests=args.include_requests), f, indent=2)
            f.write("\n")
    if result.completed:
        return 0
    err.write("error: no request completed\n")
    return 3 if set(result.errors) == {"UNAVAILABLE"} else 2
