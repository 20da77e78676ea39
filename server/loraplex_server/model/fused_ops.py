"""Fused native elementwise ops in place of transformers' RMSNorm and gated-SiLU MLP code on CPU.

transformers' ``LlamaRMSNorm`` runs 8 torch kernels per call (casts, pow, mean, add, rsqrt, two
muls) and the gated MLP two (``act_fn(gate) * up``); on a CPU decode step of a small model those
launches cost more than the maths. ``install_fused_ops`` gives each matching module instance a
forward through the native kernels (model/csrc/elementwise.cpp), which keep the modules'
roundings. A module matches only when its class's forward is, bytecode for bytecode, Llama's
(Mistral, Qwen2/3, Phi-3 and others copy it), and for the MLP when its activation is SiLU:
anything else (Gemma's ``1 + weight`` norm, GELU MLPs) keeps its own forward.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from transformers.activations import SiLUActivation
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from .native import NativeKernels


def _same_code(fn_a, fn_b) -> bool:
    a, b = fn_a.__code__, fn_b.__code__
    return (a.co_code, a.co_consts, a.co_names) == (b.co_code, b.co_consts, b.co_names)


def _is_llama_rms_norm(module: nn.Module) -> bool:
    return (_same_code(type(module).forward, LlamaRMSNorm.forward) and hasattr(module, "variance_epsilon")
            and isinstance(getattr(module, "weight", None), torch.Tensor))


def _is_silu(act) -> bool:
    return isinstance(act, (nn.SiLU, SiLUActivation)) and "forward" not in vars(act)


def _is_gated_silu_mlp(module: nn.Module) -> bool:
    return _same_code(type(module).forward, LlamaMLP.forward) and _is_silu(getattr(module, "act_fn", None))


def install_fused_ops(model: nn.Module, kernels: NativeKernels) -> int:
    """Route every matching RMSNorm and gated-SiLU MLP of ``model`` through ``kernels`` (norms
    whose weights are in a dtype the kernels lack keep their forward; MLPs check the activations'
    dtype per call); returns how many."""
    installed = 0
    for module in model.modules():
        if _is_llama_rms_norm(module) and kernels.supports(module.weight.dtype):
            module.forward = types.MethodType(_rms_norm_forward(kernels), module)
            installed += 1
        elif _is_gated_silu_mlp(module):
            module.forward = types.MethodType(_gated_mlp_forward(kernels), module)
            installed += 1
    return installed


def _rms_norm_forward(kernels: NativeKernels):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.dtype != self.weight.dtype:  # mixed dtypes: the module's own promotion rules
            return type(self).forward(self, hidden_states)
        return kernels.rms_norm(hidden_states, self.weight, self.variance_epsilon)
    return forward


def _gated_mlp_forward(kernels: NativeKernels):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if gate.dtype != up.dtype or not kernels.supports(gate.dtype):  # fp16: the module's own maths
            return self.down_proj(self.act_fn(gate) * up)
        return self.down_proj(kernels.silu_mul(gate, up))
    return forward
