"""The service layer both front ends call (gRPC servicer, OpenAI-compatible HTTP routes).

It speaks engine types only (Prompt, SamplingParams, RequestOutput, AdapterInfo): the front ends
convert their wire types at their edge and map the domain errors raised here to their statuses
(``calls.Call.failure``). Tenancy (visibility, namespaces), tenant limits, persistence of loaded
adapters and the adapter-load metrics live here, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

from ..engine.loop import EngineLoop
from ..engine.request import Prompt, RequestOutput, SamplingParams
from ..errors import AdapterLoadError, AdapterNotFoundError
from ..lora.ids import AdapterId
from ..lora.weights import AdapterInfo
from . import access
from .adapter_store import StoredAdapter
from .calls import Call, ServingState


class LoraplexService:
    def __init__(self, state: ServingState):
        self.state = state

    # ---- generation -------------------------------------------------------------------------
    async def open(self, call: Call, prompt: Prompt, sampling: SamplingParams, adapter_id: AdapterId | None,
                   request_id: str | None = None) -> Generation:
        """Check access and tenant limits, then submit (``request_id``, default ``call.request_id``).

        Errors (NOT_FOUND, limits, queue full, a bad prompt) raise here, before any output."""
        loop = self.state.engine_loop()
        self.check_model(call, adapter_id)
        limiter = self.state.limiter
        assert limiter is not None  # set in ServingState.__post_init__
        ticket = limiter.admit(call.tenant)  # counts it queued (atomically with the check)
        try:
            stream = await asyncio.to_thread(loop.submit, prompt, sampling, adapter_id,
                                             request_id or call.request_id, call.tenant)
        except BaseException:
            ticket.release()
            raise
        return Generation(stream, ticket, call, self.state.metrics, loop.abort)

    async def generate(self, call: Call, prompt: Prompt, sampling: SamplingParams,
                       adapter_id: AdapterId | None) -> AsyncIterator[RequestOutput]:
        """Open, then the deltas; closing the iterator early aborts the request (KV freed)."""
        generation = await self.open(call, prompt, sampling, adapter_id)
        async for out in generation:
            yield out

    def check_model(self, call: Call, adapter_id: AdapterId | None) -> None:
        """NOT_FOUND unless ``adapter_id`` (None: the base model) is loaded and visible to the caller."""
        loop = self.state.engine_loop()
        if adapter_id:
            access.check_visible(call.principal, adapter_id, loop.adapter_owner(adapter_id))

    # ---- adapters ---------------------------------------------------------------------------
    async def load_adapter(self, call: Call, adapter_id: AdapterId, source: str, pin: bool = False) -> AdapterInfo:
        """Load (or hot-swap) an adapter inside the caller's namespace; persisted with --state-dir."""
        access.check_may_manage(call.principal, adapter_id)
        loop = self.state.engine_loop()
        async with self._one_change_at_a_time(adapter_id):
            await self._load(loop, adapter_id, source)
            if pin:
                await asyncio.wrap_future(loop.pin_adapter(adapter_id))
            info = await self.adapter_info(loop, adapter_id)
            await self._persist(StoredAdapter(adapter_id, source, info.version, info.pinned, info.owner))
        return info

    @contextlib.asynccontextmanager
    async def _one_change_at_a_time(self, adapter_id: str):
        """Load / unload of one id, one at a time across front ends, so that the engine's registry and
        the state dir see them in the same order (a load's row can never outlive a later unload)."""
        locks = self.state.admin_locks
        lock, users = locks.get(adapter_id, (asyncio.Lock(), 0))
        locks[adapter_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = locks[adapter_id]
            if users == 1:
                del locks[adapter_id]
            else:
                locks[adapter_id] = (lock, users - 1)

    async def _persist(self, entry: StoredAdapter) -> None:
        """Record a registration in the state dir, if there is one."""
        self.state.restore_failures.pop(entry.adapter_id, None)
        if self.state.store is not None:
            await asyncio.to_thread(self.state.store.put, entry)

    async def _forget(self, adapter_id: str) -> None:
        """Remove a registration from the state dir, if there is one."""
        self.state.restore_failures.pop(adapter_id, None)
        if self.state.store is not None:
            await asyncio.to_thread(self.state.store.remove, adapter_id)

    async def _load(self, loop: EngineLoop, adapter_id: AdapterId, source: str) -> None:
        start = time.perf_counter()
        try:
            await asyncio.to_thread(loop.add_adapter, adapter_id, source, owner=access.owner_of(adapter_id))
        except AdapterLoadError:
            self.state.metrics.adapter_load_failures.inc()
            raise
        self.state.metrics.adapter_load_seconds.observe(time.perf_counter() - start)

    @staticmethod
    async def adapter_info(loop: EngineLoop, adapter_id: AdapterId | None = None):
        """All adapters' AdapterInfo (engine thread), or the one of ``adapter_id``."""
        infos = await asyncio.wrap_future(loop.adapter_infos())
        if adapter_id is None:
            return infos
        for info in infos:
            if info.meta.adapter_id == adapter_id:
                return info
        raise AdapterNotFoundError(adapter_id)  # unloaded by a concurrent UnloadAdapter

    async def unload_adapter(self, call: Call, adapter_id: AdapterId) -> None:
        access.check_may_manage(call.principal, adapter_id)
        loop = self.state.engine_loop()
        async with self._one_change_at_a_time(adapter_id):
            if adapter_id not in self.state.restore_failures or loop.has_adapter(adapter_id):
                await asyncio.wrap_future(loop.remove_adapter(adapter_id))
            await self._forget(adapter_id)

    async def list_adapters(self, call: Call) -> tuple[list[AdapterInfo], list[tuple[StoredAdapter, str]]]:
        """The adapters the caller may see, and the stored ones that failed to restore at start-up."""
        infos = await self.adapter_info(self.state.engine_loop())
        visible = [i for i in infos if access.can_see(call.principal, i.owner)]
        unrestored = [(entry, error) for entry, error in self.state.restore_failures.values()
                      if access.can_see(call.principal, entry.owner)]
        return visible, unrestored

    def model_name(self) -> str:
        return self.state.engine_loop().server_info().model

    def decoder(self) -> Callable[[list[int]], str]:
        """Token ids -> text, usable until the request ends (even once the server drains)."""
        return self.state.engine_loop().decode


class Generation:
    """One submitted request: async-iterate its deltas once (the tenant's queue count and token
    window kept up to date), or ``cancel()`` it (aborted in the engine, its KV freed)."""

    def __init__(self, stream, ticket, call: Call, metrics, abort):
        self.stream, self.ticket, self.call = stream, ticket, call
        self._metrics, self._abort = metrics, abort

    @property
    def request_id(self) -> str:
        return self.stream.request_id

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            async for out in self.stream:
                if out.token_ids or out.finished:
                    self.ticket.started()
                self.ticket.record_tokens(len(out.token_ids))
                if out.finished:
                    self._metrics.record_tenant_request(self.call.tenant, out)
                yield out
        finally:
            self.ticket.release()

    def cancel(self) -> None:
        """Abort (if not finished) and give the tenant's slot back; safe to call more than once."""
        if not self.stream.finished:
            self._abort(self.stream.request_id)
        self.ticket.release()
