"""Triton kernel benchmark: LoRA shrink/expand bandwidth, and decode step time with the kernels.

    python benchmarks/kernel_bench.py [--dtype bfloat16] [--peak-gbs 3350] [--presets llama-3-8b]

On CUDA:
1. shrink and expand at hidden (576, 4096, 5120) x rank (4, 8, 16, 64) x adapters (1, 7, 32) x
   tokens (1, 17, 256), in the layout ``triton_lora_apply`` picks: time, achieved GB/s over the
   bytes the maths must move (x, the active slots' weights at their rank, h, y read and written)
   and % of the device's peak memory bandwidth (table below, or ``--peak-gbs``).
2. decode step time on a dummy-weight model: base only vs 4 adapters, with the torch ops and with
   the Triton kernels (switched on the engine: its ``LoraStepState.apply`` and the attention
   function registered on its model; on CUDA the engine picks the kernels by itself).
On CPU it runs a small correctness smoke under the Triton interpreter and says it needs CUDA.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton (transformers does)

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loraplex_server.lora import triton_ops  # noqa: E402
from loraplex_server.lora.mapping import LoraMapping  # noqa: E402
from loraplex_server.lora.ops import lora_apply, lora_apply_reference  # noqa: E402
from loraplex_server.model.attention import paged_attention, register_paged_attention  # noqa: E402
from loraplex_server.model.triton_attention import triton_paged_attention  # noqa: E402

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
    """Every adapter at ``rank``, tokens split evenly over them (decode: one token per adapter run)."""
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(adapters, rank, hidden, generator=g) / hidden ** 0.5).to(device, dtype)
    bt = (torch.randn(adapters, rank, hidden, generator=g) * 0.01).to(device, dtype)
    runs = [(i % adapters, tokens // adapters + (i < tokens % adapters)) for i in range(min(adapters, tokens))]
    mapping = LoraMapping.from_runs(runs, device)
    x = torch.randn(tokens, hidden, generator=g).to(device, dtype)
    y = torch.randn(tokens, hidden, generator=g).to(device, dtype)
    ranks = torch.full((adapters,), rank, dtype=torch.int32, device=device)
    return y, x, a, bt, ranks, mapping


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
                    y, x, a, bt, ranks, mapping = lora_case(hidden, rank, adapters, tokens, dtype, "cuda")
                    seg = triton_ops.SegmentTensors.from_segments(mapping.segments, "cuda")
                    layout = triton_ops.choose_layout(seg)
                    slots = mapping.token_slots
                    h = triton_ops.lora_shrink(x, a, ranks, slots, seg, layout)
                    t_s = do_bench(lambda: triton_ops.lora_shrink(x, a, ranks, slots, seg, layout)) * 1e3
                    t_e = do_bench(lambda: triton_ops.lora_expand(y, h, bt, ranks, slots, seg, layout)) * 1e3
                    b_s, b_e = moved_bytes(hidden, rank, tokens, len(mapping.active_slots), x.element_size())
                    cells = []
                    for us, nbytes in ((t_s, b_s), (t_e, b_e)):
                        gbs = nbytes / us / 1e3
                        cells += [f"{us:.1f}", f"{gbs:.0f}", f"{100 * gbs / peak:.0f}%" if peak else "?"]
                    print(f"| {hidden} | {rank} | {adapters} | {tokens} | {layout} | " + " | ".join(cells) + " |",
                          flush=True)


class TritonSwap:
    """Switch one engine between the torch functions and the Triton kernels (LoRA apply and paged
    attention); on CUDA the engine starts on the kernels, its per-device default."""

    def __init__(self, engine):
        self._model = engine.loaded.model
        self._state = engine.lora.state
        self._torch = (lora_apply, paged_attention)
        self._triton = (triton_ops.TritonLoraBackend(), triton_paged_attention)

    def use(self, triton: bool) -> None:
        apply, attend = self._triton if triton else self._torch
        self._state.apply = apply
        register_paged_attention(self._model, attend)


def decode_step_ms(engine, batch: int, adapters: list, steps: int) -> float:
    from loraplex_server.engine.request import Prompt, SamplingParams

    for i in range(batch):
        prompt = Prompt(token_ids=tuple(range(100 + i, 116 + i)))
        engine.add_request(engine.make_request(prompt, SamplingParams(max_new_tokens=steps + 4, ignore_eos=True),
                                               adapters[i % len(adapters)]))
    while len(engine.step()) < batch:  # prefill (possibly chunked) until every request decodes
        pass
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    while engine.has_work:
        engine.step()
    return elapsed * 1e3 / steps


def bench_decode(presets: list[str], batches: list[int], dtype_name: str, steps: int) -> None:
    from synthetic_adapters import write_adapter

    from loraplex_server.config import CacheConfig, EngineConfig, LoraConfig, ModelConfig
    from loraplex_server.engine.engine import LLMEngine

    print("\n| model | batch | base torch ms | base triton-attn ms | 4 LoRA torch ms | 4 LoRA triton ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for preset in presets:
        cfg = EngineConfig(model=ModelConfig(model=preset, load_format="dummy", device="cuda", dtype=dtype_name),
                           cache=CacheConfig(kv_cache_bytes=4 << 30), lora=LoraConfig(max_loras=4, max_lora_rank=16))
        engine = LLMEngine(cfg)
        swap = TritonSwap(engine)
        with tempfile.TemporaryDirectory() as tmp:
            names = [f"a{i}" for i in range(4)]
            for i, name in enumerate(names):
                engine.lora.add_adapter(name, write_adapter(Path(tmp) / name, engine.loaded.model.config, 16, seed=i))
            for batch in batches:
                row = []
                for triton, adapters in ((False, [None]), (True, [None]), (False, names), (True, names)):
                    swap.use(triton)
                    decode_step_ms(engine, batch, adapters, 2)  # warm-up: compiles this batch's tile shapes
                    row.append(decode_step_ms(engine, batch, adapters, steps))
                print(f"| {preset} | {batch} | " + " | ".join(f"{ms:.2f}" for ms in row) + " |", flush=True)
        swap.use(False)
        del engine
        torch.cuda.empty_cache()


def cpu_smoke() -> None:
    """Correctness only: one LoRA batch per layout against the loop, under the interpreter."""
    y, x, a, bt, ranks, mapping = lora_case(576, 8, 3, 17, torch.float32, "cpu")
    ref = y.clone()
    lora_apply_reference(ref, x, a, bt, mapping.token_slots)
    seg = triton_ops.SegmentTensors.from_segments(mapping.segments, "cpu")
    for layout in ("segment", "gather"):
        out = y.clone()
        triton_ops.triton_lora_apply(out, x, a, bt, ranks, mapping.token_slots, seg, layout)
        print(f"cpu smoke ({layout}, Triton interpreter): max |diff| vs loop = {(out - ref).abs().max():.2e}")
    print("kernel_bench needs CUDA for bandwidth and step-time numbers; this was a correctness smoke only.")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--peak-gbs", type=float, default=None, help="device peak memory bandwidth, GB/s")
    p.add_argument("--presets", nargs="*", default=["smollm2-135m", "llama-3-8b"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--steps", type=int, default=32, help="decode steps timed per configuration")
    p.add_argument("--skip-kernels", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        cpu_smoke()
        return
    name = torch.cuda.get_device_name(0)
    peak = peak_gbs(name, args.peak_gbs)
    print(f"device={name} peak={peak or 'unknown (pass --peak-gbs)'} GB/s dtype={args.dtype} torch={torch.__version__}")
    if not args.skip_kernels:
        bench_kernels(getattr(torch, args.dtype), peak)
    if args.presets:
        bench_decode(args.presets, args.batches, args.dtype, args.steps)


if __name__ == "__main__":
    main()
