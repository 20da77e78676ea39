"""Paged attention plugged into transformers' model code through its attention-function registry.

The model is called on one packed ragged batch ``[1, num_tokens]``; each layer's attention calls
``paged_attention`` with q/k/v for all new tokens. We write the new K/V into our paged cache and
attend each sequence over its own context, read back from the cache through its block table.

For every sequence ``s`` with ``q_len`` new tokens and ``ctx_len`` tokens in the cache (new ones
included), query ``i`` (absolute position ``p = ctx_len - q_len + i``) attends keys ``j`` with
``j <= p`` (and ``j > p - window`` under a sliding window):

    for s in sequences:
        K, V = cache[slots_of(s)]                      # [ctx_len, n_kv_heads, head_dim]
        out[s] = softmax(q[s] @ K^T * scale + mask) @ V
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from .native import NativeKernels

if TYPE_CHECKING:  # it imports this module
    from .triton_attention import VarlenPagedMeta

ATTENTION_NAME = "loraplex_paged"
META_KWARG = "loraplex_attn"


def block_slots(blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """[..., num_blocks * block_size] cache slot of every position the blocks [..., num_blocks] hold."""
    offsets = torch.arange(block_size, device=blocks.device)  # [block_size]
    return (blocks.long()[..., None] * block_size + offsets).flatten(-2)


@dataclass
class PrefillSpan:
    """A sequence computing more than one token this step (a prompt or a chunk of one)."""

    q_start: int
    q_len: int
    ctx_len: int
    ctx_slots: torch.Tensor | None  # [ctx_len] cache slots; None when the context is only the new tokens


@dataclass
class PagedAttentionMetadata:
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: K, V [num_slots, n_kv_heads, head_dim]
    slot_mapping: torch.Tensor  # [num_tokens] cache slot of each new token
    prefills: list[PrefillSpan]
    decode_rows: torch.Tensor | None = None  # [num_decodes] packed index of each decode token
    decode_ctx_lens: torch.Tensor | None = None  # [num_decodes] int32
    decode_block_tables: torch.Tensor | None = None  # [num_decodes, max_blocks] int32 (padding: block 0)
    block_size: int = 1
    varlen: VarlenPagedMeta | None = None  # prebuilt for captured decode steps
    decode_kernel: NativeKernels | None = None  # reads K/V blocks in place for the decodes (CPU)
    _masks: dict = field(default_factory=dict)

    def decode_slots(self) -> torch.Tensor:
        """[num_decodes, max_ctx] cache slot of every context position (from the block tables)."""
        if "decode_slots" not in self._masks:
            assert self.decode_block_tables is not None, "no decodes in this step"
            self._masks["decode_slots"] = block_slots(self.decode_block_tables, self.block_size)
        return self._masks["decode_slots"]

    def decode_mask(self, window: int | None) -> torch.Tensor:
        """[num_decodes, 1, 1, max_ctx] True where a decode token may attend."""
        key = ("decode", window)
        if key not in self._masks:
            assert self.decode_ctx_lens is not None, "no decodes in this step"
            max_ctx = self.decode_slots().shape[1]
            j = torch.arange(max_ctx, device=self.decode_ctx_lens.device)[None, :]  # [1, max_ctx]
            lens = self.decode_ctx_lens[:, None]  # [num_decodes, 1]
            allowed = j < lens
            if window is not None:
                allowed &= j > lens - 1 - window
            self._masks[key] = allowed[:, None, None, :]
        return self._masks[key]

    def prefill_mask(self, span: PrefillSpan, window: int | None, device) -> torch.Tensor:
        """[q_len, ctx_len] True where query i may attend key j."""
        key = (span.q_start, window)
        if key not in self._masks:
            p = torch.arange(span.q_len, device=device)[:, None] + (span.ctx_len - span.q_len)  # [q_len, 1]
            j = torch.arange(span.ctx_len, device=device)[None, :]  # [1, ctx_len]
            allowed = j <= p
            if window is not None:
                allowed &= j > p - window
            self._masks[key] = allowed
        return self._masks[key]


def layer_window(module, kwargs: dict) -> int | None:
    """The layer's sliding window: Mistral/Phi-3 pass it as a kwarg, Qwen2/3 keep it on the module."""
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    return int(window) if window else None


