"""Device memory use of the two pools (KV cache, LoRA weight rows): in ServerInfo, in the step
stats and in the Prometheus gauges, checked against sizes computed here from the model's shape."""

from prometheus_client import CollectorRegistry

from helpers import run_to_completion
from loraplex_server.engine.request import Prompt, SamplingParams
from loraplex_server.metrics import Metrics

FP32 = 4


def lora_row_bytes(config) -> int:
    """One rank row of every LoRA layer (A: in_features, B: out_features), all 7 modules, fp32."""
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = ((hidden + q) + 2 * (hidden + kv) + (q + hidden)  # q, k, v, o
                 + 2 * (hidden + inter) + (inter + hidden))  # gate, up, down
    return per_layer * config.num_hidden_layers * FP32


def test_pool_sizes_and_use_follow_the_adapters_ranks(make_engine, peft_adapters):
    engine = make_engine(num_blocks=64, block_size=16, max_loras=4, max_rank=32, pool_rows=40)
    config = engine.loaded.model.config
    row_bytes = lora_row_bytes(config)
    kv_block = 2 * config.num_hidden_layers * 16 * config.num_key_value_heads * (
        config.hidden_size // config.num_attention_heads) * FP32
    info = engine.server_info()
    assert (info.lora_pool_rows, info.lora_pool_bytes) == (40, 40 * row_bytes)
    assert info.kv_cache_bytes == 64 * kv_block

    idle = engine.stats(0.0)
    assert (idle.lora_rows_used, idle.lora_rows_total, idle.lora_row_bytes) == (0, 40, row_bytes)
    assert idle.kv_blocks_used == 0 and idle.kv_block_bytes == kv_block

    for name in ("all7-r8", "ko-r32"):  # ranks 8 and 32: 40 rows, the whole pool
        engine.lora.add_adapter(name, peft_adapters[name])
        engine.add_request(engine.make_request(Prompt(text="Hello there"),
                                               SamplingParams(max_new_tokens=3, ignore_eos=True), name))
    engine.step()  # both prefills in one step: both adapters resident
    busy = engine.stats(0.0)
    assert busy.lora_rows_used == 8 + 32 and busy.kv_blocks_used >= 2

    metrics = Metrics(CollectorRegistry())
    metrics.record_step(busy)

    def gauge(name, **labels):
        return metrics.registry.get_sample_value("loraplex_" + name, labels)
    assert gauge("lora_pool_rows", state="used") == 40 and gauge("lora_pool_rows", state="total") == 40
    assert gauge("memory_pool_bytes", pool="lora_weights", state="used") == 40 * row_bytes
    assert gauge("memory_pool_bytes", pool="kv_cache", state="used") == busy.kv_blocks_used * kv_block
    assert gauge("memory_pool_bytes", pool="kv_cache", state="total") == 64 * kv_block

    run_to_completion(engine)
    engine.remove_adapter("ko-r32")
    assert engine.stats(0.0).lora_rows_used == 8  # the removed version's rows are free again


def test_the_unified_pool_reports_pages_by_holder(make_engine, peft_adapters):
    """memory_pool=unified: one pool of 160 pages (KV blocks), adapter weights paged in it at their
    ranks (rank 8 on all 7 modules: 8 * 5,184 Bt floats per layer over 3,072 per page = 14 pages;
    rank 32 on k and o: A 32 * 1,152 = 12 pages), split by holder in the stats and the gauges."""
    engine = make_engine(num_blocks=160, block_size=16, max_loras=4, max_rank=32, memory_pool="unified")
    config = engine.loaded.model.config
    kv_block = 2 * config.num_hidden_layers * 16 * config.num_key_value_heads * (
        config.hidden_size // config.num_attention_heads) * FP32
    info = engine.server_info()
    assert (info.memory_pool, info.lora_pool_rows, info.lora_pool_bytes) == ("unified", 0, 0)
    assert info.kv_cache_bytes == 160 * kv_block
    assert info.kv_cache_tokens == 160 * 16 and engine.inputs.kv_capacity_tokens == (160 - 54 - 40) * 16
    idle = engine.stats(0.0)
    assert idle.pool_pages == (0, 0, 0, 160) and idle.lora_rows_total == 160 and idle.lora_row_bytes == kv_block

    for name in ("all7-r8", "ko-r32"):
        engine.lora.add_adapter(name, peft_adapters[name])
        engine.add_request(engine.make_request(Prompt(text="Hello there, " * 12),
                                               SamplingParams(max_new_tokens=3, ignore_eos=True), name))
    engine.step()
    busy = engine.stats(0.0)
    kv = busy.kv_blocks_used
    assert kv >= 2 and busy.pool_pages == (kv, 0, 14 + 12, 160 - kv - 26) and busy.lora_rows_used == 26

    metrics = Metrics(CollectorRegistry())
    metrics.record_step(busy)

    def gauge(name, **labels):
        return metrics.registry.get_sample_value("loraplex_" + name, labels)
    assert [gauge("unified_pool_pages", holder=h) for h in ("kv", "kv_cached", "adapters", "free")] == [
        kv, 0, 26, 160 - kv - 26]
    assert gauge("memory_pool_bytes", pool="lora_weights", state="used") == 26 * kv_block

    run_to_completion(engine)
    done = engine.stats(0.0)
    assert done.pool_pages[0] == 0 and done.pool_pages[1] > 0  # finished requests' full blocks stay cached
    engine.remove_adapter("ko-r32")
    assert engine.stats(0.0).pool_pages[2] == 14  # the removed version's pages are free again
