"""Continuous batching policy (pure Python, no torch).

Each step packs running requests first (decodes and unfinished prefill chunks, oldest first), then
admits waiting requests in arrival order (FCFS; across tenants, optionally by Virtual Token
Counter, see fairness.py; a request whose adapter is loading or whose grammar is compiling is
passed over and keeps its place) while the token budget, the running-sequence cap,
the KV blocks and the LoRA caps allow: at most ``max_loras`` distinct adapters, whose rows (with
the pinned and running ones) fit the LoRA weight pool (``lora_fits``; on the unified memory pool
it places the adapter's pages then and there, so one allocator arbitrates KV blocks and adapters).
Admission stops at the first waiting request that does not fit, so nothing behind it can starve
it, with one bounded exception (adapter affinity): a request kept out only by a LoRA cap may be
passed over by later requests whose adapters are already in the batch, for at most ``max_slot_bypass_steps`` steps;
then admission stops at it again until a slot (or rows) frees. When a running request
needs a KV block and none is free, the most recently admitted request is preempted: its blocks
are freed and it returns to the head of the queue to be recomputed later (nothing is lost).

With prefix caching (kv_blocks.py), a request admitted starts after its longest cached prefix:
only the uncached tokens are computed and counted against the step's token budget.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..config import SchedulerConfig
from ..lora.ids import VersionKey
from .fairness import FcfsOrder, VirtualTokenCounter
from .kv_blocks import BlockManager
from .request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens computed this step (a prefill chunk, or 1 for a decode)
    samples: bool = False  # this step reaches the request's last token, so a new token is sampled

    @classmethod
    def of(cls, request: Request, num_new_tokens: int) -> ScheduledRequest:
        reaches_end = request.num_computed_tokens + num_new_tokens == request.num_tokens
        return cls(request, num_new_tokens, reaches_end)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def adapter_keys(self) -> set[VersionKey]:
        """Adapter version keys used by this step."""
        return {s.request.adapter_key for s in self.scheduled if s.request.adapter_key}


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager, max_loras: int,
                 key_ready: Callable[[VersionKey], bool] = lambda _key: True,
                 reserved_keys: Callable[[], set[VersionKey]] = set,
                 fairness: FcfsOrder | VirtualTokenCounter | None = None,
                 lora_fits: Callable[[set[VersionKey]], bool] = lambda _keys: True):
        self.config = config
        self.blocks = blocks
        self.max_loras = max_loras
        self.key_ready = key_ready  # the version's weights are in memory
        self.reserved_keys = reserved_keys  # pinned: they hold device slots while idle
        self.lora_fits = lora_fits  # these adapter versions' rows fit the LoRA weight pool together
        self.fairness = fairness or FcfsOrder()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self._membership_changed = True  # a request came or left since the last refresh

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)
        self._membership_changed = True

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def running_adapter_keys(self) -> set[VersionKey]:
        """Adapter versions held by running requests: their device slots must not be evicted."""
        return {r.adapter_key for r in self.running if r.adapter_key}

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        if self._membership_changed:  # the same requests (waiting or running) have the same tenants
            self.fairness.refresh(self.waiting, self.running)
            self._membership_changed = False
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not out.preempted:
            self._admit_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        block_size = self.blocks.block_size
        decoding_tenants: list[str] = []  # one output token each: charged as a tally
        others: list[ScheduledRequest] = []
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            computed = request.num_computed_tokens
            remaining = request.num_tokens - computed
            # one token left (a decode, or a prefill's last one-token chunk), room in its last block
            if remaining == 1 and computed < len(request.block_ids) * block_size:
                scheduled = ScheduledRequest(request, 1, True)
                if request.output_token_ids:  # its one token is an output token's input: a decode
                    decoding_tenants.append(request.tenant)
                else:
                    others.append(scheduled)
                out.scheduled.append(scheduled)
                budget -= 1
                i += 1
                continue
            n = min(remaining, budget)
            while not self.blocks.allocate(request, n):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is request:
                    break
            else:
                out.scheduled.append(ScheduledRequest.of(request, n))
                others.append(out.scheduled[-1])
                budget -= n
                i += 1
        # charged before admission, which reads the counters (a victim is always later in the
        # running list than the request that needed its blocks: it was never scheduled)
        self.fairness.charge_decodes(decoding_tenants)
        self.fairness.charge_all((s.request, s.num_new_tokens) for s in others)
        return budget

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        """FCFS admission. A request whose adapter is still loading is passed over (it keeps its
        place); one that would exceed a LoRA cap (distinct adapters, pool rows) is passed over for a bounded number
        of steps (only requests for adapters already in the batch can follow it), then stops
        admission (no starvation)."""
        if not self.waiting:
            return
        adapters = self.running_adapter_keys()
        reserved = self.reserved_keys()
        for request in self.fairness.candidates(self.waiting):
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            if not request.guide_ready:  # its grammar is still compiling: keeps its place
                continue
            key = request.adapter_key
            if key and key not in adapters:
                wanted = adapters | reserved | {key}
                if len(wanted) > self.max_loras or not self.lora_fits(wanted):
                    request.slot_waits += 1
                    if request.slot_waits > self.config.max_slot_bypass_steps:
                        break
                    continue
                if not self.key_ready(key):
                    continue
            hit = self.blocks.lookup(request)  # its cached prefix is not computed, nor charged
            n = min(request.num_tokens - hit.num_tokens, budget)
            if not self.blocks.admit(request, n, hit):
                break
            self.waiting.remove(request)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            if key:
                adapters.add(key)
            self._take(out, request, n)
            budget -= n

    def _take(self, out: SchedulerOutput, request: Request, n: int) -> None:
        out.scheduled.append(ScheduledRequest.of(request, n))
        self.fairness.charge(request, n)

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.running.remove(request)
        self.blocks.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        out.preempted.append(request)

    def after_step(self, out: SchedulerOutput) -> None:
        """Record that the scheduled tokens' K/V are now in the cache (full blocks: cached for reuse)."""
        for s in out.scheduled:
            s.request.num_computed_tokens += s.num_new_tokens
            self.blocks.publish(s.request)

    def finish(self, request: Request) -> None:
        """Remove a finished or aborted request wherever it is and free its blocks."""
        self._membership_changed = True
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.blocks.free(request)
        request.status = RequestStatus.FINISHED
