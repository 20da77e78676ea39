"""Triton kernel benchmark: LoRA shrink/expand bandwidth, and decode step time with the kernels.

    python benchmarks/kernel_bench.py [--dtype bfloat16] [--peak-gbs 3350] [--presets llama-3-8b]

On CUDA:
1. shrink and expand at hidden (576, 4096, 5120) x rank (4, 8, 16, 64) x adapters (1, 7, 32) x
   tokens (1, 17, 256), in the layout ``triton_lora_apply`` picks: time, achieved GB/s over the
   bytes the maths must move (x, the active slots' weights at their rank, h, y read and written)
   and % of the device's peak memory bandwidth (table below, or ``--peak-gbs``).
2. decode step time on a dummy-weight model (the engine's own CUDA functions: Triton kernels):
   base only vs 32 adapters of ranks 8/16/32/64, each with the captured decode graphs and eagerly.
On CPU it runs a small correctness smoke under the Triton interpreter and says it needs CUDA.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton (transformers does)

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loraplex_server.lora import triton_ops
from loraplex_server.lora.ids import AdapterId
from loraplex_server.lora.mapping import LoraMapping
from loraplex_server.lora.ops import lora_apply_reference

# Peak memory bandwidth (GB/s) by a substring of torch.cuda.get_device_name(), first match wins.
PEAK_GBS = [
    ("H200", 4800), ("H100 NVL", 3900), ("H100 PCIe", 2000), ("H100", 3350), ("GH200", 4000),
    ("A100 80GB PCIe", 1935), ("A100-SXM4-80GB", 2039), ("A100 80GB", 2039), ("A100", 1555),
    ("L40S", 864), ("L40", 864), ("L4", 300), ("A10G", 600), ("A10", 600), ("RTX 4090", 1008),
    ("V100", 900), ("T4", 320),
]
HIDDEN, RANKS, ADAPTERS, TOKENS = (576, 4096, 5120), (4, 8, 16, 64), (1, 7, 32), (1, 17, 256)


def peak_gbs(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((gbs for key, gbs in PEAK_GBS if key in name), None)


def lora_case(hidden: int, rank: int, adapters: int, tokens: int, dtype, device):
    """Every adapter at ``rank``, side by side in flat A / Bt buffers (slot i's A at element
    ``i * rank * hidden``, its Bt likewise), tokens split evenly over them (decode: one token per
    adapter run)."""
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(adapters * rank * hidden, generator=g) / hidden ** 0.5).to(device, dtype)
    bt = (torch.randn(adapters * rank * hidden, generator=g) * 0.01).to(device, dtype)
    runs = [(i % adapters, tokens // adapters + (i < tokens % adapters)) for i in range(min(adapters, tokens))]
    mapping = LoraMapping.from_runs(runs, device)
    x = torch.randn(tokens, hidden, generator=g).to(device, dtype)
    y = torch.randn(tokens, hidden, generator=g).to(device, dtype)
    ranks = torch.full((adapters,), rank, dtype=torch.int32, device=device)
    a_offsets = torch.arange(adapters, dtype=torch.int32, device=device) * (rank * hidden)
    b_offsets = a_offsets.clone()  # out = in = hidden here; a table of its own, as a layer keeps
    return y, x, a, bt, ranks, a_offsets, b_offsets, mapping


def moved_bytes(hidden, rank, tokens, active, elt) -> tuple[int, int]:
    """(shrink, expand) bytes: x + A at rank, h fp32 written; h + Bt at rank read, y read + written."""
    shrink = tokens * hidden * elt + active * rank * hidden * elt + tokens * rank * 4
    expand = tokens * rank * 4 + active * rank * hidden * elt + 2 * tokens * hidden * elt
    return shrink, expand


def bench_kernels(dtype, peak: float | None) -> None:
    from triton.testing import do_bench

    print("| hidden | rank | adapters | tokens | layout | shrink us | GB/s | % peak | expand us | GB/s | % peak |")
    print("|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for hidden in HIDDEN:
        for rank in RANKS:
            for adapters in ADAPTERS:
                for tokens in TOKENS:
                    y, x, a, bt, ranks, a_offs, b_offs, mapping = lora_case(hidden, rank, adapters, tokens, dtype,
                                                                            "cuda")
                    seg = triton_ops.SegmentTensors.from_segments(mapping.segments, "cuda")
                    layout = triton_ops.choose_layout(seg)
                    slots = mapping.token_slots
                    h = triton_ops.lora_shrink(x, a, ranks, a_offs, rank, slots, seg, layout)
                    t_s = do_bench(functools.partial(triton_ops.lora_shrink, x, a, ranks, a_offs, rank, slots, seg,
                                                     layout)) * 1e3
                    t_e = do_bench(functools.partial(triton_ops.lora_expand, y, h, bt, ranks, b_offs, slots, seg,
                                                     layout)) * 1e3
                    b_s, b_e = moved_bytes(hidden, rank, tokens, len(mapping.active_slots), x.element_size())
                    cells = []
                    for us, nbytes in ((t_s, b_s), (t_e, b_e)):
                        gbs = nbytes / us / 1e3
                        cells += [f"{us:.1f}", f"{gbs:.0f}", f"{100 * gbs / peak:.0f}%" if peak else "?"]
                    print(f"| {hidden} | {rank} | {adapters} | {tokens} | {layout} | " + " | ".join(cells) + " |",
                          flush=True)


RANK_MIX = (8, 16, 32, 64)


def decode_step_ms(engine, batch: int, adapters: list, steps: int) -> float:
    """Mean wall time of one engine step with ``batch`` sequences decoding (after their prefill)."""
    from loraplex_server.engine.request import Prompt, SamplingParams

    sync = torch.cuda.synchronize if engine.loaded.device.type == "cuda" else (lambda: None)
    for i in range(batch):
        prompt = Prompt(token_ids=tuple(range(100 + i, 116 + i)))
        engine.add_request(engine.make_request(prompt, SamplingParams(max_new_tokens=steps + 4, ignore_eos=True),
                                               adapters[i % len(adapters)]))
    while len(engine.step()) < batch:  # prefill (possibly chunked) until every request decodes
        pass
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync()
    elapsed = time.perf_counter() - start
    while engine.has_work:
        engine.step()
    return elapsed * 1e3 / steps


def decode_engine(preset: str, dtype_name: str, device: str, num_adapters: int, max_batch: int, tmp: Path):
    """An engine on dummy weights with decode graphs captured up to ``max_batch`` and
    ``num_adapters`` resident adapters of ranks cycling through ``RANK_MIX`` (all 7 modules)."""
    from synthetic_adapters import write_adapter

    from loraplex_server.config import CacheConfig, EngineConfig, LoraConfig, ModelConfig, SchedulerConfig
    from loraplex_server.engine.engine import LLMEngine

    cfg = EngineConfig(
        model=ModelConfig(model=preset, load_format="dummy", device=device, dtype=dtype_name,
                          max_model_len=512, cuda_graphs="on", cuda_graph_max_batch=max_batch),
        cache=CacheConfig(kv_cache_bytes=2 << 30),
        scheduler=SchedulerConfig(max_num_seqs=max_batch, max_num_batched_tokens=max(512, 16 * max_batch)),
        lora=LoraConfig(max_loras=num_adapters, max_cpu_loras=num_adapters, max_lora_rank=max(RANK_MIX)))
    engine = LLMEngine(cfg)
    names = [f"a{i}" for i in range(num_adapters)]
    for i, name in enumerate(names):
        rank = RANK_MIX[i % len(RANK_MIX)]
        engine.lora.add_adapter(AdapterId(name), write_adapter(tmp / name, engine.loaded.model.config, rank, seed=i))
    return engine, names


def bench_decode(presets: list[str], batches: list[int], dtype_name: str, steps: int, num_adapters: int,
                 device: str = "cuda") -> list[dict]:
    """Decode step time, base only vs ``num_adapters`` adapters of mixed rank (one per two
    sequences at batch 64), with the captured graphs and eagerly, on the device's own functions
    (the Triton kernels on CUDA). The issue's target: LoRA / base <= 1.10 at batch 64."""
    print(f"\n| model | batch | base eager ms | base graph ms | {num_adapters} LoRA eager ms | "
          f"{num_adapters} LoRA graph ms | LoRA/base (graph) | LoRA/base (eager) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for preset in presets:
        with tempfile.TemporaryDirectory() as tmp:
            engine, names = decode_engine(preset, dtype_name, device, num_adapters, max(batches), Path(tmp))
            graphs = engine.runner.decode_graphs
            captured = f"captured in {graphs.capture_seconds:.1f} s" if graphs else "OFF"
            print(f"<!-- {preset}: decode graphs {captured} -->")
            for batch in batches:
                ms = {}
                for adapters in ([None], names):
                    for graphed in (False, True):
                        engine.runner.decode_graphs = graphs if graphed else None
                        decode_step_ms(engine, batch, adapters, 2)  # warm-up: compiles this batch's shapes
                        ms[adapters[0] is not None, graphed] = decode_step_ms(engine, batch, adapters, steps)
                row = dict(model=preset, batch=batch, base_eager_ms=ms[False, False], base_graph_ms=ms[False, True],
                           lora_eager_ms=ms[True, False], lora_graph_ms=ms[True, True],
                           capture_s=graphs.capture_seconds if graphs else None)
                rows.append(row)
                print(f"| {preset} | {batch} | {ms[False, False]:.2f} | {ms[False, True]:.2f} | "
                      f"{ms[True, False]:.2f} | {ms[True, True]:.2f} | {ms[True, True] / ms[False, True]:.3f} | "
                      f"{ms[True, False] / ms[False, False]:.3f} |", flush=True)
            del engine, graphs
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def cpu_smoke() -> None:
    """Correctness only: one LoRA batch per layout against the loop, under the interpreter."""
    y, x, a, bt, ranks, a_offsets, b_offsets, mapping = lora_case(576, 8, 3, 17, torch.float32, "cpu")
    ref = y.clone()
    lora_apply_reference(ref, x, a, bt, ranks.tolist(), a_offsets.tolist(), b_offsets.tolist(), mapping.token_slots)
    seg = triton_ops.SegmentTensors.from_segments(mapping.segments, "cpu")
    for layout in ("segment", "gather"):
        out = y.clone()
        triton_ops.triton_lora_apply(out, x, a, bt, ranks, a_offsets, b_offsets, 8, mapping.token_slots, seg, layout)
        print(f"cpu smoke ({layout}, Triton interpreter): max |diff| vs loop = {(out - ref).abs().max():.2e}")
    print("kernel_bench needs CUDA for bandwidth and step-time numbers; this was a correctness smoke only.")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--peak-gbs", type=float, default=None, help="device peak memory bandwidth, GB/s")
    p.add_argument("--presets", nargs="*", default=["smollm2-135m", "llama-3-8b"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--steps", type=int, default=32, help="decode steps timed per configuration")
    p.add_argument("--adapters", type=int, default=32, help="distinct adapters in the LoRA decode batches")
    p.add_argument("--json", type=Path, default=None, help="also write the decode rows here")
    p.add_argument("--cpu-decode", action="store_true",
                   help="without CUDA: also run the decode comparison on the CPU (a smoke of the bench itself)")
    p.add_argument("--skip-kernels", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        cpu_smoke()
        if args.cpu_decode:
            rows = bench_decode(args.presets, args.batches, "float32", args.steps, args.adapters, device="cpu")
            if args.json:
                args.json.write_text(json.dumps(dict(device="cpu", dtype="float32", decode=rows), indent=1))
        return
    name = torch.cuda.get_device_name(0)
    peak = peak_gbs(name, args.peak_gbs)
    print(f"device={name} peak={peak or 'unknown (pass --peak-gbs)'} GB/s dtype={args.dtype} torch={torch.__version__}")
    if not args.skip_kernels:
        bench_kernels(getattr(torch, args.dtype), peak)
    if args.presets:
        rows = bench_decode(args.presets, args.batches, args.dtype, args.steps, args.adapters)
        if args.json:
            args.json.write_text(json.dumps(dict(device=name, dtype=args.dtype, decode=rows), indent=1))


if __name__ == "__main__":
    main()
