"""Fused native elementwise ops in place of transformers' RMSNorm, rotary and gated-SiLU code on CPU.

transformers' ``LlamaRMSNorm`` runs 8 torch kernels per call (casts, pow, mean, add, rsqrt, two
muls), ``apply_rotary_pos_emb`` ~10 for q and k, and the gated MLP two (``act_fn(gate) * up``);
on a CPU decode step of a small model those launches cost more than the maths.
``install_fused_ops`` gives each matching module instance a forward through the native kernels
(model/csrc/elementwise.cpp), which keep the modules' roundings, and computes q/k/v and gate/up
by one merged matmul each (merged_linear.py; the LoRA deltas land in the members' columns). A
module matches only when its class's forward is, bytecode for bytecode, Llama's (norms and MLPs:
Mistral, Qwen2/3, Phi-3 and others copy them; attention: Llama's own), and for the MLP when its
activation is SiLU: anything else (Gemma's ``1 + weight`` norm, GELU MLPs, sliding-window
attention code) keeps its forward.
"""

from __future__ import annotations

import inspect
import types

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from transformers.activations import SiLUActivation
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm, eager_attention_forward

from .merged_linear import MergedMember, merge_projections
from .native import NativeKernels

QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")


def _traced(t: torch.Tensor) -> bool:
    """A fake tensor (FakeTensorMode, tracing): it has no data for a native kernel to read."""
    return isinstance(t, FakeTensor)


def _same_code(fn_a, fn_b) -> bool:
    a, b = inspect.unwrap(fn_a).__code__, inspect.unwrap(fn_b).__code__
    return (a.co_code, a.co_consts, a.co_names) == (b.co_code, b.co_consts, b.co_names)


def _llama_rms_norm_weight(module: nn.Module) -> torch.Tensor | None:
    """The weight of a module that is Llama's RMSNorm (by its forward's code), else None."""
    weight = getattr(module, "weight", None)
    if (_same_code(type(module).forward, LlamaRMSNorm.forward) and hasattr(module, "variance_epsilon")
            and isinstance(weight, torch.Tensor)):
        return weight
    return None


def _is_silu(act) -> bool:
    return isinstance(act, (nn.SiLU, SiLUActivation)) and "forward" not in vars(act)


def _is_gated_silu_mlp(module: nn.Module) -> bool:
    return _same_code(type(module).forward, LlamaMLP.forward) and _is_silu(getattr(module, "act_fn", None))


def _is_llama_attention(module: nn.Module) -> bool:
    return _same_code(type(module).forward, LlamaAttention.forward) and hasattr(module, "head_dim")


def _project(module: nn.Module, x: torch.Tensor, names: tuple[str, ...]) -> list[torch.Tensor]:
    """Each projection ``names`` of ``module`` applied to ``x`` [1, T, in] as [T, out_p]: one
    matmul and column views when ``install_fused_ops`` merged them (merged_linear.py), else one
    call per projection."""
    name = _merged_name(names)
    merged: tuple[MergedMember, ...] | None = vars(module).get(f"_{name}_members")
    tokens = x.shape[1]
    if merged is None:
        return [getattr(module, member)(x).view(tokens, -1) for member in names]
    y = getattr(module, name)(x).view(tokens, -1)  # [T, sum of out_p]
    for member in merged:
        member.add_delta(y, x)
    return [y[:, m.lo:m.hi] for m in merged]


def _merged_name(names: tuple[str, ...]) -> str:
    """The merged linear's attribute name (``merged_q_k_v``); its members sit beside it."""
    return "merged_" + "_".join(n.removesuffix("_proj") for n in names)


def _merge(module: nn.Module, names: tuple[str, ...]) -> None:
    name = _merged_name(names)
    merged = merge_projections(module, names, name)
    if merged is not None:
        vars(module)[f"_{name}_members"] = merged  # a plain attribute: not a submodule


def _attention_forward(kernels: NativeKernels):
    """Llama's attention forward with the rotary embedding applied in place by one native call per
    projection (transformers' ``apply_rotary_pos_emb`` is ~10 torch kernels for q and k)."""
    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, **kwargs):
        cos, sin = position_embeddings if position_embeddings is not None else (None, None)
        if (hidden_states.dim() != 3 or hidden_states.shape[0] != 1 or kwargs.get("cache") is not None
                or kwargs.get("past_key_values") is not None or cos is None or sin is None
                or not kernels.supports(hidden_states.dtype) or cos.dtype != hidden_states.dtype
                or _traced(hidden_states)):
            return type(self).forward(self, hidden_states, position_embeddings, attention_mask, **kwargs)
        tokens = hidden_states.shape[1]
        q, k, v = _project(self, hidden_states, QKV)  # [T, H * D] each (column views when merged)
        q, k = q.view(tokens, -1, self.head_dim), k.view(tokens, -1, self.head_dim)  # [T, H, D]
        v = v.view(1, tokens, -1, self.head_dim).transpose(1, 2)
        kernels.rope_(q, cos[0], sin[0])
        kernels.rope_(k, cos[0], sin[0])
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attend(self, q.unsqueeze(0).transpose(1, 2), k.unsqueeze(0).transpose(1, 2), v, attention_mask,
                              dropout=0.0, scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(1, tokens, -1).contiguous()), weights
    return forward


def install_fused_ops(model: nn.Module, kernels: NativeKernels) -> int:
    """Route every matching RMSNorm, gated-SiLU MLP and Llama attention of ``model`` through
    ``kernels`` (norms whose weights are in a dtype the kernels lack keep their forward; MLPs check
    the activations' dtype per call), merging each MLP's gate/up and each attention's q/k/v into
    one linear where they are plain linears of one input (merged_linear.py); returns how many
    modules. Call before ``pack_linears``, so the merged linears are the ones packed."""
    installed = 0
    for module in list(model.modules()):  # merging adds modules
        norm_weight = _llama_rms_norm_weight(module)
        if norm_weight is not None and kernels.supports(norm_weight.dtype):
            module.forward = types.MethodType(_rms_norm_forward(kernels), module)
            installed += 1
        elif _is_gated_silu_mlp(module):
            _merge(module, GATE_UP)
            module.forward = types.MethodType(_gated_mlp_forward(kernels), module)
            installed += 1
        elif _is_llama_attention(module):
            _merge(module, QKV)
            module.forward = types.MethodType(_attention_forward(kernels), module)
            installed += 1
    return installed


def _rms_norm_forward(kernels: NativeKernels):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.dtype != self.weight.dtype or _traced(hidden_states):  # the module's own maths
            return type(self).forward(self, hidden_states)
        return kernels.rms_norm(hidden_states, self.weight, self.variance_epsilon)
    return forward


def _gated_mlp_forward(kernels: NativeKernels):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3 and x.shape[0] == 1:
            gate, up = (t.view(x.shape[:-1] + (-1,)) for t in _project(self, x, GATE_UP))
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        if gate.dtype != up.dtype or not kernels.supports(gate.dtype) or _traced(gate):  # the module's own maths
            return self.down_proj(self.act_fn(gate) * up)
        return self.down_proj(kernels.silu_mul(gate, up))
    return forward