def _attend_prefill(module, q, k_new, v_new, k_cache, v_cache, span, meta, scaling, window):
    s, e = span.q_start, span.q_start + span.q_len
    qs = q[:, s:e].unsqueeze(0)  # [1, H, q_len, D]
    if span.ctx_slots is None:
        ks = k_new[s:e].transpose(0, 1).unsqueeze(0)  # [1, H_kv, q_len, D]
        vs = v_new[s:e].transpose(0, 1).unsqueeze(0)
    else:
        ks = k_cache[span.ctx_slots].transpose(0, 1).unsqueeze(0)  # [1, H_kv, ctx_len, D]
        vs = v_cache[span.ctx_slots].transpose(0, 1).unsqueeze(0)
    if span.ctx_slots is None and window is None:
        out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scaling, enable_gqa=True)
    else:
        mask = meta.prefill_mask(span, window, q.device)
        out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scaling, enable_gqa=True)
    return out[0].transpose(0, 1)  # [q_len, H, D]


def _attend_decodes(q, k_cache, v_cache, meta, scaling, window):
    qd = q[:, meta.decode_rows].transpose(0, 1).unsqueeze(2)  # [num_decodes, H, 1, D]
    ctx_slots = meta.decode_slots()  # [num_decodes, max_ctx]
    kd = k_cache[ctx_slots].transpose(1, 2)  # [num_decodes, H_kv, max_ctx, D]
    vd = v_cache[ctx_slots].transpose(1, 2)
    mask = meta.decode_mask(window)
    out = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scaling, enable_gqa=True)
    return out[:, :, 0]  # [num_decodes, H, D]


def _native_decodes(kernel: NativeKernels, q, k_cache, v_cache, meta, scaling, out, window) -> bool:
    """Decode rows straight from the cache blocks into ``out`` [T, H, D], when the kernel serves
    this step (block tables given, one supported dtype); False leaves them to the torch path."""
    if meta.decode_block_tables is None or not (q.dtype == k_cache.dtype and kernel.supports(q.dtype)):
        return False
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    kernel.paged_decode(q.transpose(0, 1), k_cache, v_cache, out, meta.decode_rows, meta.decode_ctx_lens,
                        meta.decode_block_tables, meta.block_size, scale, window)
    return True


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: q [1, H, T, D], k/v [1, H_kv, T, D] -> ([1, T, H, D], None)."""
    meta: PagedAttentionMetadata = kwargs[META_KWARG]
    k_cache, v_cache = meta.kv_caches[module.layer_idx]
    q = query[0]  # [H, T, D]
    k_new = key[0].transpose(0, 1)  # [T, H_kv, D]
    v_new = value[0].transpose(0, 1)
    k_cache[meta.slot_mapping] = k_new.to(k_cache.dtype)
    v_cache[meta.slot_mapping] = v_new.to(v_cache.dtype)
    window = layer_window(module, kwargs)
    out = query.new_empty(q.shape[1], q.shape[0], q.shape[2])  # [T, H, D]
    for span in meta.prefills:
        out[span.q_start:span.q_start + span.q_len] = _attend_prefill(
            module, q, k_new, v_new, k_cache, v_cache, span, meta, scaling, window)
    if meta.decode_rows is not None and not (
            meta.decode_kernel is not None
            and _native_decodes(meta.decode_kernel, q, k_cache, v_cache, meta, scaling, out, window)):
        out[meta.decode_rows] = _attend_decodes(q, k_cache, v_cache, meta, scaling, window)
    return out.unsqueeze(0), None


def attention_name(attention: Callable) -> str:
    """The registry name of an attention function: its module and qualified name (two closures
    made by one ``def`` share a name; the last one registered serves both)."""
    return f"{ATTENTION_NAME}:{attention.__module__}.{attention.__qualname__}"


def register_paged_attention(model, attention: Callable = paged_attention) -> str:
    """Register ``attention`` (``paged_attention``'s signature; the engine picks it per device) and
    select it on ``model``; returns the name it is registered under.

    transformers' ``AttentionInterface.register`` writes a process-global table (a class-level
    dict), while the selection is per model (its config's attn_implementation). Each function is
    registered under its own name, so two engines in one process that use different functions
    (the torch one on CPU, the Triton one on CUDA) never overwrite each other's entry.
    """
    name = attention_name(attention)
    AttentionInterface.register(name, attention)
    model.set_attn_implementation(name)
    return name
