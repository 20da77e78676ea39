"""Offline, apples-to-apples benchmark: Loraplex against PEFT on the same model, prompts and adapters.

    python benchmarks/offline.py                      # the target configuration (several minutes)
    python benchmarks/offline.py --smoke              # everything tiny, for CI (seconds)
    python benchmarks/offline.py --load-format dummy --model llama-3-8b --device cuda --dtype bfloat16

Systems, each measured in the same run on the same workload (same base weights, same prompt token
ids from a seeded RNG, same synthetic PEFT-format adapter files, greedy, exactly ``--new-tokens``
output tokens per request, same dtype and torch threads):

1. ``peft_sequential``: PEFT, one request at a time, ``set_adapter`` per request (the naive way).
2. ``peft_batched``: PEFT, static batches of ``--batch-size`` in arrival order, mixed adapters with
   ``generate(adapter_names=...)`` (left padding, ``__base__`` for none).
3. ``loraplex_base``: Loraplex with every request on the base model (the ceiling).
4. ``loraplex_lora``: Loraplex with the adapters: all requests submitted at once, continuous batching.
5. with ``--vllm``: ``vllm_base`` and ``vllm_lora``, vLLM's CPU build without / with LoRA (``vllm_rows.py``),
   timed alternately with the Loraplex runs.

Per system: output tokens/s (generated tokens / wall time), requests/s, and per-request end-to-end
latency and time to first token (Loraplex and PEFT sequential) at p50/p90/p99, counted from t0 (every
request arrives at t0). Then the scaling runs: Loraplex with 1, 8, 64, 512 distinct adapters
registered lazily, a small ``--scaling-max-loras`` and ``--scaling-max-cpu-loras``.

Writes ``<out>/<tag>.json``, ``<out>/<tag>.md`` and two PNG plots (throughput vs adapters, latency
CDFs); with ``--profile``, ``<out>/<tag>_profile.txt`` (where a Loraplex step spends its time).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import plots
import report
import vllm_rows
from peers import (
    ALL_SYSTEMS,
    SYSTEMS,
    ModelSpec,
    PeftPeer,
    RunResult,
    Workload,
    assign_adapters,
    free_memory,
    loraplex_engine,
    make_prompts,
    run_loraplex,
    warm_up_loraplex,
    warm_up_peft,
    write_adapter_pool,
)
from phases import alternate, check_lengths, describe, log, profile_loraplex, run_scaling

from loraplex_server.config import default_cache_dir
from loraplex_server.engine.engine import LLMEngine
from loraplex_server.lora.ids import AdapterId
from loraplex_server.model.loader import EMBEDDED_NAME, dummy_config, embedded_model_dir

DEFAULT_OUT = Path(__file__).resolve().parent / "results"

# A tiny Llama for --smoke: every code path, no real compute.
SMOKE_MODEL = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512,
                   rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1,
                   eos_token_id=2)

# (full run, --smoke) defaults of the size options.
SIZES = {
    "requests": (64, 8), "adapters": (16, 4), "prompt_tokens": (64, 16), "new_tokens": (64, 8),
    "batch_size": (16, 4), "scaling": ([1, 8, 64, 512], [1, 8, 16]), "scaling_requests": (128, 16),
    "scaling_new_tokens": (32, 8), "scaling_max_cpu_loras": (64, 8), "scaling_max_loras": (32, 4), "repeats": (2, 1),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="everything tiny (a tiny dummy Llama unless --model)")
    p.add_argument("--model", default=None, help="HF dir, .gguf, or with --load-format dummy a preset/config.json")
    p.add_argument("--load-format", default=None, help="auto | safetensors | gguf | dummy")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1, help="torch threads for every system")
    p.add_argument("--cpu-gemm", default="onednn", choices=["onednn", "torch"],
                   help="Loraplex's CPU linears: packed for oneDNN, or F.linear (MKL)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--requests", type=int)
    p.add_argument("--adapters", type=int, help="distinct adapters in the comparison workload")
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--prompt-tokens", type=int)
    p.add_argument("--new-tokens", type=int)
    p.add_argument("--batch-size", type=int, help="PEFT static batch size")
    p.add_argument("--systems", nargs="*", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument("--repeats", type=int, help="Loraplex runs per system (alternating); the best is kept")
    p.add_argument("--max-loras", type=int, default=None, help="Loraplex slots (default: --adapters)")
    p.add_argument("--max-cpu-loras", type=int, default=64)
    p.add_argument("--max-lora-rank", type=int, default=None, help="default: the largest of --ranks")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-batch-tokens", type=int, default=512)
    p.add_argument("--kv-cache-bytes", type=int, default=None, help="default: the engine's (512 MiB)")
    p.add_argument("--scaling", type=int, nargs="*", help="adapter counts of the scaling runs (none: skip)")
    p.add_argument("--scaling-requests", type=int)
    p.add_argument("--scaling-new-tokens", type=int)
    p.add_argument("--scaling-max-loras", type=int,
                   help="device slots in the scaling runs (fixed; small next to 512 adapters)")
    p.add_argument("--scaling-max-cpu-loras", type=int)
    p.add_argument("--scaling-dist", choices=["round-robin", "zipf"], default="round-robin")
    p.add_argument("--no-scaling-base", action="store_true", help="skip the base-only run of the scaling workload")
    p.add_argument("--adapter-dir", type=Path, default=None,
                   help="keep (and reuse) the synthetic adapter files here (default: a temporary dir)")
    p.add_argument("--vllm", action="store_true",
                   help="add the vLLM rows (vllm_base, vllm_lora; vLLM's CPU build in --vllm-venv, make vllm-venv)")
    p.add_argument("--vllm-venv", type=Path, default=vllm_rows.DEFAULT_VENV)
    p.add_argument("--vllm-kv-gib", type=float, default=2, help="VLLM_CPU_KVCACHE_SPACE of the vLLM rows")
    p.add_argument("--profile", action="store_true", help="also profile one Loraplex run with adapters")
    p.add_argument("--out", type=Path, default=None,
                   help="results directory (default: benchmarks/results; with --smoke, a directory under /tmp)")
    p.add_argument("--tag", default=None, help="file name stem (default: offline, or offline_smoke)")
    args = p.parse_args(argv)
    for name, (full, smoke) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / "loraplex-offline-smoke" if args.smoke else DEFAULT_OUT
    if args.tag is None:
        args.tag = "offline_smoke" if args.smoke else "offline"
    if args.max_lora_rank is None:
        args.max_lora_rank = max(args.ranks)
    return args


def model_config(spec: ModelSpec):
    """The base model's config (for adapter shapes) without loading its weights."""
    from transformers import AutoConfig

    if spec.load_format == "dummy":
        return dummy_config(spec.model)
    if spec.model is None:
        return AutoConfig.from_pretrained(str(embedded_model_dir(default_cache_dir())))
    path = Path(spec.model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoConfig.from_pretrained(str(path))


def model_name(spec: ModelSpec) -> str:
    if spec.load_format == "dummy":
        return f"dummy:{Path(spec.model).name if spec.model and Path(spec.model).exists() else spec.model}"
    return EMBEDDED_NAME if spec.model is None else Path(spec.model).name


def host_info() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
            "loadavg_start": _loadavg()}


