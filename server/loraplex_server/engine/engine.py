"""LLMEngine: the synchronous core. One ``step()`` = schedule, make adapters resident, run, postprocess.

Not thread-safe: exactly one thread (the ``EngineLoop``) calls ``add_request``/``abort``/``step``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

import torch

from ..config import EngineConfig
from ..errors import AdapterUnavailableError, DuplicateRequestError, EngineFailure
from ..lora.ids import AdapterId, VersionKey
from ..lora.manager import LoraManager, SharedPool
from ..memory.page_pool import KvPages, PagePool
from ..metrics import StepStats
from ..model.attention import register_paged_attention
from ..model.fused_ops import install_fused_ops
from ..model.loader import LoadedModel, load_model
from ..model.logits_head import reuse_logits_memory
from ..model.native import load_native_kernels
from ..model.packed_linear import pack_linears
from ..model.triton_attention import select_attention_function
from .decode_graphs import DecodeGraphs, build_decode_graphs, graph_mode
from .fairness import FcfsOrder, VirtualTokenCounter
from .fault_isolation import bisect_failures
from .guided import GrammarBackend, GrammarCache, Guide
from .info import ServerInfo
from .inputs import InputProcessor
from .kv_blocks import BlockManager, blocks_for
from .kv_cache import KVCacheSpec, allocate_kv_cache
from .memory_plan import plan_memory
from .output import OutputProcessor, PendingText, decode_texts
from .request import FinishReason, Prompt, Request, RequestOutput, SamplingParams
from .runner import ModelRunner
from .scheduler import ScheduledRequest, Scheduler, SchedulerOutput

log = logging.getLogger(__name__)


def make_fairness(kind: str, tenant_weight: Callable[[str], float] | None):
    if kind == "fcfs":
        return FcfsOrder()
    if kind == "vtc":
        return VirtualTokenCounter(tenant_weight or (lambda tenant: 1.0))
    raise ValueError(f"unknown fairness policy {kind!r} (vtc or fcfs)")


def eos_token_ids(loaded: LoadedModel) -> set[int]:
    ids: set[int] = set()
    for source in (loaded.model.config, getattr(loaded.model, "generation_config", None), loaded.tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is not None:
            ids.update(value if isinstance(value, (list, tuple)) else [value])
    return ids


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None, adapter_load_fn=None,
                 tenant_weight: Callable[[str], float] | None = None):
        """``adapter_load_fn`` replaces the adapter weight reader (fault injection in tests);
        ``tenant_weight`` gives each tenant's share weight for fair scheduling (default 1)."""
        self.config = config
        torch.set_num_threads(config.resolved_threads())
        self.loaded = loaded or load_model(config.model)
        model = self.loaded.model
        register_paged_attention(model, select_attention_function(self.loaded.device))  # Triton on CUDA
        native = None
        if config.model.cpu_kernels == "auto" and self.loaded.device.type == "cpu":
            native = load_native_kernels(config.model.cache_dir, config.resolved_threads())
        spec = KVCacheSpec.from_model_config(model.config, self.loaded.dtype)
        self.memory = plan_memory(config, spec, model, self.loaded.device, native)
        num_blocks = self.memory.num_blocks
        self.kv_block_bytes = spec.bytes_per_block(config.cache.block_size)
        graphs = graph_mode(config.model.cuda_graphs, self.loaded.device)
        # captured decode steps park their padding rows in one extra block no sequence owns
        allocated_blocks = num_blocks + (1 if graphs else 0)
        kv_caches = allocate_kv_cache(spec, allocated_blocks, config.cache.block_size, self.loaded.device)
        self.kv_cache_bytes = allocated_blocks * self.kv_block_bytes
        shared = self._shared_pool(spec, num_blocks, kv_caches) if self.memory.pool == "unified" else None
        self.lora = LoraManager(model, config.lora, load_fn=adapter_load_fn, native_kernels=native, shared=shared)
        free_blocks = None if shared is None else KvPages(shared.pool, self._idle_adapter_pages,
                                                          self._evict_idle_adapter)
        self.blocks = BlockManager(num_blocks, config.cache.block_size, config.cache.prefix_caching, free_blocks)
        self.scheduler = Scheduler(config.scheduler, self.blocks, self.lora.slots.max_loras,
                                   key_ready=self.lora.ready, reserved_keys=self.lora.reserved_keys,
                                   fairness=make_fairness(config.scheduler.fairness, tenant_weight),
                                   lora_fits=self.lora.fits)
        self.runner = ModelRunner(model, kv_caches, config.cache.block_size, self.loaded.device, self.lora)
        native_len: int = getattr(model.config, "max_position_embeddings", 2048)
        model_len = config.model.max_model_len or native_len
        if graphs:
            self.runner.decode_graphs = self._decode_graphs(graphs, kv_caches, num_blocks, model_len)
        if config.model.cpu_kernels == "auto" and self.loaded.device.type == "cpu":
            self.runner.use_native_kernels(native)
            if native is not None:  # merges q/k/v and gate/up: before packing, after LoRA injection
                log.info("fused native norms and activations in %d modules", install_fused_ops(model, native))
            log.info("CPU linears (cpu_gemm=%s): %s", config.model.cpu_gemm, pack_linears(model, config.model.cpu_gemm))
            reuse_logits_memory(model)  # after packing: wraps the packed head too
        self.inputs = InputProcessor(self.loaded.tokenizer, model.config.vocab_size, model_len,
                                     self.lora.kv_capacity_pages(num_blocks) * config.cache.block_size)
        self.outputs = OutputProcessor(self.loaded.tokenizer, eos_token_ids(self.loaded),
                                       self.inputs.max_total_tokens)
        self.grammars = GrammarCache(config.guided, lambda: GrammarBackend(
            self.loaded.tokenizer, model.config.vocab_size, eos_token_ids(self.loaded)))
        self.requests: dict[str, Request] = {}
        self.last_batch = (0, 0)  # (sequences, tokens) of the latest step
        self._retired: set[VersionKey] = set()  # adapter versions to free once unused
        self.failed_steps_in_a_row = 0  # forwards that raised (culprits isolated), reset by a clean one
        log.info("engine ready: %s on %s (%s), %d %s of %d tokens (prefix caching %s), max_loras=%d, "
                 "memory pool %s (%s)", self.loaded.name, self.loaded.device, self.loaded.dtype, num_blocks,
                 "pages of KV blocks or adapter weights" if shared is not None else "KV blocks",
                 config.cache.block_size, "on" if config.cache.prefix_caching else "off", self.lora.slots.max_loras,
                 self.memory.pool, self.memory.reason)

    def _idle_adapter_pages(self) -> int:
        """Unified pool: pages that adapters no running request (or pin, or this step) uses could free."""
        return self.lora.idle_pages(self.scheduler.running_adapter_keys())

    def _evict_idle_adapter(self) -> bool:
        return self.lora.evict_idle(self.scheduler.running_adapter_keys())

    def _shared_pool(self, spec: KVCacheSpec, num_blocks: int, kv_caches) -> SharedPool:
        """The unified memory pool over the KV cache: page p is KV block p of every layer, where an
        adapter version may instead keep its weights (A blocks in K, Bt blocks in V)."""
        block_size = self.config.cache.block_size
        # late-bound: self.blocks is built after the LoRA side, which needs the pool
        return SharedPool([(k.view(-1), v.view(-1)) for k, v in kv_caches],
                          page_elems=spec.elements_per_block(block_size), page_bytes=self.kv_block_bytes,
                          pool=PagePool(num_blocks), cached_pages=lambda: self.blocks.cached_free_blocks(),  # noqa: PLW0108
                          reclaim=lambda blocks: self.blocks.reclaim_cached(blocks))  # noqa: PLW0108

    def _decode_graphs(self, mode: str, kv_caches, num_blocks: int, model_len: int) -> DecodeGraphs | None:
        block_size = self.config.cache.block_size
        max_seqs = self.config.scheduler.max_num_seqs
        return build_decode_graphs(mode, self.loaded.model, kv_caches, self.lora,
                                   max_batch=min(self.config.model.cuda_graph_max_batch or max_seqs, max_seqs),
                                   max_blocks=blocks_for(model_len, block_size) + 1, block_size=block_size,
                                   trash_block=num_blocks, device=self.loaded.device)

    # ---- requests -------------------------------------------------------------------------
    def make_request(self, prompt: Prompt, sampling: SamplingParams, adapter_id: AdapterId | None = None,
                     request_id: str | None = None, tenant: str = "") -> Request:
        """Validate and tokenize (any thread); raises a domain error for bad input.

        The request holds a reference on its adapter version from here until it ends (``_finish``),
        or until ``discard_request`` if it is never added."""
        version = self.lora.acquire(adapter_id) if adapter_id else None  # NOT_FOUND if unknown
        try:
            failure = self.lora.failure(version.key) if version is not None else None
            if failure is not None:
                assert adapter_id is not None  # a version (whose load failed) was acquired for it
                raise AdapterUnavailableError(adapter_id, failure)
            token_ids = self.inputs.token_ids(prompt)
            self.inputs.check(token_ids, sampling)
            guide = self._guide_for(sampling)
        except BaseException:
            if version is not None:
                self.lora.release_request(version.key)
            raise
        return Request(request_id or uuid.uuid4().hex, token_ids, sampling, adapter_id or None,
                       adapter_key=version.key if version else None, tenant=tenant, guide=guide)

    def _guide_for(self, sampling: SamplingParams) -> Guide | None:
        """Start (or reuse) the compile of a constrained request's grammar; a constraint already
        known to be bad is refused here, one still compiling is refused from the queue."""
        if sampling.constraint is None:
            return None
        guide = Guide(sampling.constraint, self.grammars.get(sampling.constraint),
                      self.config.guided.grammar_compile_timeout_s)
        refusal = guide.refusal()
        if refusal is not None:
            raise refusal
        return guide

    def discard_request(self, request: Request) -> None:
        """A request made but never added (refused at submit): give back its version reference."""
        if request.adapter_key:
            self.lora.release_request(request.adapter_key)

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise DuplicateRequestError(request.request_id)
        self.requests[request.request_id] = request
        if request.adapter_id:
            self.lora.count_request(request.adapter_id)
        self.outputs.start(request)
        self.scheduler.add(request)

    def abort(self, request_id: str) -> RequestOutput | None:
        request = self.requests.get(request_id)
        if request is None:
            return None
        out = self.outputs.final(request, FinishReason.ABORT)
        self._finish(request)
        return out

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # ---- adapters -------------------------------------------------------------------------
    def remove_adapter(self, adapter_id: AdapterId) -> None:
        """Unpublish: new requests get NOT_FOUND; accepted ones finish on their version, whose
        device slot is freed once no request uses it."""
        self._retired.add(self.lora.remove_adapter(adapter_id).key)
        self.release_retired()

    def adapter_replaced(self, old_key: VersionKey) -> None:
        """A hot-swap published a new version; the old one is freed once no request uses it."""
        self._retired.add(old_key)
        self.release_retired()

    # ---- the loop body --------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One step; every delta returned carries its text."""
        outputs = self.step_tokens()
        decode_texts(self.take_undecoded())
        return outputs

    def step_tokens(self, before_forward: Callable[[], None] | None = None) -> list[RequestOutput]:
        """One step, leaving the text of requests without stop strings undecoded: their deltas go
        with ``take_undecoded()``'s ``PendingText`` items, to decode (in order) before publishing.
        ``before_forward()`` runs once the step's inputs are packed, as its forward starts (not at
        all when nothing runs): the loop hands the previous step's deltas to its output thread
        there, so that thread's Python runs while the forward has released the GIL."""
        self.runner.before_forward = before_forward
        try:
            return self._step_tokens()
        finally:
            self.runner.before_forward = None

    def _step_tokens(self) -> list[RequestOutput]:
        self.lora.begin_step()
        failed = self._prefetch_adapters() + self._refuse_bad_constraints()
        batch = self.scheduler.schedule()
        self.last_batch = (len(batch.scheduled), batch.num_tokens)
        if not batch.scheduled:  # everything waits on adapter loads
            return failed
        self._mark_scheduled(batch)
        try:
            ran = [(batch.scheduled, self._run(batch.scheduled))]
            self.failed_steps_in_a_row = 0
        except Exception:  # isolated below: only the culprit requests end
            log.exception("engine step of %d requests failed; re-running them in halves", len(batch.scheduled))
            self.failed_steps_in_a_row += 1
            ran, culprits = bisect_failures(batch.scheduled, self._run)
            failed += self._fail_culprits(culprits)
        for group, (sampled, samples) in ran:
            self.scheduler.after_step(SchedulerOutput(scheduled=group))
            failed += self._postprocess(sampled, samples)
        return failed

    def take_undecoded(self) -> list[PendingText]:
        """The texts ``step_tokens()`` (and aborts) left to decode since the last call, in order."""
        return self.outputs.take_undecoded()

    def _run(self, scheduled: list[ScheduledRequest]):
        """Adapters resident, then the forward and sampling of these rows of the step."""
        batch = SchedulerOutput(scheduled=list(scheduled))
        lora_slots = self.lora.activate(batch.adapter_keys, self.scheduler.running_adapter_keys())
        return self.runner.run(batch, lora_slots)

    def _fail_culprits(self, culprits) -> list[RequestOutput]:
        outputs = []
        for s, exc in culprits:
            request = s.request
            log.error("request %s fails the engine step on its own: %s: %s", request.request_id,
                      type(exc).__name__, exc)
            failure = EngineFailure(f"internal error in the engine step (request id {request.request_id}): "
                                    f"{type(exc).__name__}: {exc}")
            outputs.append(self.outputs.final(request, FinishReason.ERROR, failure))
            self._finish(request)
        return outputs

    def _prefetch_adapters(self) -> list[RequestOutput]:
        """Start loads for queued requests' adapters (in queue order, up to half the CPU cache),
        keep the cached ones of that window fresh so later prefetches evict something else, and
        end the requests whose adapter failed to load."""
        outputs: list[RequestOutput] = []
        seen: set[VersionKey] = set()
        window = max(1, self.config.lora.max_cpu_loras // 2)
        for request in list(self.scheduler.waiting):
            key = request.adapter_key
            if not key or key in seen:
                continue
            reason = self.lora.failure(key)
            if reason is not None:
                assert request.adapter_id is not None  # a request bound to an adapter version names its adapter
                err = AdapterUnavailableError(request.adapter_id, reason)
                outputs.append(self.outputs.final(request, FinishReason.ERROR, err))
                self._finish(request)
            elif len(seen) < window:
                seen.add(key)
                self.lora.prefetch(key)
        return outputs

    def _refuse_bad_constraints(self) -> list[RequestOutput]:
        """End the queued requests whose grammar failed to compile (INVALID_ARGUMENT at the edge)."""
        outputs = []
        for request in list(self.scheduler.waiting):
            refusal = request.guide.refusal() if request.guide is not None else None
            if refusal is not None:
                outputs.append(self.outputs.final(request, FinishReason.ERROR, refusal))
                self._finish(request)
        return outputs

    @staticmethod
    def _mark_scheduled(batch) -> None:
        now = time.monotonic()
        for s in batch.scheduled:
            if s.request.first_scheduled_time is None:
                s.request.first_scheduled_time = now

    def stats(self, duration_s: float) -> StepStats:
        slots, registry = self.lora.slots, self.lora.registry
        pool_pages: tuple[int, ...] = ()
        if self.lora.shared is None:
            kv_used = self.blocks.num_blocks - self.blocks.num_free_blocks
        else:  # unified: count the pool's pages by holder
            pool, cached = self.lora.shared.pool, len(self.blocks.cached_free_blocks())
            kv_used = pool.kv_pages - cached
            pool_pages = (kv_used, cached, pool.adapter_pages, pool.free_pages)
        return StepStats(
            num_seqs=self.last_batch[0], num_tokens=self.last_batch[1], duration_s=duration_s,
            running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
            kv_blocks_used=kv_used,
            kv_blocks_total=self.blocks.num_blocks, adapters_device=len(slots.resident),
            adapters_cpu=registry.num_in_cpu_cache, adapters_registered=registry.num_registered,
            device_loads=slots.num_loads, device_evictions=slots.num_evictions,
            cpu_loads=registry.num_cpu_loads, cpu_evictions=registry.num_cpu_evictions,
            preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=self.blocks.query_tokens, prefix_cache_hits=self.blocks.hit_tokens,
            grammar_cache_hits=self.grammars.hits, grammar_cache_misses=self.grammars.misses,
            grammar_compile_seconds=self.grammars.drain_compile_seconds(),
            running_adapters=_adapter_ids(self.scheduler.running),
            waiting_adapters=_adapter_ids(self.scheduler.waiting),
            max_loras=slots.max_loras, kv_block_bytes=self.kv_block_bytes,
            lora_rows_used=slots.used_rows, lora_rows_total=slots.pool_rows, lora_row_bytes=slots.row_bytes,
            pool_pages=pool_pages)

    def server_info(self) -> ServerInfo:
        lora = self.config.lora
        unified = self.lora.shared is not None
        return ServerInfo(model=self.loaded.name, dtype=str(self.loaded.dtype).removeprefix("torch."),
                          device=str(self.loaded.device), max_loras=self.lora.slots.max_loras,
                          max_lora_rank=lora.max_lora_rank,
                          max_cpu_loras=lora.max_cpu_loras, context_length=self.inputs.max_model_len,
                          kv_cache_tokens=self.blocks.capacity_tokens, prefix_caching=self.blocks.prefix_caching,
                          lora_pool_rows=0 if unified else self.lora.slots.pool_rows,
                          lora_pool_bytes=0 if unified else self.lora.slots.pool_rows * self.lora.slots.row_bytes,
                          kv_cache_bytes=self.kv_cache_bytes, memory_pool=self.memory.pool)

    def set_tenant_weights(self, weight_of: Callable[[str], float]) -> None:
        """Tenant share weights for fair scheduling (no effect under FCFS)."""
        if isinstance(self.scheduler.fairness, VirtualTokenCounter):
            self.scheduler.fairness.weight_of = weight_of

    def pin_adapter(self, adapter_id: AdapterId) -> None:
        self.lora.pin(adapter_id, self.scheduler.running_adapter_keys())

    def _postprocess(self, sampled, samples) -> list[RequestOutput]:
        outputs = []
        for request, token, logprob in zip(sampled, samples.token_ids, samples.logprobs, strict=True):
            if request.guide is not None and not request.guide.accept(token):
                log.error("grammar rejected sampled token %d of request %s (%s)", token, request.request_id,
                          request.guide.failure or "not allowed")
                outputs.append(self.outputs.final(request, FinishReason.ERROR,
                                                  EngineFailure("the grammar engine failed on this request")))
                self._finish(request)
                continue
            out = self.outputs.append(request, token, logprob)
            if out is not None:
                outputs.append(out)
            if request.finish_reason is not None:
                self._finish(request)
        self.release_retired()
        return outputs

    def fail_running(self, message: str) -> list[RequestOutput]:
        """After an unexpected step failure: end every scheduled request with an error."""
        outputs = [self.outputs.final(r, FinishReason.ERROR, EngineFailure(message))
                   for r in list(self.scheduler.running)]
        for request in list(self.scheduler.running):
            self._finish(request)
        return outputs

    def _finish(self, request: Request) -> None:
        self.scheduler.finish(request)
        self.runner.sampler.release(request.request_id)
        self.outputs.release(request.request_id)
        if self.requests.pop(request.request_id, None) is not None and request.adapter_key:
            self.lora.release_request(request.adapter_key)

    def close(self) -> None:
        """At shutdown, once no step runs any more: end the adapter loader and grammar compile threads."""
        self.lora.close()
        self.grammars.close()

    def release_retired(self) -> None:
        """Free the retired versions no request references any more (slot, CPU weights, cached KV)."""
        for key in [k for k in self._retired if not self.lora.in_use(k)]:
            self.lora.free_version(key)
            self.blocks.drop_cached(key)  # its cached K/V must never serve anything else
            self._retired.discard(key)


def _adapter_ids(requests) -> tuple[str, ...]:
    return tuple(sorted({r.adapter_id for r in requests if r.adapter_id}))
