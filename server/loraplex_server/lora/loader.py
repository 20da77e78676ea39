"""PEFT adapter directory -> validated ``LoraAdapter``, or an AdapterLoadError naming the problem.

Nothing is published until every check has passed, so an adapter is never half-loaded.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import AdapterLoadError
from .weights import LoraAdapter, LoraModuleWeights, ModuleKey, TargetShape

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(?:.*\.)?([A-Za-z0-9_]+)\.lora_([AB])\.weight$")


def _read_config(adapter_id: str, path: Path) -> dict:
    if not path.is_dir():
        raise AdapterLoadError(adapter_id, f"{path} is not a directory")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterLoadError(adapter_id, f"{CONFIG_FILE} missing in {path}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterLoadError(adapter_id, f"{CONFIG_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterLoadError(adapter_id, f"{CONFIG_FILE} must hold a JSON object")
    return config


def check_config(adapter_id: str, config: dict) -> None:
    """Refuse adapter kinds PEFT can make but we cannot serve."""
    peft_type = str(config.get("peft_type", "LORA")).upper()
    refusals = [
        (peft_type != "LORA", f"peft_type {peft_type} is not supported (only LORA)"),
        (bool(config.get("use_dora")), "DoRA adapters (use_dora) are not supported"),
        (bool(config.get("modules_to_save")), f"modules_to_save {config.get('modules_to_save')} is not supported"),
        (config.get("bias", "none") != "none", f"bias={config.get('bias')!r} is not supported (only 'none')"),
        (bool(config.get("lora_bias")), "lora_bias is not supported"),
        (bool(config.get("fan_in_fan_out")), "fan_in_fan_out adapters are not supported"),
        (bool(config.get("use_qalora")), "QA-LoRA adapters are not supported"),
        (bool(config.get("alora_invocation_tokens")), "activated LoRA (alora_invocation_tokens) is not supported"),
        (bool(config.get("layer_replication")), "layer_replication is not supported"),
        (bool(config.get("trainable_token_indices")), "trainable_token_indices (embedding tokens) is not supported"),
    ]
    for refused, message in refusals:
        if refused:
            raise AdapterLoadError(adapter_id, message)


def _pattern_value(patterns: dict, module_path: str, default):
    """PEFT's rank/alpha pattern lookup: a key matches a module path ending in it."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module_path):
            return value
    return default


def _read_tensors(adapter_id: str, path: Path) -> dict[str, torch.Tensor]:
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        pickles = [n for n in PICKLE_FILES if (path / n).is_file()]
        if pickles:
            raise AdapterLoadError(adapter_id, f"{pickles[0]} is a pickle file; we never unpickle: "
                                               f"save the adapter with safe_serialization=True")
        raise AdapterLoadError(adapter_id, f"{WEIGHTS_FILE} missing in {path}")
    try:
        return load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterLoadError(adapter_id, f"{WEIGHTS_FILE} is not a valid safetensors file: {exc}") from exc


def _group_pairs(adapter_id: str, tensors: dict[str, torch.Tensor], targets: dict[ModuleKey, TargetShape]):
    known = sorted({k.name for k in targets})
    pairs: dict[ModuleKey, dict[str, torch.Tensor]] = {}
    paths: dict[ModuleKey, str] = {}
    for name, tensor in tensors.items():
        if "lora_embedding" in name or "embed_tokens" in name or "lm_head" in name:
            raise AdapterLoadError(adapter_id, f"embedding/lm_head LoRA ({name}) is not supported")
        match = _KEY.match(name)
        if match is None:
            raise AdapterLoadError(adapter_id, f"unexpected tensor {name!r}: only lora_A/lora_B weights of "
                                               f"decoder-layer linear modules are supported")
        key = ModuleKey(int(match.group(1)), match.group(2))
        if key.name not in known:
            raise AdapterLoadError(adapter_id, f"unknown target module {key.name!r}; this model's targets are {known}")
        if key not in targets:
            raise AdapterLoadError(adapter_id, f"layer {key.layer} does not exist in the base model "
                                               f"(base model mismatch?)")
        pairs.setdefault(key, {})[match.group(3)] = tensor
        paths[key] = name.rsplit(".lora_", 1)[0]
    if not pairs:
        raise AdapterLoadError(adapter_id, "the adapter holds no LoRA weights")
    return pairs, paths


def _module_weights(adapter_id, key, pair, shape: TargetShape, max_rank, scale) -> LoraModuleWeights:
    where = f"layer {key.layer} {key.name}"
    if set(pair) != {"A", "B"}:
        raise AdapterLoadError(adapter_id, f"{where}: lora_A and lora_B must both be present")
    a, b = pair["A"], pair["B"]
    if a.dim() != 2 or b.dim() != 2:
        raise AdapterLoadError(adapter_id, f"{where}: lora weights must be 2-D")
    rank = a.shape[0]
    if a.shape[1] != shape.in_features or b.shape != (shape.out_features, rank):
        raise AdapterLoadError(adapter_id, f"{where}: wrong shapes A{tuple(a.shape)} B{tuple(b.shape)}; expected "
                                           f"A[r, {shape.in_features}] B[{shape.out_features}, r]")
    if rank > max_rank:
        raise AdapterLoadError(adapter_id, f"{where}: rank {rank} exceeds max_lora_rank {max_rank}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise AdapterLoadError(adapter_id, f"{where}: weights contain NaN or Inf")
    return LoraModuleWeights(a=a.float().contiguous(), b=b.float().contiguous(), scale=scale)


def load_adapter(adapter_id: str, path: Path, targets: dict[ModuleKey, TargetShape],
                 max_rank: int) -> LoraAdapter:
    """Read and validate a PEFT LoRA directory against the base model's target modules."""
    path = Path(path)
    config = _read_config(adapter_id, path)
    check_config(adapter_id, config)
    tensors = _read_tensors(adapter_id, path)
    pairs, paths = _group_pairs(adapter_id, tensors, targets)
    alpha = float(config.get("lora_alpha", config.get("r", 8)))
    rslora = bool(config.get("use_rslora", False))
    modules = {}
    for key, pair in pairs.items():
        rank = pair["A"].shape[0] if "A" in pair else 1
        module_alpha = float(_pattern_value(config.get("alpha_pattern"), paths[key], alpha))
        scale = module_alpha / (math.sqrt(rank) if rslora else rank)
        modules[key] = _module_weights(adapter_id, key, pair, targets[key], max_rank, scale)
    return LoraAdapter(adapter_id=adapter_id, source=path, modules=modules, lora_alpha=alpha,
                       use_rslora=rslora, base_model_name=config.get("base_model_name_or_path"))
