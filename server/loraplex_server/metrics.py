"""Prometheus metrics: one ``Metrics`` object on an injected registry (no module-level collectors).

Label cardinality is capped: at most ``max_adapter_labels`` distinct adapter ids get their own
label value; the rest are counted under ``other``. The base model is ``base``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .metrics_gateway import GatewayCompatMetrics

PREFIX = "loraplex_"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
BASE_LABEL = "base"
OTHER_LABEL = "other"


class LabelCap:
    """Maps adapter ids to at most ``limit`` label values plus ``other``.

    Only ids that were ``allow``-ed (registered adapters) get a label of their own, so clients
    asking for made-up ids cannot grow the label set.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self._allowed: set[str] = set()
        self._lock = threading.Lock()

    def allow(self, value: str) -> None:
        with self._lock:
            if len(self._allowed) < self.limit:
                self._allowed.add(value)

    def values(self) -> list[str]:
        """The values with a label of their own."""
        with self._lock:
            return list(self._allowed)

    def __call__(self, value: str | None) -> str:
        if not value:
            return BASE_LABEL
        return value if value in self._allowed else OTHER_LABEL


@dataclass(frozen=True)
class StepStats:
    num_seqs: int
    num_tokens: int
    duration_s: float
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    adapters_device: int
    adapters_cpu: int
    adapters_registered: int
    device_loads: int  # cumulative
    device_evictions: int
    cpu_loads: int
    cpu_evictions: int
    preemptions: int
    running_adapters: tuple[str, ...] = ()  # adapter ids in the batch / in the queue, sorted
    waiting_adapters: tuple[str, ...] = ()
    max_loras: int = 0
    grammar_cache_hits: int = 0  # cumulative
    grammar_cache_misses: int = 0
    grammar_compile_seconds: tuple[float, ...] = ()  # compiles finished since the previous step
    prefix_cache_queries: int = 0  # cumulative: tokens of admitted requests looked up in the prefix cache
    prefix_cache_hits: int = 0  # cumulative: of those, tokens found cached (not computed)
    kv_block_bytes: int = 0  # device bytes of one KV block (all layers, K and V)
    lora_rows_used: int = 0  # rows of the LoRA weight pool held by resident adapters
    lora_rows_total: int = 0
    lora_row_bytes: int = 0  # device bytes of one pool row (every LoRA layer's A and B)
    # unified memory pool only: pages held by requests' KV blocks, cached KV blocks no request holds,
    # adapter weights, and free pages
    pool_pages: tuple[int, ...] = ()


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, max_adapter_labels: int = 32,
                 max_tenant_labels: int = 32):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.adapter_label = LabelCap(max_adapter_labels)
        self.tenant_label = LabelCap(max_tenant_labels)
        self._last: dict[str, int] = {}
        self._lock = threading.Lock()
        self._define_request_metrics()
        self._define_engine_metrics()
        self.gateway = GatewayCompatMetrics(self.registry)

    def _counter(self, name, doc, labels=()):
        return Counter(PREFIX + name, doc, labels, registry=self.registry)

    def _gauge(self, name, doc, labels=()):
        return Gauge(PREFIX + name, doc, labels, registry=self.registry)

    def _histogram(self, name, doc, buckets, labels=()):
        return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=self.registry)

    def _define_request_metrics(self) -> None:
        self.requests = self._counter("requests_total", "Finished calls by gRPC status (HTTP calls by the status "
                                      "of the same table), adapter and front end (grpc / http)",
                                      ("method", "status", "adapter", "frontend"))
        self.ttft = self._histogram("time_to_first_token_seconds", "Arrival to first token", LATENCY_BUCKETS)
        self.tpot = self._histogram("time_per_output_token_seconds", "Mean decode time per output token after "
                                    "the first", LATENCY_BUCKETS)
        self.e2e = self._histogram("request_latency_seconds", "Arrival to finish", LATENCY_BUCKETS)
        self.queue_wait = self._histogram("queue_wait_seconds", "Arrival to first scheduled step", LATENCY_BUCKETS)
        self.prompt_tokens = self._counter("prompt_tokens_total", "Prompt tokens of finished requests", ("adapter",))
        self.generated_tokens = self._counter("generated_tokens_total", "Generated tokens", ("adapter",))
        self.adapter_load_seconds = self._histogram("adapter_load_seconds", "Reading and validating an adapter",
                                                    LATENCY_BUCKETS)
        self.adapter_load_failures = self._counter("adapter_load_failures_total", "Adapters refused at load")
        self.tenant_requests = self._counter("tenant_requests_total", "Finished generation calls by tenant, "
                                             "gRPC status and front end", ("tenant", "status", "frontend"))
        self.tenant_tokens = self._counter("tenant_generated_tokens_total", "Generated tokens by tenant", ("tenant",))
        self.tenant_queue_wait = self._histogram("tenant_queue_wait_seconds", "Arrival to first scheduled step, "
                                                 "by tenant", LATENCY_BUCKETS, ("tenant",))

    def _define_engine_metrics(self) -> None:
        self.running = self._gauge("requests_running", "Requests in the running batch")
        self.waiting = self._gauge("requests_waiting", "Requests queued for admission")
        self.batch_size = self._histogram("batch_size", "Sequences per engine step", TOKEN_BUCKETS)
        self.batch_tokens = self._histogram("batch_tokens", "Tokens per engine step", TOKEN_BUCKETS)
        self.step_seconds = self._histogram("step_seconds", "Engine step duration", LATENCY_BUCKETS)
        self.kv_used = self._gauge("kv_blocks_used", "KV cache blocks in use")
        self.kv_total = self._gauge("kv_blocks_total", "KV cache blocks in all")
        self.pool_bytes = self._gauge("memory_pool_bytes", "Device memory of the KV cache (pool=kv_cache) and the "
                                      "LoRA weight pool (pool=lora_weights): used or total", ("pool", "state"))
        self.lora_rows = self._gauge("lora_pool_rows", "Rank rows of the LoRA weight pool: used (held by resident "
                                     "adapters, rank r holds r) or total", ("state",))
        self.pool_pages = self._gauge("unified_pool_pages", "Pages of the unified memory pool (one KV block each) "
                                      "by holder: kv (requests' KV blocks), kv_cached (prefix-cache blocks no "
                                      "request holds), adapters, free", ("holder",))
        self.adapters_resident = self._gauge("adapters_resident", "Adapters per tier", ("tier",))
        self.adapter_loads = self._counter("adapter_loads_total", "Adapter loads into a tier", ("tier",))
        self.adapter_evictions = self._counter("adapter_evictions_total", "Adapter evictions from a tier", ("tier",))
        self.preemptions = self._counter("preemptions_total", "Requests preempted for lack of KV blocks")
        self.grammar_compile_seconds = self._histogram("grammar_compile_seconds", "Compiling one structured-"
                                                       "output constraint (off the engine thread)", LATENCY_BUCKETS)
        self.grammar_cache = self._counter("grammar_cache_total", "Compiled-grammar cache lookups", ("result",))
        self.prefix_queries = self._counter("prefix_cache_query_tokens_total", "Tokens of admitted requests "
                                            "looked up in the KV prefix cache")
        self.prefix_hits = self._counter("prefix_cache_hit_tokens_total", "Tokens of admitted requests found in "
                                         "the KV prefix cache (not computed)")
        self.adapter_info = self._gauge("adapter_info", "1 per published adapter (capped labels)",
                                        ("adapter", "tier", "version"))
        self.adapter_size = self._gauge("adapter_size_bytes", "Resident bytes of an adapter", ("adapter",))
        self.adapter_last_used = self._gauge("adapter_last_used_timestamp_seconds", "Unix time of an adapter's "
                                             "last step", ("adapter",))
        self.adapter_last_load = self._gauge("adapter_last_load_seconds", "Latest disk -> host load time of an "
                                             "adapter", ("adapter",))

    # ---- recording --------------------------------------------------------------------
    def record_rpc(self, method: str, status: str, adapter_id: str | None, tenant: str | None = None,
                   frontend: str = "grpc") -> None:
        """One finished call; ``frontend`` is ``grpc`` or ``http`` (both use the gRPC status names)."""
        self.requests.labels(method, status, self.adapter_label(adapter_id), frontend).inc()
        if tenant is not None and method.startswith("Generate"):
            self.tenant_requests.labels(self._tenant(tenant), status, frontend).inc()

    def _tenant(self, tenant: str) -> str:
        return self.tenant_label(tenant) if tenant else "none"

    def record_tenant_request(self, tenant: str, output) -> None:
        """A tenant's finished request: its tokens and queue wait."""
        label = self._tenant(tenant)
        self.tenant_tokens.labels(label).inc(output.completion_tokens)
        if output.timings is not None and output.timings.queue_wait is not None:
            self.tenant_queue_wait.labels(label).observe(output.timings.queue_wait)

    def record_request(self, output) -> None:
        """The final RequestOutput of a request (with timings)."""
        label = self.adapter_label(output.adapter_id)
        self.prompt_tokens.labels(label).inc(output.prompt_tokens)
        self.generated_tokens.labels(label).inc(output.completion_tokens)
        t = output.timings
        if t is None:
            return
        self.e2e.observe(t.end_to_end)
        if t.queue_wait is not None:
            self.queue_wait.observe(t.queue_wait)
        if t.time_to_first_token is not None:
            self.ttft.observe(t.time_to_first_token)
            if output.completion_tokens > 1:
                self.tpot.observe((t.finished - t.first_token) / (output.completion_tokens - 1))

    def record_step(self, s: StepStats) -> None:
        self.batch_size.observe(s.num_seqs)
        self.batch_tokens.observe(s.num_tokens)
        self.step_seconds.observe(s.duration_s)
        self.running.set(s.running)
        self.waiting.set(s.waiting)
        self.kv_used.set(s.kv_blocks_used)
        self.kv_total.set(s.kv_blocks_total)
        for pool, used, total, unit in (("kv_cache", s.kv_blocks_used, s.kv_blocks_total, s.kv_block_bytes),
                                        ("lora_weights", s.lora_rows_used, s.lora_rows_total, s.lora_row_bytes)):
            self.pool_bytes.labels(pool, "used").set(used * unit)
            self.pool_bytes.labels(pool, "total").set(total * unit)
        self.lora_rows.labels("used").set(s.lora_rows_used)
        self.lora_rows.labels("total").set(s.lora_rows_total)
        for holder, pages in zip(("kv", "kv_cached", "adapters", "free"), s.pool_pages, strict=False):  # () if separate
            self.pool_pages.labels(holder).set(pages)
        self.adapters_resident.labels("device").set(s.adapters_device)
        self.adapters_resident.labels("cpu").set(s.adapters_cpu)
        self.adapters_resident.labels("registered").set(s.adapters_registered)
        self._advance(self.adapter_loads.labels("device"), "device_loads", s.device_loads)
        self._advance(self.adapter_loads.labels("cpu"), "cpu_loads", s.cpu_loads)
        self._advance(self.adapter_evictions.labels("device"), "device_evictions", s.device_evictions)
        self._advance(self.adapter_evictions.labels("cpu"), "cpu_evictions", s.cpu_evictions)
        self._advance(self.preemptions, "preemptions", s.preemptions)
        self._advance(self.grammar_cache.labels("hit"), "grammar_hits", s.grammar_cache_hits)
        self._advance(self.grammar_cache.labels("miss"), "grammar_misses", s.grammar_cache_misses)
        for seconds in s.grammar_compile_seconds:
            self.grammar_compile_seconds.observe(seconds)
        queries = self._delta("prefix_queries", s.prefix_cache_queries)
        hits = self._delta("prefix_hits", s.prefix_cache_hits)
        if queries > 0:
            self.prefix_queries.inc(queries)
        if hits > 0:
            self.prefix_hits.inc(hits)
        self.gateway.record(s, queries, hits)

    def record_adapters(self, infos) -> None:
        """Per-adapter tier, version, size, last use and load latency (labelled adapters only)."""
        for gauge in (self.adapter_info, self.adapter_size, self.adapter_last_used, self.adapter_last_load):
            gauge.clear()
        for info in infos:
            label = self.adapter_label(info.meta.adapter_id)
            if label == OTHER_LABEL:
                continue
            self.adapter_info.labels(label, info.state, str(info.version)).set(1)
            self.adapter_size.labels(label).set(info.meta.size_bytes)
            if info.last_used is not None:
                self.adapter_last_used.labels(label).set(info.last_used)
            if info.load_latency_s is not None:
                self.adapter_last_load.labels(label).set(info.load_latency_s)

    def _advance(self, counter, key: str, total: int) -> None:
        """Counters mirror cumulative engine counts: add what is new since the last step."""
        delta = self._delta(key, total)
        if delta > 0:
            counter.inc(delta)

    def _delta(self, key: str, total: int) -> int:
        """How much a cumulative engine count grew since the last step."""
        with self._lock:
            delta = total - self._last.get(key, 0)
            self._last[key] = total
        return delta
