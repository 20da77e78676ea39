"""Summaries of ``offline.py`` runs: per-system statistics, ratios against targets, JSON and Markdown."""

from __future__ import annotations

import json
import math
from pathlib import Path

from peers import ALL_SYSTEMS, LABELS, RunResult

# (name, numerator, denominator, target): the headline ratios of output tokens/s.
RATIOS = (
    ("loraplex_lora / peft_sequential", "loraplex_lora", "peft_sequential", 5.0),
    ("loraplex_lora / peft_batched", "loraplex_lora", "peft_batched", 1.5),
    ("loraplex_lora / loraplex_base", "loraplex_lora", "loraplex_base", 0.85),
)
# (name, numerator, denominator): Loraplex against vLLM's CPU build (offline.py --vllm); no targets.
VLLM_RATIOS = (
    ("Loraplex {n} adapters / vLLM base", "loraplex_lora", "vllm_base"),
    ("Loraplex base / vLLM base", "loraplex_base", "vllm_base"),
    ("Loraplex {n} adapters / vLLM {n} adapters", "loraplex_lora", "vllm_lora"),
    ("vLLM {n} adapters / vLLM base", "vllm_lora", "vllm_base"),
)
# Greedy token agreement, per request: (a, b) pairs; the vLLM ones only when those rows ran.
AGREEMENT_PAIRS = (
    ("peft_sequential", "loraplex_lora"), ("peft_batched", "loraplex_lora"), ("peft_sequential", "peft_batched"),
    ("vllm_base", "loraplex_base"), ("vllm_lora", "loraplex_lora"),
)
SCALING_TARGET = 0.80  # the largest adapter count vs the 8-adapter point, output tokens/s
SCALING_REFERENCE = 8


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def pcts(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {f"p{q}": round(percentile(values, q), 4) for q in (50, 90, 99)}


def summarize(run: RunResult) -> dict:
    ttfts = [r.ttft for r in run.records if r.ttft is not None]
    return {
        "label": LABELS.get(run.system, run.system),
        "requests": len(run.records),
        "output_tokens": run.output_tokens,
        "wall_s": round(run.wall_s, 3),
        "output_tokens_per_s": round(run.output_tokens / run.wall_s, 2),
        "requests_per_s": round(len(run.records) / run.wall_s, 3),
        "e2e_s": pcts([r.e2e for r in run.records]),
        "ttft_s": pcts(ttfts) if len(ttfts) == len(run.records) else None,
        "extra": run.extra,
    }


def raw_latencies(run: RunResult) -> dict[str, list[float]]:
    out = {"e2e": [round(r.e2e, 4) for r in run.records]}
    ttfts = [r.ttft for r in run.records if r.ttft is not None]
    if len(ttfts) == len(run.records):
        out["ttft"] = [round(t, 4) for t in ttfts]
    return out


def ratios(systems: dict[str, dict]) -> dict[str, dict]:
    out = {}
    for name, num, den, target in RATIOS:
        if num in systems and den in systems:
            value = systems[num]["output_tokens_per_s"] / systems[den]["output_tokens_per_s"]
            out[name] = {"value": round(value, 3), "target": target, "met": value >= target}
    return out


def vllm_ratios(systems: dict[str, dict], adapters: int) -> dict[str, float]:
    """Output tok/s ratios against the vLLM rows; ``adapters``: distinct adapters of the workload."""
    out = {}
    for name, num, den in VLLM_RATIOS:
        if num in systems and den in systems:
            value = systems[num]["output_tokens_per_s"] / systems[den]["output_tokens_per_s"]
            out[name.format(n=adapters)] = round(value, 3)
    return out


def scaling_ratio(points: list[dict]) -> dict | None:
    """Throughput at the largest adapter count vs the 8-adapter point."""
    by_n = {p["adapters"]: p for p in points}
    if SCALING_REFERENCE not in by_n or len(points) < 2:
        return None
    top = max(by_n)
    if top == SCALING_REFERENCE:
        return None
    value = by_n[top]["output_tokens_per_s"] / by_n[SCALING_REFERENCE]["output_tokens_per_s"]
    return {"name": f"{top} adapters / {SCALING_REFERENCE} adapters", "value": round(value, 3),
            "target": SCALING_TARGET, "met": value >= SCALING_TARGET}


def token_agreement(runs: dict[str, RunResult], a: str, b: str) -> float | None:
    """Fraction of requests whose greedy tokens are identical in both systems."""
    if a not in runs or b not in runs:
        return None
    pairs = list(zip(runs[a].records, runs[b].records, strict=False))
    return round(sum(x.tokens == y.tokens for x, y in pairs) / max(len(pairs), 1), 3)


def write_json(path: Path, results: dict) -> None:
    path.write_text(json.dumps(results, indent=1) + "\n")


def _fmt_pcts(p: dict | None) -> str:
    if not p:
        return "n/a"
    return " / ".join(f"{p[k]:.2f}" for k in ("p50", "p90", "p99"))


def _vllm_lines(results: dict) -> list[str]:
    vllm = results.get("vllm")
    if not vllm:
        return []
    if "skipped" in vllm:
        return [f"vLLM rows skipped: {vllm['skipped']}.", ""]
    peer: dict = next(iter((vllm.get("peers") or {}).values()), {})
    versions = peer.get("versions", {})
    starts = ", ".join(f"{s} {m['ready_s']:.0f} s" for s, m in (vllm.get("start") or {}).items())
    lines = [f"vLLM rows: vLLM {versions.get('vllm', '?')} CPU build (torch {versions.get('torch', '?')}, "
             f"transformers {versions.get('transformers', '?')}), env {peer.get('env', {})}, same prompts, adapter "
             f"files, dtype and threads, prefix caching off; all requests enqueued at t0 through `LLM.enqueue`, "
             f"engine stepped to the last finish; start-up and warm-up untimed ({starts}). "
             "TTFT is not measured for vLLM.", ""]
    cpu = ", ".join(f"{name} {s['extra']['cpu_per_wall']:.2f}" for name, s in results.get("systems", {}).items()
                    if s["extra"].get("cpu_per_wall") is not None)
    if cpu:
        lines += [f"CPU seconds per wall second (whole process tree; vLLM's engine core polls for its worker): "
                  f"{cpu}.", ""]
    if results.get("vllm_ratios"):
        lines += ["| ratio (output tok/s) | value |", "|---|---:|"]
        lines += [f"| {name} | {value:.2f} |" for name, value in results["vllm_ratios"].items()]
        lines.append("")
    return lines


def _scaling_lines(scaling: dict | None) -> list[str]:
    if not (scaling and scaling.get("points")):
        return []
    lines = [
        f"## Scaling: number of adapters (Loraplex, max_loras {scaling['max_loras']}, "
        f"max_cpu_loras {scaling['max_cpu_loras']})",
        "",
        f"{scaling['requests']} requests, {scaling['prompt_tokens']} prompt tokens, {scaling['new_tokens']} "
        f"output tokens each; adapters registered lazily (eager=False), loaded from disk during the run; "
        f"request -> adapter: {scaling['dist']}.",
        "",
        "| adapters | distinct used | output tok/s | req/s | TTFT p99 (s) | e2e p99 (s) | mean batch "
        "| slot loads | CPU loads | vs 8 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ref = next((p for p in scaling["points"] if p["adapters"] == SCALING_REFERENCE), None)
    for p in scaling["points"]:
        vs = f"{p['output_tokens_per_s'] / ref['output_tokens_per_s']:.2f}" if ref else "n/a"
        lines.append(f"| {p['adapters']} | {p['extra']['distinct_adapters']} | {p['output_tokens_per_s']:.1f} | "
                     f"{p['requests_per_s']:.2f} | {p['ttft_s']['p99']:.2f} | {p['e2e_s']['p99']:.2f} | "
                     f"{p['extra']['mean_batch_seqs']:.1f} | {p['extra']['slot_loads']} | "
                     f"{p['extra']['cpu_loads']} | {vs} |")
    base = scaling.get("base")
    if base:
        lines += ["", f"Base model only, same workload and engine settings: {base['output_tokens_per_s']:.1f} "
                      f"tok/s, TTFT p99 {base['ttft_s']['p99']:.2f} s."]
    r = scaling.get("ratio")
    if r:
        lines += ["", f"{r['name']}: {r['value']:.2f} (target >= {r['target']:.2f}: "
                      f"{'met' if r['met'] else 'NOT met'})"]
    lines.append("")
    return lines


def markdown(results: dict) -> str:
    cfg = results["config"]
    lines = [
        f"# Offline benchmark: {cfg['model_name']}",
        "",
        f"`{cfg['command']}`",
        "",
        f"Model {cfg['model_name']}, device {cfg['device']}, dtype {cfg['dtype']}, torch threads {cfg['threads']}. "
        f"Host: {cfg['host']['cpus']} CPUs, load average {cfg['host']['loadavg_start']} at start, "
        f"{cfg['host']['loadavg_end']} at end; torch {cfg['versions']['torch']}, transformers "
        f"{cfg['versions']['transformers']}, peft {cfg['versions']['peft']}.",
    ]
    git = cfg.get("git")
    if git:
        changes = git["server_changes"]
        lines.append(f"Code: commit {git['commit'][:12]}" + (f", with uncommitted server changes: "
                                                              f"{', '.join(changes)}" if changes else "") + ".")
    lines.append("")
    if results["systems"]:
        lines += [
            f"{cfg['requests']} requests over {cfg['adapters']} adapters (ranks {'/'.join(map(str, cfg['ranks']))}, "
            f"all 7 modules), {cfg['prompt_tokens']} prompt tokens, {cfg['new_tokens']} greedy output tokens each "
            f"(EOS ignored); PEFT batch size {cfg['batch_size']}; Loraplex max_loras {cfg['max_loras']}, max_num_seqs "
            f"{cfg['max_num_seqs']}, max_batch_tokens {cfg['max_batch_tokens']}, best of {cfg['repeats']} runs. "
            "All requests arrive at t0: latencies include queueing.",
            "",
        ]
    systems = results["systems"]
    if systems:
        lines += ["| system | output tok/s | req/s | e2e p50 / p90 / p99 (s) | TTFT p50 / p90 / p99 (s) | wall (s) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name in ALL_SYSTEMS:
            if name in systems:
                s = systems[name]
                lines.append(f"| {s['label']} | {s['output_tokens_per_s']:.1f} | {s['requests_per_s']:.2f} | "
                             f"{_fmt_pcts(s['e2e_s'])} | {_fmt_pcts(s['ttft_s'])} | {s['wall_s']:.1f} |")
        lines.append("")
    if results.get("ratios"):
        lines += ["| ratio (output tok/s) | value | target | met |", "|---|---:|---:|:---:|"]
        for name, r in results["ratios"].items():
            lines.append(f"| {name} | {r['value']:.2f} | >= {r['target']:.2f} | {'yes' if r['met'] else 'NO'} |")
        lines.append("")
    lines += _vllm_lines(results)
    if any(v is not None for v in (results.get("agreement") or {}).values()):
        agree = ", ".join(f"{k}: {v:.0%}" for k, v in results["agreement"].items() if v is not None)
        lines += [f"Greedy token agreement (identical outputs per request): {agree}.", ""]
    lines += _scaling_lines(results.get("scaling"))
    if results.get("plots"):
        lines += ["Plots: " + ", ".join(f"`{p}`" for p in results["plots"]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    for arg in sys.argv[1:]:  # re-render the Markdown of saved results JSON files
        path = Path(arg)
        path.with_suffix(".md").write_text(markdown(json.loads(path.read_text())))
        print(path.with_suffix(".md"))
