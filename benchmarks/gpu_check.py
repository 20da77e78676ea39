"""One-shot GPU check of the engine with dummy weights (weights cannot travel to the GPU machine).

    python benchmarks/gpu_check.py --out DIR

1. Correctness on CUDA/bf16: a mixed batch (2 synthetic adapters + base rows) through the packed,
   paged engine vs HF + PEFT on the same random weights: first-step logits max |diff| and greedy
   token agreement over 16 new tokens; once per memory pool (``--memory-pools``: the row pool, and
   the unified pool, where the kernels read adapter blocks at unaligned offsets of the KV cache).
2. Decode tokens/s, base only vs 4 adapters, for the SmolLM2-135M and Llama-3-8B shapes, per pool.
Writes a JSON summary to DIR/gpu_check.json and prints it.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_throughput import measure
from synthetic_adapters import write_adapter

from loraplex_server.config import CacheConfig, EngineConfig, LoraConfig, ModelConfig
from loraplex_server.engine.engine import LLMEngine
from loraplex_server.engine.request import Prompt, SamplingParams
from loraplex_server.model.loader import load_model

DEVICE = {"device": "cuda", "dtype": "bfloat16"}


def engine_for(preset: str, max_loras: int, rank: int, kv_bytes: int, memory_pool: str = "separate"):
    cfg = EngineConfig(model=ModelConfig(model=preset, load_format="dummy", device=DEVICE["device"],
                                         dtype=DEVICE["dtype"]),
                       cache=CacheConfig(kv_cache_bytes=kv_bytes, memory_pool=memory_pool),
                       lora=LoraConfig(max_loras=max_loras, max_lora_rank=rank))
    loaded = load_model(cfg.model)
    # A normally constructed twin (PEFT on a deep copy of a meta-initialised model gave NaNs).
    reference = AutoModelForCausalLM.from_config(copy.deepcopy(loaded.model.config), dtype=loaded.dtype)
    reference = reference.to(loaded.device)
    reference.load_state_dict(loaded.model.state_dict())
    return LLMEngine(cfg, loaded=loaded), reference.eval()


def reference_greedy(peft, ids: list[int], base: bool, n: int):
    """Greedy by full re-forward of the whole sequence each step (no KV cache): the definition."""
    seq, gaps, first = list(ids), [], None
    for _ in range(n):
        with torch.no_grad():
            if base:
                with peft.disable_adapter():
                    logits = peft(input_ids=torch.tensor([seq], device=DEVICE["device"])).logits[0, -1].float()
            else:
                logits = peft(input_ids=torch.tensor([seq], device=DEVICE["device"])).logits[0, -1].float()
        first = logits if first is None else first
        top2 = logits.topk(2).values
        gaps.append(round((top2[0] - top2[1]).item(), 5))
        seq.append(int(logits.argmax()))
    return seq[len(ids):], gaps, first


def correctness(tmp: Path, memory_pool: str = "separate") -> dict:
    from peft import PeftModel

    engine, ref = engine_for("smollm2-135m", 4, 16, 1 << 30, memory_pool)
    paths = [write_adapter(tmp / f"c{i}", ref.config, rank, seed=i, b_scale=0.05) for i, rank in enumerate([8, 16])]
    for i, p in enumerate(paths):
        engine.lora.add_adapter(f"c{i}", p)
    rows = [("c0", list(range(10, 30))), (None, list(range(40, 47))), ("c1", list(range(5, 38))), ("c0", [7, 8, 9])]
    for j, (adapter, ids) in enumerate(rows):
        engine.add_request(engine.make_request(Prompt(token_ids=tuple(ids)),
                                               SamplingParams(max_new_tokens=16, ignore_eos=True), adapter, f"r{j}"))
    batch = engine.scheduler.schedule()
    slots = engine.lora.activate(batch.adapter_keys, engine.scheduler.running_adapter_keys())
    packed = engine.runner.pack(batch, slots)
    logits = engine.runner.forward_logits(packed)
    ours_first = {r.request_id: logits[k].float() for k, r in enumerate(packed.sampling_requests)}
    peft = PeftModel.from_pretrained(ref, str(paths[0]), adapter_name="c0")
    peft.load_adapter(str(paths[1]), adapter_name="c1")
    peft.eval()
    result: dict[str, Any] = {"first_step_max_abs_diff": {}, "greedy_agreement": {}}
    # Full generation through the engine (fresh engine state for simplicity).
    engine2, _ = engine_for("smollm2-135m", 4, 16, 1 << 30, memory_pool)
    for i, p in enumerate(paths):
        engine2.lora.add_adapter(f"c{i}", p)
    for j, (adapter, ids) in enumerate(rows):
        engine2.add_request(engine2.make_request(Prompt(token_ids=tuple(ids)),
                                                 SamplingParams(max_new_tokens=16, ignore_eos=True), adapter, f"r{j}"))
    produced: dict[str, list[int]] = {}
    while engine2.has_work:
        for out in engine2.step():
            produced.setdefault(out.request_id, []).extend(out.token_ids)
    for j, (adapter, ids) in enumerate(rows):
        if adapter is not None:
            peft.set_adapter(adapter)
        ref_tokens, gaps, first = reference_greedy(peft, ids, adapter is None, 16)
        ours = produced[f"r{j}"]
        agree = next((k for k, (a, b) in enumerate(zip(ours, ref_tokens, strict=False)) if a != b), len(ours))
        result["first_step_max_abs_diff"][f"r{j}"] = (ours_first[f"r{j}"] - first).abs().max().item()
        result["greedy_agreement"][f"r{j}"] = (f"{agree}/16 tokens equal before the first divergence; top-2 "
                                               f"logit gap there: {gaps[agree] if agree < 16 else None}")
        ref_logits = first
    result["logit_scale"] = ref_logits.abs().max().item()
    return result


def throughput(preset: str, tmp: Path, batches: list[int], new_tokens: int,
               memory_pool: str = "separate") -> list[dict]:
    engine, _ = engine_for(preset, 4, 16, 4 << 30, memory_pool)
    names = []
    for i in range(4):
        engine.lora.add_adapter(f"t{i}", write_adapter(tmp / f"{preset}-{i}", engine.loaded.model.config, 16, seed=i))
        names.append(f"t{i}")
    measure(engine, 2, [None, *names], 4)
    rows = []
    for b in batches:
        base = measure(engine, b, [None], new_tokens)
        lora = measure(engine, b, names, new_tokens)
        rows.append({"model": preset, "memory_pool": memory_pool, "batch": b, "base_tok_s": round(base, 1),
                     "lora4_tok_s": round(lora, 1), "ratio": round(lora / base, 3)})
        print(rows[-1], flush=True)
    del engine
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=".")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--presets", nargs="+", default=["smollm2-135m", "llama-3-8b"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--memory-pools", nargs="+", default=["separate", "unified"], choices=["separate", "unified"])
    args = p.parse_args()
    DEVICE.update(device=args.device, dtype=args.dtype)
    import transformers
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    summary: dict[str, Any] = {"device": name, "torch": torch.__version__, "transformers": transformers.__version__}
    print(summary, flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every part: a time limit that cuts the run short keeps what was measured
        (Path(args.out) / "gpu_check.json").write_text(json.dumps(summary, indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        for pool in args.memory_pools:
            t = time.time()
            key = "correctness_bf16" + ("" if pool == "separate" else f"_{pool}")
            summary[key] = correctness(Path(tmp), pool)
            print(key, summary[key], f"{time.time() - t:.1f}s", flush=True)
            save()
        summary["decode"] = []
        for preset in args.presets:
            for pool in args.memory_pools:
                summary["decode"] += throughput(preset, Path(tmp), args.batches, 64 if "135m" in preset else 32, pool)
                save()
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
