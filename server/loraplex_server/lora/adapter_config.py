"""adapter_config.json against the weights, read as PEFT reads it.

- Field types: ``r`` a positive integer, ``lora_alpha`` a finite number, ``target_modules`` a list
  of names or one regex string, ``rank_pattern``/``alpha_pattern`` objects of such values,
  ``use_rslora`` a boolean. A missing (or, except ``lora_alpha``, null) field keeps PEFT's default.
- Ranks: each module's rank in the weights equals its ``rank_pattern`` entry, else ``r``.
  A config without ``r`` states no rank, so nothing is compared.
- Coverage: ``target_modules`` selects every module the weights hold. PEFT's rule: a string is
  ``re.fullmatch``-ed against the module's name in the base model (``"all-linear"`` selects every
  linear layer); a list entry matches the name exactly or as its last dotted part(s).
"""

from __future__ import annotations

import math
import re
from typing import Any

from ..errors import AdapterLoadError

ALL_LINEAR = "all-linear"
_PEFT_PREFIX = "base_model.model."


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_field_types(adapter_id: str, config: dict) -> None:
    """Refuse wrongly typed fields with a message naming the field and the value found."""
    def refuse(message: str):
        raise AdapterLoadError(adapter_id, f"adapter_config.json: {message}")
    if config.get("r") is not None and not _positive_int(config["r"]):
        refuse(f"r must be a positive integer, got {config['r']!r}")
    if "lora_alpha" in config and not _finite_number(config["lora_alpha"]):
        refuse(f"lora_alpha must be a finite number, got {config['lora_alpha']!r}")
    targets = config.get("target_modules")
    if targets is not None and not isinstance(targets, str) and not (
            isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        refuse(f"target_modules must be a list of module names or a regex string, got {targets!r}")
    for field, valid, kind in (("rank_pattern", _positive_int, "a positive integer"),
                               ("alpha_pattern", _finite_number, "a finite number")):
        patterns = config.get(field)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            refuse(f"{field} must be an object of pattern -> value, got {patterns!r}")
        for pattern, value in patterns.items():
            if not valid(value):
                refuse(f"{field}[{pattern!r}] must be {kind}, got {value!r}")
    if config.get("use_rslora") is not None and not isinstance(config["use_rslora"], bool):
        refuse(f"use_rslora must be true or false, got {config['use_rslora']!r}")
    patterns = [targets] if isinstance(targets, str) and targets != ALL_LINEAR else []
    patterns += [p for f in ("rank_pattern", "alpha_pattern") for p in (config.get(f) or {})]
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            refuse(f"{pattern!r} is not a valid regular expression: {exc}")


def module_name(tensor_name: str) -> str:
    """``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` ->
    ``model.layers.0.self_attn.q_proj`` (the name PEFT matches ``target_modules`` against)."""
    name = tensor_name.rsplit(".lora_", 1)[0]
    return name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name


def pattern_entry(patterns: dict | None, name: str) -> tuple[str, Any] | None:
    """PEFT's rank/alpha pattern lookup: the first key matching the name's end, with its value."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return pattern, value
    return None


def targeted(target_modules, name: str) -> bool:
    """PEFT's ``check_target_module_exists`` for a list or a regex string."""
    if target_modules is None or target_modules == ALL_LINEAR:
        return True
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return name in target_modules or any(name.endswith(f".{t}") for t in target_modules)


def check_agreement(adapter_id: str, config: dict, ranks: dict[str, int]) -> None:
    """``ranks``: module name (see ``module_name``) -> rank in the weights."""
    target_modules = config.get("target_modules")
    for name, rank in sorted(ranks.items()):
        if not targeted(target_modules, name):
            raise AdapterLoadError(adapter_id, f"adapter_config.json target_modules {target_modules!r} does not "
                                               f"cover module {name}, which the weights hold")
        entry = pattern_entry(config.get("rank_pattern"), name)
        if entry is not None and entry[1] != rank:
            raise AdapterLoadError(adapter_id, f"{name}: adapter_config.json rank_pattern {{{entry[0]!r}: "
                                               f"{entry[1]}}} but the weights have rank {rank}")
        if entry is None and config.get("r") is not None and config["r"] != rank:
            raise AdapterLoadError(adapter_id, f"{name}: adapter_config.json says r={config['r']} but the "
                                               f"weights have rank {rank}")
