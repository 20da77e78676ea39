"""Shared attention test cases: random paged steps and the per-sequence SDPA reference."""

import torch
import torch.nn.functional as F

from loraplex_server.model.attention import PagedAttentionMetadata, PrefillSpan

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
            decodes.append((offset, blocks.tolist(), ctx))
        else:
            prefills.append(PrefillSpan(offset, q_len, ctx, slots if ctx > q_len else None))
        offset += q_len
    long, int32 = dict(dtype=torch.long, device=device), dict(dtype=torch.int32, device=device)
    width = max((len(d[1]) for d in decodes), default=0)
    meta = PagedAttentionMetadata(
        kv_caches=[tuple(caches)], slot_mapping=torch.cat(new_slots), prefills=prefills,
        decode_rows=torch.tensor([d[0] for d in decodes], **long) if decodes else None,
        decode_block_tables=torch.tensor([d[1] + [0] * (width - len(d[1])) for d in decodes], **int32)
        if decodes else None,
        decode_ctx_lens=torch.tensor([d[2] for d in decodes], **int32) if decodes else None,
        block_size=block_size)
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
