"""PEFT adapter directory -> validated ``LoraAdapter``, or an AdapterLoadError naming the problem.

Nothing is published until every check has passed, so an adapter is never half-loaded.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from ..errors import AdapterLoadError
from .adapter_config import check_agreement, check_field_types, module_name, pattern_entry
from .adapter_files import CONFIG_FILE, WEIGHTS_FILE, AdapterFiles, read_adapter_files, read_adapter_head
from .content_memo import ContentMemo
from .safetensors_header import HeaderError, parse_header
from .weights import AdapterMeta, Fingerprint, LoraAdapter, LoraModuleWeights, ModuleKey, TargetShape

DEFAULT_MAX_ADAPTER_BYTES = 2 * 1024 ** 3
_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(?:.*\.)?([A-Za-z0-9_]+)\.lora_([AB])\.weight$")


def _parse_config(adapter_id: str, data: bytes) -> dict:
    try:
        config = json.loads(data)
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


def _read_shapes(adapter_id: str, weights: bytes, size: int) -> dict[str, tuple[int, ...]]:
    try:
        return {name: info.shape for name, info in parse_header(weights, size).items()}
    except HeaderError as exc:
        raise AdapterLoadError(adapter_id, f"{WEIGHTS_FILE} is not a valid safetensors file: {exc}") from exc


def _group_pairs(adapter_id: str, shapes: dict[str, tuple[int, ...]], targets: dict[ModuleKey, TargetShape]):
    """Tensor names -> {module: {"A": name, "B": name}}, refusing anything that is not decoder-layer LoRA."""
    known = sorted({k.name for k in targets})
    pairs: dict[ModuleKey, dict[str, str]] = {}
    for name in shapes:
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
        pairs.setdefault(key, {})[match.group(3)] = name
    if not pairs:
        raise AdapterLoadError(adapter_id, "the adapter holds no LoRA weights")
    return pairs


def _check_shapes(adapter_id: str, key: ModuleKey, pair: dict[str, str], shapes, target: TargetShape,
                  max_rank: int) -> int:
    """Validate one module's A/B shapes; returns its rank."""
    where = f"layer {key.layer} {key.name}"
    if set(pair) != {"A", "B"}:
        raise AdapterLoadError(adapter_id, f"{where}: lora_A and lora_B must both be present")
    a, b = shapes[pair["A"]], shapes[pair["B"]]
    if len(a) != 2 or len(b) != 2:
        raise AdapterLoadError(adapter_id, f"{where}: lora weights must be 2-D")
    rank = a[0]
    if a[1] != target.in_features or b != (target.out_features, rank):
        raise AdapterLoadError(adapter_id, f"{where}: wrong shapes A{tuple(a)} B{tuple(b)}; expected "
                                           f"A[r, {target.in_features}] B[{target.out_features}, r] "
                                           f"(base model mismatch?)")
    if rank > max_rank:
        raise AdapterLoadError(adapter_id, f"{where}: rank {rank} exceeds max_lora_rank {max_rank} "
                                           "(the largest rank served; lora_pool_rows caps it when smaller)")
    return rank


@dataclass(frozen=True)
class AdapterPlan:
    """Everything validated from the config and the safetensors header, before reading weights."""

    meta: AdapterMeta
    tensors: dict[ModuleKey, tuple[str, str]]  # module -> (lora_A name, lora_B name)
    scales: dict[ModuleKey, float]
    lora_alpha: float
    use_rslora: bool
    base_model_name: str | None
    fingerprint: Fingerprint


@dataclass(frozen=True)
class HeaderLayout:
    """The weights header, validated against the model's targets and the largest rank served."""

    tensors: dict[ModuleKey, tuple[str, str]]  # module -> (lora_A name, lora_B name)
    ranks: dict[ModuleKey, int]
    resident_bytes: int  # once converted to fp32
    target_names: tuple[str, ...]  # the module names it adapts, sorted


@dataclass(frozen=True)
class ConfigTerms:
    """What the config adds to a layout, once checked against it."""

    scales: dict[ModuleKey, float]
    lora_alpha: float
    use_rslora: bool
    base_model_name: str | None


def _header_layout(adapter_id: str, files: AdapterFiles, targets: dict[ModuleKey, TargetShape],
                   max_rank: int) -> HeaderLayout:
    shapes = _read_shapes(adapter_id, files.weights, files.weights_size)
    pairs = _group_pairs(adapter_id, shapes, targets)
    ranks = {key: _check_shapes(adapter_id, key, pair, shapes, targets[key], max_rank) for key, pair in pairs.items()}
    size = sum(4 * (shapes[p["A"]][0] * shapes[p["A"]][1] + shapes[p["B"]][0] * shapes[p["B"]][1])
               for p in pairs.values())
    return HeaderLayout({k: (p["A"], p["B"]) for k, p in pairs.items()}, ranks, size,
                        tuple(sorted({sys.intern(k.name) for k in pairs})))


def _checked_config(adapter_id: str, config_bytes: bytes) -> dict:
    config = _parse_config(adapter_id, config_bytes)
    check_config(adapter_id, config)
    check_field_types(adapter_id, config)
    return config


