"""Validated LoRA weights of one adapter, held on the host (CPU) until a device slot takes them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

# Linear layers an adapter may target, by leaf name (fused names cover Phi-3 style models).
KNOWN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                 "qkv_proj", "gate_up_proj")


@dataclass(frozen=True)
class ModuleKey:
    layer: int
    name: str  # leaf name, e.g. "q_proj"


@dataclass(frozen=True)
class TargetShape:
    in_features: int
    out_features: int


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """The adapter files' bytes that a version was read from."""

    sha256: str | None  # of the config and the weights file; None until first read in full
    size_bytes: int  # both files together
    mtime: float  # the newer file's modification time (unix)
    identity: bytes = b""  # digest of both files' stats, the config and the weights header


@dataclass
class LoraModuleWeights:
    """One module's weights in the form slots hold them: ``y += (A @ x) @ bt``."""

    a: torch.Tensor  # [r, in_features], fp32
    bt: torch.Tensor  # [r, out_features] = (scale * B)^T, fp32
    scale: float  # lora_alpha / r (or / sqrt(r) with rsLoRA), already folded into bt

    @classmethod
    def from_peft(cls, a: torch.Tensor, b: torch.Tensor, scale: float) -> LoraModuleWeights:
        """From PEFT's ``lora_A`` [r, in] and ``lora_B`` [out, r] (any float dtype)."""
        return cls(a.float().contiguous(), (b.float().T * scale).contiguous(), scale)

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class LoraAdapter:
    adapter_id: str
    source: Path
    modules: dict[ModuleKey, LoraModuleWeights]
    lora_alpha: float
    use_rslora: bool = False
    base_model_name: str | None = None
    fingerprint: Fingerprint | None = None  # of the bytes these weights were read from

    @property
    def rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    @property
    def target_modules(self) -> tuple[str, ...]:
        return tuple(sorted({k.name for k in self.modules}))


@dataclass(frozen=True, slots=True)
class AdapterMeta:
    """What is known of a registered adapter without holding its weights."""

    adapter_id: str
    source: Path
    rank: int
    target_modules: tuple[str, ...]
    size_bytes: int


@dataclass(frozen=True)
class AdapterInfo:
    meta: AdapterMeta
    state: str  # "disk" | "loading" | "cpu" | "device"
    pinned: bool
    request_count: int
    version: int = 0
    last_used: float | None = None  # unix time of the last step that ran it
    load_latency_s: float | None = None  # disk -> CPU
    owner: str | None = None
    error: str | None = None  # why its weights could not be loaded (the last error while retrying)
    load_attempts: int = 0  # reads of the current load (1 = no retry so far)
    retrying: bool = False  # a transient read error is being retried
    fingerprint: Fingerprint | None = None
