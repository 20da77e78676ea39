"""vLLM-named metrics for the Gateway API Inference Extension's endpoint picker."""

import time

from loraplex_server.engine.request import Prompt, SamplingParams
from loraplex_server.metrics import Metrics, StepStats


def stats(**kw):
    base = dict(num_seqs=2, num_tokens=2, duration_s=0.01, running=2, waiting=1, kv_blocks_used=3,
                kv_blocks_total=12, adapters_device=2, adapters_cpu=2, adapters_registered=3, device_loads=2,
                device_evictions=0, cpu_loads=2, cpu_evictions=0, preemptions=0, max_loras=4)
    return StepStats(**{**base, **kw})


def test_queue_kv_and_lora_info_use_vllm_names_and_semantics():
    m = Metrics()
    before = time.time()
    m.record_step(stats(running_adapters=("acme/a", "b"), waiting_adapters=("c",)))
    get = m.registry.get_sample_value
    assert get("vllm:num_requests_waiting") == 1 and get("vllm:num_requests_running") == 2
    assert get("vllm:gpu_cache_usage_perc") == 0.25
    labels = {"running_lora_adapters": "acme/a,b", "waiting_lora_adapters": "c", "max_lora": "4"}
    assert get("vllm:lora_requests_info", labels) >= before


def test_lora_info_keeps_only_the_latest_series():
    m = Metrics()
    m.record_step(stats(running_adapters=("a",)))
    m.record_step(stats(running_adapters=(), waiting_adapters=()))
    series = [s for f in m.registry.collect() if f.name == "vllm:lora_requests_info" for s in f.samples]
    assert [s.labels["running_lora_adapters"] for s in series] == [""]


def test_engine_stats_name_running_and_waiting_adapters(make_engine, peft_adapters):
    engine = make_engine(max_loras=1)
    engine.lora.add_adapter("a", peft_adapters["all7-r8"])
    engine.lora.add_adapter("b", peft_adapters["all7-r8"])
    for adapter in ("a", "b", None):
        engine.add_request(engine.make_request(Prompt(token_ids=(1, 2, 3)), SamplingParams(max_new_tokens=4), adapter))
    engine.step()
    s = engine.stats(0.0)
    assert s.running_adapters == ("a",) and s.waiting_adapters == ("b",) and s.max_loras == 1
