"""PNG plots of ``offline.py`` and ``many_adapters.py`` results (matplotlib, headless).

    python benchmarks/plots.py RESULTS.json    # redraw the plots of a saved offline result beside it
    python benchmarks/plots.py --many OUT.png MANY.json [MANY.json ...]   # distinct-adapter scaling
"""

from __future__ import annotations

from pathlib import Path

from peers import ALL_SYSTEMS, LABELS

COLORS = {"peft_sequential": "C0", "peft_batched": "C1", "loraplex_base": "C2", "loraplex_lora": "C3",
          "vllm_base": "C4", "vllm_lora": "C5"}


def require_matplotlib():
    try:
        import matplotlib
    except ImportError as exc:  # the bench extra: pip install matplotlib
        raise RuntimeError("matplotlib is required for the benchmark plots: pip install matplotlib") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def throughput_vs_adapters(scaling: dict, path: Path, base_ceiling: float | None = None) -> Path:
    plt = require_matplotlib()
    points = scaling["points"]
    xs = [p["adapters"] for p in points]
    ticks = [str(p["adapters"]) if p["extra"]["distinct_adapters"] == p["adapters"]
             else f"{p['adapters']}\n({p['extra']['distinct_adapters']} used)" for p in points]
    xlabel = f"adapters registered ({scaling['requests']} requests, {scaling['dist']})"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(xs, [p["output_tokens_per_s"] for p in points], "o-", label="Loraplex")
    if base_ceiling:
        ax1.axhline(base_ceiling, color="gray", ls="--", lw=1, label="base only (same workload)")
    ax1.set_xscale("log", base=2)
    ax1.set_xticks(xs, ticks)
    ax1.set_xlabel(xlabel)
    ax1.set_ylabel("output tokens/s")
    ax1.set_ylim(bottom=0)
    ax1.set_title(f"Throughput (max_loras {scaling['max_loras']}, max_cpu_loras {scaling['max_cpu_loras']})",
                  fontsize=9)
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    ax2.plot(xs, [p["ttft_s"]["p99"] for p in points], "o-", color="C3", label="TTFT p99")
    ax2.plot(xs, [p["ttft_s"]["p50"] for p in points], "o--", color="C1", label="TTFT p50")
    ax2.set_xscale("log", base=2)
    ax2.set_xticks(xs, ticks)
    ax2.set_xlabel(xlabel)
    ax2.set_ylabel("seconds (all requests arrive at t0)")
    ax2.set_ylim(bottom=0)
    ax2.set_title("Time to first token", fontsize=9)
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def many_label(config: dict) -> str:
    """How a ``many_adapters.py`` run held its adapters, for a legend."""
    if config.get("memory_pool") == "unified":
        gib = (config.get("kv_cache_bytes") or 0) / 2 ** 30
        return f"unified pool ({gib:.1f} GiB with the KV cache), slots: " + (
            "uncapped" if not config["max_loras"] else str(config["max_loras"]))
    if config.get("lora_pool_rows"):
        return f"row pool: {config['max_loras']} slots in {config['lora_pool_rows']:,} rows"
    return f"{config['max_loras']} slots of max_lora_rank {config.get('max_lora_rank', config['rank'])}"


def distinct_adapters(runs: list[dict], path: Path) -> Path:
    """Output tokens/s and its ratio to one adapter against distinct adapters per workload, one line
    per ``many_adapters.py`` run (each ratio is to its own run's 1-adapter point)."""
    plt = require_matplotlib()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for run in runs:
        points = sorted(run["points"], key=lambda p: p["distinct"])
        xs = [p["distinct"] for p in points]
        label = many_label(run["config"])
        ax1.plot(xs, [p["output_tokens_per_s"] for p in points], "o-", label=label)
        ax2.plot(xs, [p["ratio_vs_1"] for p in points], "o-", label=label)
    cfg = runs[0]["config"]
    xlabel = (f"distinct adapters ({cfg['registered']:,} registered, rank {cfg['rank']}, "
              f"concurrency {cfg['concurrency']})")
    for ax, ylabel in ((ax1, "output tokens/s"), (ax2, "vs 1 adapter")):
        ax.set_xscale("log")
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax2.axhline(0.85, color="gray", ls="--", lw=1)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _cdf(ax, values: list[float], label: str, color: str) -> None:
    xs = sorted(values)
    ys = [0.0] + [(i + 1) / len(xs) for i in range(len(xs))]
    xs = [xs[0]] + xs
    ax.step(xs, ys, where="post", label=label, color=color)


def latency_cdfs(latencies: dict[str, dict[str, list[float]]], path: Path) -> Path:
    plt = require_matplotlib()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in ALL_SYSTEMS:
        if name in latencies:
            _cdf(ax1, latencies[name]["e2e"], LABELS[name], COLORS[name])
            if "ttft" in latencies[name]:
                _cdf(ax2, latencies[name]["ttft"], LABELS[name], COLORS[name])
    for ax, title in ((ax1, "End-to-end latency"), (ax2, "Time to first token")):
        ax.set_xscale("log")
        ax.set_xlabel("seconds since t0 (all requests arrive at t0)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def from_results(path: Path) -> list[Path]:
    """Redraw the plots of a results JSON beside it (same names as ``offline.py`` writes)."""
    import json

    results = json.loads(Path(path).read_text())
    stem, out, made = Path(path).stem, Path(path).parent, []
    scaling = results.get("scaling")
    if scaling and scaling.get("points"):
        ceiling = scaling["base"]["output_tokens_per_s"] if scaling.get("base") else None
        made.append(throughput_vs_adapters(scaling, out / f"{stem}_throughput_vs_adapters.png", ceiling))
    if results.get("latencies"):
        made.append(latency_cdfs(results["latencies"], out / f"{stem}_latency_cdf.png"))
    return made


if __name__ == "__main__":
    import json
    import sys

    if sys.argv[1:2] == ["--many"]:
        out, files = Path(sys.argv[2]), sys.argv[3:]
        print(distinct_adapters([json.loads(Path(f).read_text()) for f in files], out))
    else:
        for arg in sys.argv[1:]:
            for made in from_results(Path(arg)):
                print(made)
