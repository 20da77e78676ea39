"""The LoRA side of the engine in one object: registry (disk/CPU tier), device slots, step mapping."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..config import LoraConfig
from .layers import LoraStepState
from .mapping import LoraMapping
from .model import find_targets, inject_lora_layers
from .registry import AdapterRegistry
from .slots import SlotManager
from .weights import LoraAdapter


class LoraManager:
    def __init__(self, model: nn.Module, config: LoraConfig):
        self.config = config
        self.state = LoraStepState()
        self.targets = find_targets(model)
        self.layers = inject_lora_layers(model, config.max_loras, config.max_lora_rank, self.state)
        self.registry = AdapterRegistry(self.targets, config.max_lora_rank, config.max_cpu_loras,
                                        config.adapter_root)
        self.slots = SlotManager(self.layers, config.max_loras)

    def add_adapter(self, adapter_id: str, source: str | Path) -> LoraAdapter:
        """Validate and register (thread-safe; reads weights on the caller's thread)."""
        return self.registry.add(adapter_id, source)

    def has_adapter(self, adapter_id: str) -> bool:
        return adapter_id in self.registry

    def remove_adapter(self, adapter_id: str) -> None:
        self.registry.remove(adapter_id)

    def release_slot(self, adapter_id: str) -> None:
        """Free an adapter's device slot (only when no running request uses it)."""
        self.slots.evict(adapter_id)

    def activate(self, adapter_ids: set[str], protected: set[str]) -> dict[str, int]:
        """Make the step's adapters resident in device slots; returns adapter id -> slot."""
        return self.slots.activate(adapter_ids, self.registry.get, protected)

    def set_mapping(self, mapping: LoraMapping | None) -> None:
        self.state.mapping = mapping