def git_info() -> dict | None:
    """The commit measured, and whether the engine's sources differ from it (others edit them live)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "server"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": commit, "server_changes": [line[3:] for line in dirty if line.strip()]}


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---- the phases ------------------------------------------------------------------------------
def run_peft(args, spec: ModelSpec, pool: dict[str, Path], names: list[str], work: Workload,
             vocab: int) -> dict[str, RunResult]:
    runs: dict[str, RunResult] = {}
    log(f"PEFT: loading the base model and {len(names)} adapters")
    peer = PeftPeer(spec, {n: pool[n] for n in names})
    warm_up_peft(peer, names[0], vocab)
    if "peft_sequential" in args.systems:
        runs["peft_sequential"] = peer.run_sequential(work)
        log(describe(runs["peft_sequential"]))
    if "peft_batched" in args.systems:
        runs["peft_batched"] = peer.run_batched(work, args.batch_size)
        log(describe(runs["peft_batched"]))
    del peer
    free_memory()
    return runs


def _loraplex_runner(engine: LLMEngine, work: Workload, system: str, count: Iterator[int]) -> Callable[[], RunResult]:
    """One timed run of ``system`` per call, each under a fresh request-id tag."""
    return lambda: run_loraplex(engine, work, system, f"r{next(count)}")


def run_loraplex_pair(args, spec: ModelSpec, pool: dict[str, Path], names: list[str], work: Workload, vocab: int,
                      peers: dict | None = None) -> tuple[dict[str, RunResult], str | None]:
    """Base-only and with-adapter runs on one engine, and the peers' rows (system -> one timed run:
    vLLM), alternating ``--repeats`` times; best kept."""
    wanted = [s for s in ("loraplex_base", "loraplex_lora") if s in args.systems]
    runners: dict[str, Callable[[], RunResult]] = {}
    engine, count = None, itertools.count()
    if wanted:
        engine = loraplex_engine(spec, max_loras=args.max_loras or len(names),
                                 max_cpu_loras=max(args.max_cpu_loras, len(names)), max_lora_rank=args.max_lora_rank,
                                 max_num_seqs=args.max_num_seqs, max_batch_tokens=args.max_batch_tokens,
                                 kv_cache_bytes=args.kv_cache_bytes)
        log(f"Loraplex: engine ready ({engine.loaded.name}, max_loras {engine.config.lora.max_loras}), "
            f"registering {len(names)} adapters (eager)")
        for name in names:
            engine.lora.add_adapter(AdapterId(name), pool[name], eager=True)
        warm_up_loraplex(engine, [None, names[0]], vocab)
        for system in wanted:
            w = work.on_base() if system == "loraplex_base" else work
            runners[system] = _loraplex_runner(engine, w, system, count)
    runners.update(peers or {})
    best = alternate(runners, args.repeats)
    profile_text = None
    if engine is not None:
        if args.profile:
            profile_text = profile_loraplex(engine, work, f"loraplex_lora, {len(names)} adapters")
        engine.lora.registry.close()
        del engine
        free_memory()
    return best, profile_text


# ---- entry points ----------------------------------------------------------------------------
def run(argv=None) -> dict:
    """Run the benchmark; returns the results dict (also written to ``<out>/<tag>.json``)."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parse_args(argv)
    args.argv = argv
    plots.require_matplotlib()  # fail before minutes of measuring, not after
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = args.workdir = Path(tempfile.mkdtemp(prefix="loraplex-offline-"))
    try:
        if args.smoke and args.model is None:
            (workdir / "config.json").write_text(json.dumps(SMOKE_MODEL))
            args.model, args.load_format = str(workdir / "config.json"), "dummy"
        spec = ModelSpec(args.model, args.load_format or "auto", args.device, args.dtype, args.threads, args.seed,
                         args.cpu_gemm)
        return _run(args, spec, args.adapter_dir or workdir / "adapters")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run(args, spec: ModelSpec, adapter_dir: Path) -> dict:
    host = host_info()
    config = model_config(spec)
    vocab = config.vocab_size
    pool_size = max([args.adapters] + list(args.scaling or []))
    log(f"writing {pool_size} synthetic adapters (ranks {args.ranks}) under {adapter_dir}")
    adapter_dir.mkdir(parents=True, exist_ok=True)
    pool = write_adapter_pool(adapter_dir, config, pool_size, args.ranks)
    names = list(pool)
    main_names = names[:args.adapters]
    work = Workload(make_prompts(args.requests, args.prompt_tokens, vocab, args.seed),
                    assign_adapters(args.requests, main_names, args.seed), args.new_tokens)
    runs, profile_text, vllm_info = measure(args, spec, pool, main_names, work, vocab)
    scaling, scaling_profile = run_scaling(args, spec, pool, names, vocab) if args.scaling else (None, None)
    profile_text = "\n".join(t for t in (profile_text, scaling_profile) if t) or None
    host["loadavg_end"] = _loadavg()
    results = build_results(args, spec, host, runs, scaling, vllm_info)
    return write_outputs(args, results, profile_text)


