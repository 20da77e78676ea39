"""vLLM-named metrics for the Kubernetes Gateway API Inference Extension's endpoint picker.

The endpoint picker (EPP) routes by queue depth, KV cache use and LoRA affinity, reading the
metric names vLLM exports (its model-server protocol, proposal 003). We export the same names with
the same semantics, so an InferencePool of Loraplex pods works with the reference EPP unchanged:

- ``vllm:num_requests_waiting`` / ``vllm:num_requests_running``: gauges, requests queued / in the batch.
- ``vllm:gpu_cache_usage_perc``: gauge, KV cache blocks in use as a fraction (0..1), as vLLM does.
- ``vllm:lora_requests_info``: gauge whose value is the unix time of the last update, labelled
  ``running_lora_adapters`` and ``waiting_lora_adapters`` (comma-separated adapter ids) and
  ``max_lora`` (device slots). Only the latest series is kept.
- ``vllm:prefix_cache_queries`` / ``vllm:prefix_cache_hits``: counters (exposed with ``_total``),
  tokens of admitted requests looked up in the prefix cache / found there, as vLLM counts them.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge


class GatewayCompatMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests queued for admission (vLLM name)",
                             registry=registry)
        self.running = Gauge("vllm:num_requests_running", "Requests in the running batch (vLLM name)",
                             registry=registry)
        self.kv_usage = Gauge("vllm:gpu_cache_usage_perc", "KV cache blocks in use, fraction 0..1 (vLLM name)",
                              registry=registry)
        self.lora_info = Gauge("vllm:lora_requests_info", "Running and waiting LoRA adapters; value: unix time "
                               "of the update (vLLM name)",
                               ("running_lora_adapters", "waiting_lora_adapters", "max_lora"), registry=registry)
        self.prefix_queries = Counter("vllm:prefix_cache_queries", "Prefix cache queries, in queried tokens "
                                      "(vLLM name)", registry=registry)
        self.prefix_hits = Counter("vllm:prefix_cache_hits", "Prefix cache hits, in cached tokens (vLLM name)",
                                   registry=registry)

    def record(self, stats, prefix_queries: int = 0, prefix_hits: int = 0) -> None:
        """``stats``: the engine's StepStats; ``prefix_*``: prefix-cache tokens since the last step."""
        if prefix_queries > 0:
            self.prefix_queries.inc(prefix_queries)
        if prefix_hits > 0:
            self.prefix_hits.inc(prefix_hits)
        self.waiting.set(stats.waiting)
        self.running.set(stats.running)
        if stats.kv_blocks_total:
            self.kv_usage.set(stats.kv_blocks_used / stats.kv_blocks_total)
        self.lora_info.clear()
        self.lora_info.labels(",".join(stats.running_adapters), ",".join(stats.waiting_adapters),
                              str(stats.max_loras)).set(time.time())
