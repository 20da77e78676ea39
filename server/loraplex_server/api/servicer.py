"""The gRPC service: authenticates, validates and converts at the edge, talks to the engine loop.

Nothing here blocks the event loop: tokenization and adapter reads run in worker threads, engine
state is read on the engine thread (``EngineLoop.call``), and deltas arrive through async queues.
"""

from __future__ import annotations

import asyncio
import time

from loraplex.v1 import loraplex_pb2 as pb
from loraplex.v1 import loraplex_pb2_grpc as pb_grpc

from .. import __version__
from ..engine.loop import EngineLoop, merge_outputs
from ..errors import AdapterLoadError, AdapterNotFoundError, InvalidRequestError
from . import access, convert
from .adapter_store import StoredAdapter
from .calls import RpcCall, ServingState, admin_rpc, check_final, start_call


class LoraplexServicer(pb_grpc.LoraplexServiceServicer):
    def __init__(self, state: ServingState):
        self.state = state

    # ---- generation -------------------------------------------------------------------------
    async def _open(self, request: pb.GenerateRequest, call: RpcCall):
        """Check access and tenant limits, then submit; returns (stream, ticket)."""
        loop = self.state.engine_loop()
        call.request_id = convert.request_id_of(request)
        adapter_id = request.adapter_id or None
        if adapter_id:
            access.check_visible(call.principal, adapter_id, loop.engine.lora.resolve(adapter_id).owner)
        prompt = convert.prompt_from_proto(request)
        sampling = convert.sampling_from_proto(request.sampling)
        ticket = self.state.limiter.admit(call.tenant)  # counts it queued (atomically with the check)
        try:
            stream = await asyncio.to_thread(loop.submit, prompt, sampling, adapter_id, call.request_id,
                                             call.tenant)
        except BaseException:
            ticket.release()
            raise
        return stream, ticket

    async def _deltas(self, request: pb.GenerateRequest, call: RpcCall):
        """The request's deltas, keeping the tenant's queue count and token window up to date."""
        stream, ticket = await self._open(request, call)
        try:
            async for out in stream:
                if out.token_ids or out.finished:
                    ticket.started()
                ticket.record_tokens(len(out.token_ids))
                if out.finished:
                    self.state.metrics.record_tenant_request(call.tenant, out)
                yield out
        finally:
            ticket.release()

    async def Generate(self, request, context):
        call = await start_call("Generate", self.state, context, request.adapter_id)
        try:
            merged = merge_outputs([d async for d in self._deltas(request, call)])
            check_final(merged)
            call.ok(merged)
            return convert.full_response(merged, request.adapter_id)
        except asyncio.CancelledError:
            call.cancelled()
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status code in one place
            await call.fail(context, exc)

    async def GenerateStream(self, request, context):
        call = await start_call("GenerateStream", self.state, context, request.adapter_id)
        try:
            async for out in self._deltas(request, call):
                if out.finished:
                    check_final(out)
                    call.ok(out)
                yield convert.stream_chunk(out, request.adapter_id)
        except asyncio.CancelledError:
            call.cancelled()
            raise
        except Exception as exc:  # noqa: BLE001
            await call.fail(context, exc)

    # ---- adapters ---------------------------------------------------------------------------
    @admin_rpc
    async def LoadAdapter(self, request, call):
        adapter_id = convert.check_id("adapter_id", request.adapter_id)
        if not request.source:
            raise InvalidRequestError("source", "is required")
        access.check_may_manage(call.principal, adapter_id)
        loop = self.state.engine_loop()
        await self._load(loop, adapter_id, request.source)
        if request.pin:
            await asyncio.wrap_future(loop.call(lambda e: e.pin_adapter(adapter_id)))
        info = await self._info(loop, adapter_id)
        await self._persist(StoredAdapter(adapter_id, request.source, info.version, info.pinned, info.owner))
        return pb.LoadAdapterResponse(adapter=convert.adapter_info(info))

    async def _persist(self, entry: StoredAdapter | None, remove: str | None = None) -> None:
        """Record (or with ``remove``, forget) a registration in the state dir, if there is one."""
        self.state.restore_failures.pop(entry.adapter_id if entry else remove, None)
        if self.state.store is not None:
            if entry is not None:
                await asyncio.to_thread(self.state.store.put, entry)
            else:
                await asyncio.to_thread(self.state.store.remove, remove)

    async def _load(self, loop: EngineLoop, adapter_id: str, source: str) -> None:
        start = time.perf_counter()
        try:
            await asyncio.to_thread(loop.add_adapter, adapter_id, source, owner=access.owner_of(adapter_id))
        except AdapterLoadError:
            self.state.metrics.adapter_load_failures.inc()
            raise
        self.state.metrics.adapter_load_seconds.observe(time.perf_counter() - start)

    @staticmethod
    async def _info(loop: EngineLoop, adapter_id: str | None = None):
        infos = await asyncio.wrap_future(loop.call(lambda e: e.lora.info()))
        if adapter_id is None:
            return infos
        for info in infos:
            if info.meta.adapter_id == adapter_id:
                return info
        raise AdapterNotFoundError(adapter_id)  # unloaded by a concurrent UnloadAdapter

    @admin_rpc
    async def UnloadAdapter(self, request, call):
        adapter_id = convert.check_id("adapter_id", request.adapter_id)
        access.check_may_manage(call.principal, adapter_id)
        loop = self.state.engine_loop()
        if adapter_id not in self.state.restore_failures or loop.engine.lora.has_adapter(adapter_id):
            await asyncio.wrap_future(loop.remove_adapter(adapter_id))
        await self._persist(None, remove=adapter_id)
        return pb.UnloadAdapterResponse()

    @admin_rpc
    async def ListAdapters(self, request, call):
        infos = await self._info(self.state.engine_loop())
        visible = [convert.adapter_info(i) for i in infos if access.can_see(call.principal, i.owner)]
        unrestored = [convert.unrestored_adapter_info(entry, error) for entry, error in
                      self.state.restore_failures.values() if access.can_see(call.principal, entry.owner)]
        return pb.ListAdaptersResponse(adapters=visible + unrestored)

    @admin_rpc
    async def GetServerInfo(self, request, call):
        engine = self.state.engine_loop().engine
        cfg = engine.config
        return pb.GetServerInfoResponse(
            model=engine.loaded.name, dtype=str(engine.loaded.dtype).removeprefix("torch."),
            device=str(engine.loaded.device), max_loras=cfg.lora.max_loras,
            max_lora_rank=cfg.lora.max_lora_rank, context_length=engine.inputs.max_model_len,
            version=__version__, max_cpu_loras=cfg.lora.max_cpu_loras,
            kv_cache_tokens=engine.blocks.capacity_tokens, prefix_caching=engine.blocks.prefix_caching)
