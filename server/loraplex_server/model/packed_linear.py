"""Linear layers whose weights are reordered once into oneDNN's blocked layout (CPU), where
``[model] cpu_gemm`` asks for it, in place of ``F.linear``.

- bf16: ``F.linear`` repacks the weight for the AMX / avx512_bf16 kernels on every call; packing
  once at start and calling oneDNN's linear on the packed weight (what inductor does for a frozen
  graph) skips that. Measured on a 2-core AVX-512 Xeon, 2 threads, 64 tokens: 576->1536
  145 -> 92 us, 1536->576 168 -> 125 us, the 576->49152 LM head 8.4 -> 6.0 ms; results bit-equal.
- fp32: ``F.linear`` runs MKL. On an AVX2 AMD EPYC, one thread, SmolLM2's shapes, oneDNN on the
  packed weight is 1.1-1.9x MKL on the projections and 1.3-2x on the 49k-vocab LM head from 4 to 256
  rows, but 0.6-0.9x at one row (MKL's GEMV); engine decode, SmolLM2 fp32: 4 sequences 21-23 ->
  31 tok/s, 57 sequences (the offline workload) +5-17%, one sequence 10.2-11.3 -> 9.6-9.8. On an
  AVX-512 Xeon it gained nothing at 64 rows. The two sum in different orders: outputs differ by
  ~1e-6 relative per matmul, within the PEFT oracle's tolerance (it runs on both paths).

``cpu_gemm``: ``onednn`` (the default, as vLLM's CPU build does) packs every CPU linear whose dtype
oneDNN supports here; ``torch`` keeps ``F.linear`` (bit-identical to PEFT's and transformers' own
fp32 path, and MKL's GEMV for single-sequence decode).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

CPU_GEMM_CHOICES = ("onednn", "torch")


def packing_available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """oneDNN's linear packing works here for ``dtype``: the torch build has the ops, and for bf16
    the CPU the instructions (avx512bw/vl/dq or avx_ne_convert; an AVX2-only CPU has neither)."""
    ops = getattr(torch.ops, "mkldnn", None)
    if not (torch.backends.mkldnn.is_available() and ops is not None
            and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and hasattr(ops, "_is_mkldnn_bf16_supported") and bool(
        ops._is_mkldnn_bf16_supported())


class PackedLinear(nn.Module):
    """``y = x @ W^T + b`` over a weight packed once; drop-in for an ``nn.Linear`` at inference."""

    packed_weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None),
                             persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


@dataclass(frozen=True)
class PackingReport:
    """What ``pack_linears`` did: linears packed and kept on F.linear, per dtype name."""

    packed: dict[str, int]
    kept: dict[str, int]

    def __str__(self) -> str:
        names = sorted(set(self.packed) | set(self.kept))
        return ", ".join(f"{n}: {self.packed.get(n, 0)} packed, {self.kept.get(n, 0)} on F.linear" for n in names)


def pack_linears(model: nn.Module, cpu_gemm: str = "onednn") -> PackingReport:
    """Replace the CPU ``nn.Linear`` modules of ``model`` (LoRA-wrapped bases and the LM head
    included) with ``PackedLinear``s, when ``cpu_gemm`` is onednn and oneDNN packs their dtype here."""
    if cpu_gemm not in CPU_GEMM_CHOICES:
        raise ValueError(f"cpu_gemm must be one of {CPU_GEMM_CHOICES}, got {cpu_gemm!r}")
    packed: dict[str, int] = {}
    kept: dict[str, int] = {}
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is nn.Linear and m.weight.device.type == "cpu"
               and m.weight.dtype in (torch.float32, torch.bfloat16)]
    dtypes = {m.weight.dtype for _, m in targets}
    packable = {dtype: cpu_gemm == "onednn" and packing_available(dtype) for dtype in dtypes}
    for dtype, pack in packable.items():
        if cpu_gemm == "onednn" and not pack:
            log.warning("oneDNN %s linear packing unavailable (torch build or CPU): those linears stay on F.linear",
                        dtype)
    for name, module in targets:
        pack = packable[module.weight.dtype]
        counts = packed if pack else kept
        dtype_name = str(module.weight.dtype).removeprefix("torch.")
        counts[dtype_name] = counts.get(dtype_name, 0) + 1
        if pack:
            parent_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, leaf, PackedLinear(module))
    return PackingReport(packed, kept)
