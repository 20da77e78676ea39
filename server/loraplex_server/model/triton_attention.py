"""Paged attention as one Triton kernel launch per layer: decodes and prefill chunks together.

Same inputs and result as ``attention.paged_attention`` (no per-sequence Python loop). For every
sequence ``s`` (``q_len`` new tokens at packed rows ``q_start..``, ``ctx_len`` tokens in the
cache with the new ones included), every query head ``h`` and its KV head ``g = h // GROUP``:

    for i in range(q_len):
        p = ctx_len - q_len + i                              # absolute position of query i
        keys = [j for j in range(ctx_len) if j <= p and (window is None or j > p - window)]
        slot(j) = block_tables[s, j // block_size] * block_size + j % block_size
        w = softmax([scale * q[q_start + i, h] . K[slot(j), g] for j in keys])
        out[q_start + i, h] = sum(w[j] * V[slot(j), g] for j in keys)

One program handles a block of queries of one sequence for all query heads of one KV head (the
GQA group rides in the rows of the tile, so K/V are read once per group), with an online softmax
in fp32. A block table of block size 1 is a per-token slot table, which is what the current
``PagedAttentionMetadata`` carries; ``VarlenPagedMeta.from_paged`` builds either form.
"""

from dataclasses import dataclass
from typing import Any

import torch

from ..triton_common import cdiv, dot, dot_options, jit, next_pow2, tl, tl_max, tl_sum, triton_available
from .attention import META_KWARG, PagedAttentionMetadata, layer_window, paged_attention

_VARLEN_KEY = "triton_varlen"