def measure(args, spec: ModelSpec, pool: dict[str, Path], names: list[str], work: Workload,
            vocab: int) -> tuple[dict[str, RunResult], str | None, dict | None]:
    """The comparison: PEFT, then Loraplex alternating with the vLLM rows (with ``--vllm``)."""
    runs: dict[str, RunResult] = {}
    if any(s.startswith("peft") for s in args.systems):
        runs.update(run_peft(args, spec, pool, names, work, vocab))
    peers, vllm_info = vllm_rows.maybe_start(args, spec, pool, work, args.workdir / "vllm", log) if args.vllm \
        else ({}, None)
    profile_text = None
    try:
        if peers or any(s.startswith("loraplex") for s in args.systems):
            pair, profile_text = run_loraplex_pair(args, spec, pool, names, work, vocab,
                                                   {system: peer.run for system, peer in peers.items()})
            runs.update(pair)
    finally:
        if peers:
            closed = vllm_rows.close_peers(peers)
            if vllm_info is not None:  # (it comes with the peers)
                vllm_info["peers"] = closed
    for r in runs.values():
        check_lengths(r, args.new_tokens)
    return runs, profile_text, vllm_info


def build_results(args, spec: ModelSpec, host: dict, runs: dict[str, RunResult], scaling: dict | None,
                  vllm_info: dict | None) -> dict:
    import peft
    import transformers

    systems = {name: report.summarize(runs[name]) for name in ALL_SYSTEMS if name in runs}
    agreement = {f"{a} vs {b}": report.token_agreement(runs, a, b) for a, b in report.AGREEMENT_PAIRS
                 if not a.startswith("vllm") or a in runs}
    return {
        "config": {
            "command": "python benchmarks/offline.py " + shlex.join(args.argv),
            "model_name": model_name(spec), "model": spec.model, "load_format": spec.load_format,
            "device": spec.device, "dtype": spec.dtype, "threads": args.threads, "seed": args.seed,
            "cpu_gemm": spec.cpu_gemm,
            "requests": args.requests, "adapters": args.adapters, "ranks": args.ranks,
            "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "batch_size": args.batch_size,
            "max_loras": args.max_loras or args.adapters, "max_cpu_loras": max(args.max_cpu_loras, args.adapters),
            "max_lora_rank": args.max_lora_rank, "max_num_seqs": args.max_num_seqs,
            "max_batch_tokens": args.max_batch_tokens, "repeats": args.repeats, "smoke": args.smoke,
            "host": host, "git": git_info(),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "peft": peft.__version__},
        },
        "systems": systems,
        "ratios": report.ratios(systems),
        "vllm": vllm_info,
        "vllm_ratios": report.vllm_ratios(systems, args.adapters),
        "agreement": agreement,
        "scaling": scaling,
        "latencies": {name: report.raw_latencies(runs[name]) for name in ALL_SYSTEMS if name in runs},
        "plots": [],
    }


def write_outputs(args, results: dict, profile_text: str | None) -> dict:
    out, tag, scaling = args.out, args.tag, results["scaling"]
    if scaling and scaling["points"]:
        ceiling = scaling["base"]["output_tokens_per_s"] if scaling.get("base") else None
        results["plots"].append(plots.throughput_vs_adapters(scaling, out / f"{tag}_throughput_vs_adapters.png",
                                                             ceiling).name)
    if results["latencies"]:
        results["plots"].append(plots.latency_cdfs(results["latencies"], out / f"{tag}_latency_cdf.png").name)
    if profile_text:
        (out / f"{tag}_profile.txt").write_text(profile_text)
    report.write_json(out / f"{tag}.json", results)
    md = report.markdown(results)
    (out / f"{tag}.md").write_text(md)
    print(md)
    return results


def main(argv=None) -> dict:
    return run(argv)


if __name__ == "__main__":
    main()
