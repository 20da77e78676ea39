"""memory_pool=auto: unified over the KV budget plus the row pool's bytes, separate where unified cannot run."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from loraplex_server.config import CacheConfig, EngineConfig, LoraConfig
from loraplex_server.engine.kv_cache import KVCacheSpec
from loraplex_server.engine.memory_plan import plan_memory

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model():
    # hidden 32, 2 layers, 2 KV heads of 8: one rank row of all 7 modules is (32+32 + 32+16 + 32+16 + 32+32
    # + 32+64 + 32+64 + 64+32) x 2 layers = 1,024 elements, one 16-token KV block 2 x 2 x 16 x 2 x 8 = 1,024
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64)
    return LlamaForCausalLM(cfg).eval()


def plan(model, dtype=torch.float32, native=None, **settings):
    cache = {k: settings.pop(k) for k in ("num_blocks", "memory_pool", "block_size") if k in settings}
    config = EngineConfig(cache=CacheConfig(**{"num_blocks": 40, **cache}), lora=LoraConfig(**settings))
    return plan_memory(config, KVCacheSpec.from_model_config(model.config, dtype), model, CPU, native)


def test_auto_is_unified_over_the_kv_blocks_plus_the_row_pools_memory(model):
    got = plan(model, max_loras=4, max_lora_rank=8)  # 32 rows of 1,024 fp32 = 32 blocks of 4 KiB
    assert (got.pool, got.num_blocks) == ("unified", 40 + 32)
    assert plan(model, max_loras=4, max_lora_rank=8, lora_pool_rows=10).num_blocks == 40 + 10
    assert plan(model, max_loras=0, max_lora_rank=8).num_blocks == 40  # no cap, no row budget: the KV's only
    bf16 = plan(model, torch.bfloat16, FakeKernels(), max_loras=4, max_lora_rank=8, block_size=32)
    assert (bf16.pool, bf16.num_blocks) == ("unified", 40 + 16)  # 32 rows of 2 KiB in 32-token blocks of 4 KiB


def test_explicit_pools_keep_their_budgets(model):
    assert (plan(model, memory_pool="separate").pool, plan(model, memory_pool="separate").num_blocks) == (
        "separate", 40)
    unified = plan(model, memory_pool="unified", max_loras=4, max_lora_rank=8)
    assert (unified.pool, unified.num_blocks) == ("unified", 40)  # kv_cache_bytes is the whole pool
    # where auto would fall back, an explicit unified pool refuses to start, with the same reason
    with pytest.raises(ValueError, match="would hold 64 of the 10 pages of the unified memory pool, more than half"):
        plan(model, num_blocks=10, memory_pool="unified", max_loras=1, max_lora_rank=64)
    with pytest.raises(ValueError, match="computes in torch.float32"):
        plan(model, torch.bfloat16, memory_pool="unified", max_loras=4, max_lora_rank=8)


def test_auto_stays_separate_where_unified_cannot_run(model):
    # a rank-64 adapter holds 64 pages; with one slot the pool is 10 + 64: more than half
    small = plan(model, num_blocks=10, max_loras=1, max_lora_rank=64)
    assert (small.pool, small.num_blocks) == ("separate", 10) and "more than half" in small.reason
    assert plan(model, num_blocks=64, max_loras=1, max_lora_rank=64).pool == "unified"  # 64 of 128
    # a bf16 model on the CPU without the native kernels: the torch apply computes in fp32
    bf16 = plan(model, torch.bfloat16, max_loras=4, max_lora_rank=8)
    assert bf16.pool == "separate" and "computes in torch.float32" in bf16.reason
    # 2 KV heads of 6: a 3-token page holds 36 elements per arena, which cannot start 16-aligned blocks
    odd = LlamaForCausalLM(LlamaConfig(hidden_size=24, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    unaligned = plan(odd, block_size=3, max_loras=4, max_lora_rank=8)
    assert unaligned.pool == "separate" and "not a multiple of 16" in unaligned.reason
    assert plan(odd, block_size=4, max_loras=4, max_lora_rank=8).pool == "unified"  # 48 elements


def test_no_cap_needs_the_unified_pool(model):
    with pytest.raises(ValueError, match="max_loras 0 .* needs the unified memory pool.*computes in"):
        plan(model, torch.bfloat16, max_loras=0, max_lora_rank=8)


class FakeKernels:
    """The native kernel library as the LoRA apply sees it: it computes in the model's dtype."""

    def supports_lora(self, x_dtype, weight_dtype):
        return True
