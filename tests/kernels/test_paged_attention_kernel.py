"""The Triton paged attention against torch SDPA run per sequence on the unpaged K/V."""

from types import SimpleNamespace

import pytest
import torch
from attention_cases import ATTN_TOL, HEADS, MIXES, make_step, sdpa_reference
from kernel_cases import DTYPES, grid, product

from loraplex_server.model import triton_attention
from loraplex_server.model.attention import META_KWARG, paged_attention

FULL = product(HEADS, (1, 16), (None, 24), DTYPES, MIXES)
CPU = [
    ((4, 2, 32), 16, None, "fp32", "mixed"), ((6, 2, 48), 8, 5, "bf16", "mixed"),
    ((4, 4, 64), 1, None, "fp16", "decode"), ((8, 1, 64), 16, None, "fp32", "prefill"),
    ((4, 2, 32), 32, 24, "fp16", "mixed"), ((32, 8, 128), 16, None, "bf16", "decode"),
    ((4, 2, 64), 16, 24, "bf16", "long"), ((4, 1, 32), 8, None, "fp32", "long"),
]


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
