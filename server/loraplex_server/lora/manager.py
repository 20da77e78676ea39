"""The LoRA side of the engine in one object: registry (disk/CPU tier), device slots, step mapping."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..config import LoraConfig
from ..errors import AdapterPinError
from .layers import LoraStepState
from .mapping import LoraMapping
from .model import find_targets, inject_lora_layers
from .registry import AdapterRegistry
from .slots import SlotManager
from .weights import AdapterInfo, LoraAdapter


class LoraManager:
    def __init__(self, model: nn.Module, config: LoraConfig):
        self.config = config
        self.state = LoraStepState()
        self.targets = find_targets(model)
        self.layers = inject_lora_layers(model, config.max_loras, config.max_lora_rank, self.state)
        self.registry = AdapterRegistry(self.targets, config.max_lora_rank, config.max_cpu_loras,
                                        config.adapter_root)
        self.slots = SlotManager(self.layers, config.max_loras)
        self.request_counts: dict[str, int] = {}

    def add_adapter(self, adapter_id: str, source: str | Path) -> LoraAdapter:
        """Validate and register (thread-safe; reads weights on the caller's thread)."""
        return self.registry.add(adapter_id, source)

    def has_adapter(self, adapter_id: str) -> bool:
        return adapter_id in self.registry

    def remove_adapter(self, adapter_id: str) -> None:
        self.registry.remove(adapter_id)
        self.slots.pinned.discard(adapter_id)
        self.request_counts.pop(adapter_id, None)

    def count_request(self, adapter_id: str) -> None:
        self.request_counts[adapter_id] = self.request_counts.get(adapter_id, 0) + 1

    def pin(self, adapter_id: str, protected: set[str]) -> None:
        """Keep an adapter in a device slot for good; at least one slot always stays unpinned.

        Engine thread only.
        """
        self.registry.meta(adapter_id)  # NOT_FOUND if unknown
        if adapter_id not in self.slots.pinned and len(self.slots.pinned) + 1 >= self.config.max_loras:
            raise AdapterPinError(f"cannot pin {adapter_id!r}: {len(self.slots.pinned)} of {self.config.max_loras} "
                                  "device slots are pinned and one must stay free")
        self.slots.activate({adapter_id}, self.registry.get, protected)
        self.slots.pinned.add(adapter_id)

    def info(self) -> list[AdapterInfo]:
        """Every registered adapter with its tier (engine thread, or a consistent snapshot)."""
        out = []
        for adapter_id in self.registry.adapter_ids:
            if self.slots.slot_of(adapter_id) is not None:
                state = "device"
            elif self.registry.in_cpu_cache(adapter_id):
                state = "cpu"
            else:
                state = "disk"
            out.append(AdapterInfo(self.registry.meta(adapter_id), state, adapter_id in self.slots.pinned,
                                   self.request_counts.get(adapter_id, 0)))
        return out

    def release_slot(self, adapter_id: str) -> None:
        """Free an adapter's device slot (only when no running request uses it)."""
        self.slots.evict(adapter_id)

    def activate(self, adapter_ids: set[str], protected: set[str]) -> dict[str, int]:
        """Make the step's adapters resident in device slots; returns adapter id -> slot."""
        return self.slots.activate(adapter_ids, self.registry.get, protected)

    def set_mapping(self, mapping: LoraMapping | None) -> None:
        self.state.mapping = mapping
