"""Write random LoRA adapters in PEFT's on-disk format for any base model shape (no peft needed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

ALL7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def module_shapes(config) -> dict[str, tuple[int, int]]:
    """(in, out) of each Llama-style projection."""
    h, inter = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    hd = getattr(config, "head_dim", None) or h // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * hd
    return {"q_proj": (h, heads * hd), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (heads * hd, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


def write_adapter(out: Path, config, rank: int, targets=ALL7, alpha: float | None = None, seed: int = 0,
                  b_scale: float = 0.01) -> Path:
    g = torch.Generator().manual_seed(seed)
    shapes = module_shapes(config)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for name in targets:
            d_in, d_out = shapes[name]
            part = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{part}.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, d_in, generator=g) / d_in ** 0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(d_out, rank, generator=g) * b_scale
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha or 2 * rank, "target_modules": list(targets),
           "bias": "none", "use_dora": False, "use_rslora": False, "modules_to_save": None}
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=1))
    return out


def write_linked_pool(root: Path, config, count: int, rank: int = 4, distinct: int = 8) -> list[Path]:
    """``count`` adapter directories ``root/a00000`` ..., each holding hard links to the files of one
    of ``distinct`` adapters written next to ``root`` (``<root>-sources``; seeds 0..distinct-1,
    round-robin): many ids, little disk. Directories already complete are reused."""
    sources = [root.with_name(f"{root.name}-sources") / f"s{s}" for s in range(distinct)]
    for seed, source in enumerate(sources):
        if not (source / "adapter_config.json").is_file():
            write_adapter(source, config, rank, seed=seed)
    paths = []
    for i in range(count):
        path = root / f"a{i:05d}"
        paths.append(path)
        if (path / "adapter_model.safetensors").is_file():
            continue
        path.mkdir(parents=True, exist_ok=True)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            target = path / name
            target.unlink(missing_ok=True)
            os.link(sources[i % distinct] / name, target)
    return paths