@jit()
def _attend_block(acc, m_i, l_i, q, k_ptr, v_ptr, slots, j_ok, allowed, d, d_ok, sk_slot, sv_slot, scale_log2,
                  PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One key block of the online softmax: returns the updated (acc, m_i, l_i)."""
    kt = tl.load(k_ptr + slots[None, :] * sk_slot + d[:, None],
                 mask=j_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
    s = dot(q, kt.to(q.dtype), PRECISION, UPCAST) * scale_log2  # [BLOCK_M, BLOCK_N], log2 units
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl_max(s, 1))  # finite: m_i starts at -1e30
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    v = tl.load(v_ptr + slots[:, None] * sv_slot + d[None, :],
                mask=j_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, PRECISION, UPCAST)
    return acc, m_new, l_i * alpha + tl_sum(p, 1)


@jit()
def _paged_attention_kernel(q_ptr, k_ptr, v_ptr, out_ptr, q_starts_ptr, q_lens_ptr, ctx_lens_ptr, tables_ptr,
                            scale_log2, window, block_size, head_dim,
                            sq_t, sq_h, sk_slot, sk_h, sv_slot, sv_h, so_t, so_h, st_seq,
                            GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_WINDOW: tl.constexpr,
                            PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Grid (sequences, query blocks, KV heads); computes the module docstring's loop for
    queries ``qb * BLOCK_Q ..`` of one sequence and the GROUP query heads of one KV head."""
    seq, qb, kvh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_len = tl.load(q_lens_ptr + seq)
    if qb * BLOCK_Q >= q_len:
        return
    ctx_len = tl.load(ctx_lens_ptr + seq)
    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)
    qi = qb * BLOCK_Q + rows // GROUP_PAD  # [BLOCK_M] query index within the sequence
    head = kvh * GROUP + rows % GROUP_PAD
    row_ok = (qi < q_len) & (rows % GROUP_PAD < GROUP)
    tok = (tl.load(q_starts_ptr + seq) + qi).to(tl.int64)  # [BLOCK_M] packed row
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q = tl.load(q_ptr + tok[:, None] * sq_t + head[:, None] * sq_h + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    pos = ctx_len - q_len + qi  # [BLOCK_M] absolute positions
    hi = tl.minimum(ctx_len, ctx_len - q_len + (qb + 1) * BLOCK_Q)  # keys past the last query: none
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(ctx_len - q_len + qb * BLOCK_Q - window + 1, 0) // BLOCK_N * BLOCK_N
    m_i = tl.full((BLOCK_Q * GROUP_PAD,), -1e30, dtype=tl.float32)
    l_i = tl.full((BLOCK_Q * GROUP_PAD,), 0.0, tl.float32)
    acc = tl.full((BLOCK_Q * GROUP_PAD, BLOCK_D), 0.0, tl.float32)
    k_head, v_head = k_ptr + kvh * sk_h, v_ptr + kvh * sv_h
    for start in range(lo, hi, BLOCK_N):
        js = start + tl.arange(0, BLOCK_N)
        j_ok = js < hi
        block = tl.load(tables_ptr + seq * st_seq + js // block_size, mask=j_ok, other=0).to(tl.int64)
        slots = block * block_size + js % block_size  # [BLOCK_N] cache rows
        allowed = (js[None, :] <= pos[:, None]) & j_ok[None, :]
        if HAS_WINDOW:
            allowed = allowed & (js[None, :] > pos[:, None] - window)
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_head, v_head, slots, j_ok, allowed, d, d_ok,
                                      sk_slot, sv_slot, scale_log2, PRECISION, UPCAST)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + tok[:, None] * so_t + head[:, None] * so_h + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@dataclass(frozen=True)
class VarlenPagedMeta:
    """Per-sequence attention metadata for one step (built once, shared by every layer)."""

    q_starts: torch.Tensor  # [num_seqs] int32 packed row of each sequence's first new token
    q_lens: torch.Tensor  # [num_seqs] int32 new tokens
    ctx_lens: torch.Tensor  # [num_seqs] int32 tokens in the cache after this step's write
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32 cache block of each position block
    block_size: int
    max_q_len: int

    @classmethod
    def from_paged(cls, meta: PagedAttentionMetadata, block_size: int | None = None) -> "VarlenPagedMeta":
        """From the torch path's metadata; without ``block_size`` the table is per token (size 1)."""
        bs = block_size or 1
        device = meta.slot_mapping.device
        tables, q_starts, q_lens, ctx_lens = [], [], [], []
        for span in meta.prefills:
            slots = span.ctx_slots
            if slots is None:  # a fresh prompt: its context is the slots written this step
                slots = meta.slot_mapping[span.q_start:span.q_start + span.q_len]
            tables.append(slots[::bs] // bs)
            q_starts.append(span.q_start)
            q_lens.append(span.q_len)
            ctx_lens.append(span.ctx_len)
        ints: dict[str, Any] = dict(dtype=torch.int32, device=device)
        parts = [torch.tensor(q_starts, **ints), torch.tensor(q_lens, **ints), torch.tensor(ctx_lens, **ints)]
        widths = [len(t) for t in tables]
        if meta.decode_rows is not None:
            decode_tables = meta.decode_slots()[:, ::bs] // bs  # [num_decodes, width]
            widths.append(decode_tables.shape[1])
            parts[0] = torch.cat([parts[0], meta.decode_rows.to(torch.int32)])
            parts[1] = torch.cat([parts[1], torch.ones_like(meta.decode_rows, dtype=torch.int32)])
            assert meta.decode_ctx_lens is not None  # set with decode_rows
            parts[2] = torch.cat([parts[2], meta.decode_ctx_lens.to(torch.int32)])
        table = torch.zeros(parts[0].shape[0], max(widths, default=1), **ints)
        for i, t in enumerate(tables):
            table[i, :len(t)] = t
        if meta.decode_rows is not None:
            table[len(tables):, :decode_tables.shape[1]] = decode_tables
        return cls(parts[0], parts[1], parts[2], table, bs, max(q_lens, default=1))


def _launch_options(kernel, dtype: torch.dtype, group: int, max_q_len: int, head_dim: int) -> dict:
    """Tile sizes: the GQA group (padded to a power of two) times a block of queries fills >= 16 rows."""
    group_pad = next_pow2(group)
    block_q = max(1, (16 if max_q_len == 1 else 64) // group_pad)
    return dict(GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_N=64 if head_dim <= 128 else 32,
                BLOCK_D=max(16, next_pow2(head_dim)), **dot_options(kernel, dtype))


def paged_attention_varlen(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: VarlenPagedMeta,
                           scaling: float, window: int | None = None) -> torch.Tensor:
    """out [T, H, D] for q [T, H, D] against K/V caches [num_slots, H_kv, D] (already written)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    if num_heads % num_kv_heads or q.stride(2) != 1 or k_cache.stride(2) != 1 or v_cache.stride(2) != 1:
        raise ValueError("need H % H_kv == 0 and contiguous head dims")
    q = q if q.dtype == k_cache.dtype else q.to(k_cache.dtype)
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)  # [T, H, D]
    num_seqs = meta.q_lens.shape[0]
    if num_seqs == 0 or num_tokens == 0:
        return out
    opts = _launch_options(_paged_attention_kernel, q.dtype, num_heads // num_kv_heads, meta.max_q_len, head_dim)
    grid = (num_seqs, cdiv(meta.max_q_len, opts["BLOCK_Q"]), num_kv_heads)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, meta.q_starts, meta.q_lens, meta.ctx_lens, meta.block_tables,
        scaling * 1.4426950408889634, window or 0, meta.block_size, head_dim,  # scale * log2(e): exp2 softmax
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        out.stride(0), out.stride(1), meta.block_tables.stride(0), HAS_WINDOW=bool(window), **opts)
    return out


def varlen_meta(meta: PagedAttentionMetadata) -> VarlenPagedMeta:
    """The step's ``VarlenPagedMeta``, derived from the step metadata once and shared by every layer."""
    if meta.varlen is not None:
        return meta.varlen
    built = meta._masks.get(_VARLEN_KEY)
    if built is None:
        built = meta._masks[_VARLEN_KEY] = VarlenPagedMeta.from_paged(meta)
    return built


def triton_paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function, drop-in for ``paged_attention``: q [1, H, T, D], k/v
    [1, H_kv, T, D] -> ([1, T, H, D], None); writes the new K/V into the cache first."""
    meta: PagedAttentionMetadata = kwargs[META_KWARG]
    k_cache, v_cache = meta.kv_caches[module.layer_idx]
    k_cache[meta.slot_mapping] = key[0].transpose(0, 1).to(k_cache.dtype)  # [T, H_kv, D]
    v_cache[meta.slot_mapping] = value[0].transpose(0, 1).to(v_cache.dtype)
    q = query[0].transpose(0, 1)  # [T, H, D], a view
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    out = paged_attention_varlen(q, k_cache, v_cache, varlen_meta(meta), scale, layer_window(module, kwargs))
    return out.to(query.dtype).unsqueeze(0), None


def select_attention_function(device: torch.device | str):
    """``triton_paged_attention`` for a CUDA device when triton imports, else the torch one."""
    if torch.device(device).type == "cuda" and triton_available():
        return triton_paged_attention
    return paged_attention