def _config_terms(adapter_id: str, config: dict, layout: HeaderLayout) -> ConfigTerms:
    alpha = float(config.get("lora_alpha", config.get("r", 8)))
    rslora = bool(config.get("use_rslora", False))
    scales = {}
    for key, (name_a, _) in layout.tensors.items():
        rank = layout.ranks[key]
        alpha_entry = pattern_entry(config.get("alpha_pattern"), module_name(name_a))
        module_alpha = float(alpha_entry[1]) if alpha_entry else alpha
        scales[key] = module_alpha / (math.sqrt(rank) if rslora else rank)
    check_agreement(adapter_id, config, {module_name(a): layout.ranks[k] for k, (a, _) in layout.tensors.items()})
    return ConfigTerms(scales, alpha, rslora, config.get("base_model_name_or_path"))


def inspect_adapter(adapter_id: str, path: Path, targets: dict[ModuleKey, TargetShape], max_rank: int,
                    max_bytes: int = DEFAULT_MAX_ADAPTER_BYTES, files: AdapterFiles | None = None,
                    memo: ContentMemo | None = None) -> AdapterPlan:
    """Validation of config and header (no tensor conversion): what registration needs. Reads the
    config and the weights header unless ``files`` are given. With a ``memo`` (one per model and
    max rank), a header and a config already validated together are not validated again."""
    path = Path(path)
    files = files or read_adapter_head(adapter_id, path, max_bytes)
    memo = ContentMemo(0) if memo is None else memo
    # keys: digests of the validated bytes, taken at the read (a header may be megabytes); config
    # first, then the header, then the two together
    config_key, head_key = files.config_digest, (files.header_digest, files.weights_size, max_rank)
    config = memo.get_or_make(("config", config_key), lambda: _checked_config(adapter_id, files.config))
    layout = memo.get_or_make(("layout", head_key), lambda: _header_layout(adapter_id, files, targets, max_rank))
    terms = memo.get_or_make(("terms", config_key, head_key), lambda: _config_terms(adapter_id, config, layout))
    meta = AdapterMeta(adapter_id, path, max(layout.ranks.values()), layout.target_names, layout.resident_bytes)
    return AdapterPlan(meta, layout.tensors, terms.scales, terms.lora_alpha, terms.use_rslora, terms.base_model_name,
                       files.fingerprint)


def load_adapter(adapter_id: str, path: Path, targets: dict[ModuleKey, TargetShape], max_rank: int,
                 max_bytes: int = DEFAULT_MAX_ADAPTER_BYTES, memo: ContentMemo | None = None) -> LoraAdapter:
    """Full validation and read: a PEFT LoRA directory -> LoraAdapter (or AdapterLoadError).
    Each file is read once; the tensors come from the same bytes the checks saw. With the
    registry's ``memo``, a header and config it validated at registration are not validated again."""
    files = read_adapter_files(adapter_id, Path(path), max_bytes)
    plan = inspect_adapter(adapter_id, path, targets, max_rank, max_bytes, files, memo)
    try:
        tensors = load_safetensors(files.weights)
    except (SafetensorError, ValueError) as exc:
        raise AdapterLoadError(adapter_id, f"{WEIGHTS_FILE} is not a valid safetensors file: {exc}") from exc
    pairs = {key: (tensors[name_a], tensors[name_b]) for key, (name_a, name_b) in plan.tensors.items()}
    return LoraAdapter(adapter_id=adapter_id, source=Path(path), modules=_packed(adapter_id, pairs, plan.scales),
                       lora_alpha=plan.lora_alpha, use_rslora=plan.use_rslora, base_model_name=plan.base_model_name,
                       fingerprint=plan.fingerprint)


def _packed(adapter_id: str, pairs: dict[ModuleKey, tuple[torch.Tensor, torch.Tensor]],
            scales: dict[ModuleKey, float]) -> dict[ModuleKey, LoraModuleWeights]:
    """Every module's A and (scale * B)^T in fp32, as views of one host buffer (what slots copy
    from), after one finiteness check over all of them (per module only to name a culprit):

        for key, (A, B) in pairs: a[key] = A; bt[key] = scales[key] * B^T   # views of one fp32 buffer
        if any element is NaN or Inf: refuse, naming the first module with one
    """
    total = sum(a.numel() + b.numel() for a, b in pairs.values())
    flat = torch.empty(total, dtype=torch.float32)
    modules, offset = {}, 0
    for key, (a, b) in pairs.items():
        rank, fan_in, fan_out = a.shape[0], a.shape[1], b.shape[0]
        a_view = flat[offset:offset + rank * fan_in].view(rank, fan_in)
        offset += rank * fan_in
        bt_view = flat[offset:offset + rank * fan_out].view(rank, fan_out)
        offset += rank * fan_out
        a_view.copy_(a)
        bt_view.copy_(b.T).mul_(scales[key])  # as the fp32 product (b.float().T * scale)
        modules[key] = LoraModuleWeights(a_view, bt_view, scales[key])
    if not math.isfinite(float(flat.sum())):  # a NaN or an Inf reaches the sum (so may a finite overflow)
        for key, m in modules.items():
            if not (torch.isfinite(m.a).all() and torch.isfinite(m.bt).all()):
                raise AdapterLoadError(adapter_id, f"layer {key.layer} {key.name}: weights contain NaN or Inf "
                                       "(or overflow fp32 once scaled by alpha / r)")
    return modules
