"""The Triton paged attention against torch SDPA run per sequence on the unpaged K/V."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import DTYPES, grid, product
from torch.nn.utils.rnn import pad_sequence

from loraplex_server.model import triton_attention
from loraplex_server.model.attention import META_KWARG, PagedAttentionMetadata, PrefillSpan, paged_attention

# (heads, kv heads, head dim): MHA, GQA 2 / 3 (padded group) / 4, MQA; head dims 64 / 128 and a
# non power of two (48 pads to 64).
HEADS = [(4, 4, 64), (4, 2, 32), (6, 2, 48), (32, 8, 128), (8, 1, 64), (4, 2, 64)]
# (new tokens, context after this step) per sequence: decodes, fresh prompts, prefill chunks.
MIXES = {
    "decode": [(1, 37), (1, 2), (1, 100), (1, 16)],
    "prefill": [(7, 7), (33, 33), (1, 1)],
    "mixed": [(1, 37), (7, 7), (5, 20), (1, 1), (1, 70), (12, 40)],
    "long": [(1, 300), (80, 200), (1, 130), (70, 70)],  # several key and query blocks per program
}
ATTN_TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
FULL = product(HEADS, (1, 16), (None, 24), DTYPES, MIXES)
CPU = [
    ((4, 2, 32), 16, None, "fp32", "mixed"), ((6, 2, 48), 8, 5, "bf16", "mixed"),
    ((4, 4, 64), 1, None, "fp16", "decode"), ((8, 1, 64), 16, None, "fp32", "prefill"),
    ((4, 2, 32), 32, 24, "fp16", "mixed"), ((32, 8, 128), 16, None, "bf16", "decode"),
    ((4, 2, 64), 16, 24, "bf16", "long"), ((4, 1, 32), 8, None, "fp32", "long"),
]


def make_step(seqs, heads, block_size, dtype, device, seed=0):
    """Random q/k/v for the new tokens, a cache holding random older context in shuffled blocks,
    and the torch path's metadata built the way the runner builds it."""
    num_heads, num_kv, dim = heads
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-ctx // block_size) for _, ctx in seqs) + 2
    free = torch.randperm(num_blocks, generator=gen).tolist()
    caches = [torch.randn(num_blocks * block_size, num_kv, dim, generator=gen).to(device, dtype) for _ in range(2)]
    total = sum(q for q, _ in seqs)
    q, k, v = (torch.randn(1, h, total, dim, generator=gen).to(device, dtype) for h in (num_heads, num_kv, num_kv))
    new_slots, prefills, decodes, ctx_slots = [], [], [], []
    offset = 0
    for q_len, ctx in seqs:
        blocks = torch.tensor([free.pop() for _ in range(-(-ctx // block_size))])
        slots = (blocks[:, None] * block_size + torch.arange(block_size)).flatten()[:ctx].to(device)
        new_slots.append(slots[ctx - q_len:])
        ctx_slots.append(slots)
        if q_len == 1 and ctx > 1:
            decodes.append((offset, slots, ctx))
        else:
            prefills.append(PrefillSpan(offset, q_len, ctx, slots if ctx > q_len else None))
        offset += q_len
    long = dict(dtype=torch.long, device=device)
    meta = PagedAttentionMetadata(
        kv_caches=[tuple(caches)], slot_mapping=torch.cat(new_slots), prefills=prefills,
        decode_rows=torch.tensor([d[0] for d in decodes], **long) if decodes else None,
        decode_ctx_slots=pad_sequence([d[1] for d in decodes], batch_first=True) if decodes else None,
        decode_ctx_lens=torch.tensor([d[2] for d in decodes], **long) if decodes else None)
    return q, k, v, meta, ctx_slots


def sdpa_reference(q, k, v, meta, seqs, ctx_slots, scale, window):
    """Per sequence: unpaged K/V (cache + new tokens), explicit causal/window mask, SDPA in fp32."""
    k_cache, v_cache = (c.float().clone() for c in meta.kv_caches[0])
    k_cache[meta.slot_mapping] = k[0].transpose(0, 1).float()
    v_cache[meta.slot_mapping] = v[0].transpose(0, 1).float()
    outs, offset = [], 0
    for (q_len, ctx), slots in zip(seqs, ctx_slots):
        qs = q[0, :, offset:offset + q_len].float()[None]  # [1, H, q_len, D]
        ks, vs = (c[slots].transpose(0, 1)[None] for c in (k_cache, v_cache))  # [1, H_kv, ctx, D]
        p = torch.arange(q_len, device=q.device)[:, None] + ctx - q_len
        j = torch.arange(ctx, device=q.device)[None, :]
        mask = (j <= p) & (j > p - window) if window else j <= p
        out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True)
        outs.append(out[0].transpose(0, 1))  # [q_len, H, D]
        offset += q_len
    return torch.cat(outs)  # [T, H, D]


@pytest.mark.parametrize("heads,block_size,window,dtype,mix", grid(FULL, CPU))
def test_matches_per_sequence_sdpa(heads, block_size, window, dtype, mix, device):
    dtype, seqs = DTYPES[dtype], MIXES[mix]
    q, k, v, meta, ctx_slots = make_step(seqs, heads, block_size, dtype, device)
    scale = heads[2] ** -0.5
    ref = sdpa_reference(q, k, v, meta, seqs, ctx_slots, scale, window)
    layer = SimpleNamespace(layer_idx=0, sliding_window=window)
    out, _ = triton_attention.triton_paged_attention(layer, q, k, v, None, scaling=scale, **{META_KWARG: meta})
    atol, rtol = ATTN_TOL[dtype]
    assert out.shape == (1, q.shape[2], heads[0], heads[2]) and out.dtype == dtype
    torch.testing.assert_close(out[0].float(), ref, atol=atol, rtol=rtol)
    # The same step through real block tables (what the runner can build) gives the same result.
    varlen = triton_attention.VarlenPagedMeta.from_paged(meta, block_size)
    k_cache, v_cache = meta.kv_caches[0]
    blocked = triton_attention.paged_attention_varlen(q[0].transpose(0, 1), k_cache, v_cache, varlen, scale, window)
    torch.testing.assert_close(blocked.float(), ref, atol=atol, rtol=rtol)


def test_agrees_with_the_torch_paged_attention(device):
    """Drop-in: same metadata, same caches afterwards, same output as ``attention.paged_attention``."""
    seqs = MIXES["mixed"]
    q, k, v, meta, _ = make_step(seqs, (6, 2, 48), 16, torch.float32, device)
    q2, k2, v2, meta2, _ = make_step(seqs, (6, 2, 48), 16, torch.float32, device)
    layer = SimpleNamespace(layer_idx=0, sliding_window=None)
    ours, _ = triton_attention.triton_paged_attention(layer, q, k, v, None, scaling=0.2, **{META_KWARG: meta})
    torch_out, _ = paged_attention(layer, q2, k2, v2, None, scaling=0.2, **{META_KWARG: meta2})
    torch.testing.assert_close(ours, torch_out, atol=2e-5, rtol=2e-5)
    for mine, theirs in zip(meta.kv_caches[0], meta2.kv_caches[0]):
        assert torch.equal(mine, theirs)


def test_varlen_meta_is_built_once_per_step(device):
    q, k, v, meta, _ = make_step(MIXES["mixed"], (4, 2, 32), 8, torch.float32, device)
    first = triton_attention.varlen_meta(meta)
    assert triton_attention.varlen_meta(meta) is first
    assert first.max_q_len == 12 and first.block_size == 1
    assert first.q_lens.tolist() == [7, 5, 1, 12, 1, 1] and first.ctx_lens.tolist() == [7, 20, 1, 40, 37, 70]
