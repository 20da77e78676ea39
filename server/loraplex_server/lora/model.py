"""Find the base model's LoRA-targetable linear layers and wrap them in ``LoraLinear``."""

from __future__ import annotations

import re

import torch
from torch import nn

from .fusion import group_shared_inputs
from .layers import LoraLinear, LoraStepState
from .weights import KNOWN_TARGETS, ModuleKey, TargetShape

_LAYER_PATH = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:.*\.)?([A-Za-z0-9_]+)$")


def _targetable(model: nn.Module):
    for path, module in model.named_modules():
        match = _LAYER_PATH.search(path)
        if match and match.group(2) in KNOWN_TARGETS and isinstance(module, (nn.Linear, LoraLinear)):
            yield path, ModuleKey(int(match.group(1)), match.group(2)), module


def find_targets(model: nn.Module) -> dict[ModuleKey, TargetShape]:
    return {key: TargetShape(m.in_features, m.out_features) for _, key, m in _targetable(model)}


def model_device(model: nn.Module) -> torch.device:
    """Where the model's weights (and so its LoRA buffers) live."""
    return next(model.parameters()).device


def inject_lora_layers(model: nn.Module, max_loras: int, max_rank: int, state: LoraStepState,
                       pool_rows: int | None = None, buffers_of=None) -> dict[ModuleKey, LoraLinear]:
    """Replace every targetable ``nn.Linear`` with a ``LoraLinear`` sharing ``state``; each holds
    ``max_loras`` slots over a pool of ``pool_rows`` weight rows (default ``max_loras *
    max_rank``), or, with ``buffers_of(key)``, on flat (A, Bt) buffers it gives each module (the
    unified pool's arenas). Layers that read one input (q/k/v, gate/up) are grouped
    for a shared shrink (``fusion.py``)."""
    rows = max_loras * max_rank if pool_rows is None else pool_rows
    layers: dict[ModuleKey, LoraLinear] = {}
    for path, key, module in list(_targetable(model)):
        if isinstance(module, LoraLinear):
            raise ValueError(f"{path} is already wrapped")
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        wrapped = LoraLinear(module, key, max_loras, max_rank, state, rows,
                             buffers_of(key) if buffers_of is not None else None)
        setattr(parent, leaf, wrapped)
        layers[key] = wrapped
    if not layers:
        raise ValueError("the model has no LoRA-targetable linear layers")
    group_shared_inputs(layers)
    return layers
