"""One replica's Loraplex: the engine loop on the model and the regular servicer in front of it.

Requests arrive as the protobuf messages the ingress received plus the caller's metadata; they go
through ``LoraplexServicer`` exactly as on a single server (authentication, tenant limits,
validation, conversion, the RPC log line), so a cluster answers what one server answers. No Ray
here: ``replica.LoraplexReplica`` wraps this class in a Serve deployment, and tests drive it alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future
from typing import Any

from loraplex.v1 import loraplex_pb2 as pb

from ..api import access
from ..api.calls import start_call
from ..api.servicer import LoraplexServicer
from ..api.startup import EngineFactory, bring_up_engine, serving_state
from ..config import Config
from ..engine.engine import LLMEngine
from ..errors import LoraplexError
from ..lora.ids import AdapterId
from .adapters import AdapterCatalog, LoadedAdapter, ReplicaAdapters
from .status import ForwardedContext, Metadata, ReplicaStatusError

log = logging.getLogger(__name__)
AdapterLoader = Callable[[str], Awaitable[LoadedAdapter]]
# Wraps the adapter loader in a cache; in a replica: serve.multiplexed(max_num_models_per_replica=N).
AdapterCache = Callable[[AdapterLoader], AdapterLoader]


class ReplicaService:
    def __init__(self, config: Config, adapter_cache: AdapterCache, engine_factory: EngineFactory = LLMEngine):
        self.state = serving_state(config)
        self.loop = bring_up_engine(config, self.state, engine_factory)  # adapters load on first use
        self.state.loop = self.loop
        self.servicer = LoraplexServicer(self.state)
        self.catalog = AdapterCatalog(config.server.adapters, config.engine.lora.adapter_root)
        self.adapters = ReplicaAdapters(self._unpublish)
        self._removals: dict[str, Future] = {}  # adapter id -> its unpublish, done on the engine thread

        async def load_adapter(adapter_id: str) -> LoadedAdapter:  # a function: Serve keeps its cache on it
            return await self._load_adapter(adapter_id)

        self.get_adapter: AdapterLoader = adapter_cache(load_adapter)

    # ---- adapters ---------------------------------------------------------------------------
    async def _load_adapter(self, adapter_id: str) -> LoadedAdapter:
        """A cache miss: publish the adapter on this replica's engine, weights read (eager)."""
        if not self.adapters.keep(adapter_id):
            source = self.catalog.source_of(adapter_id)
            removal = self._removals.pop(adapter_id, None)
            if removal is not None:  # evicted a moment ago: let that finish, or it would remove this load
                await asyncio.wrap_future(removal)
            owner = access.owner_of(adapter_id)
            await asyncio.to_thread(self.loop.add_adapter, AdapterId(adapter_id), source, owner=owner)
            self.adapters.added(adapter_id)
            log.info("adapter loaded on this replica", extra={"fields": {"adapter": adapter_id}})
        return LoadedAdapter(adapter_id, self.adapters)

    def _unpublish(self, adapter_id: str) -> None:
        try:
            removal = self.loop.remove_adapter(AdapterId(adapter_id))  # accepted requests finish on it first
        except LoraplexError as exc:
            log.warning("could not unload adapter %s: %s", adapter_id, exc)
            return
        self._removals[adapter_id] = removal
        removal.add_done_callback(lambda done: self._forget_removal(adapter_id, done))

    def _forget_removal(self, adapter_id: str, done: Future) -> None:
        if self._removals.get(adapter_id) is done:
            self._removals.pop(adapter_id, None)

    async def _ensure_adapter(self, method: str, adapter_id: str, context: ForwardedContext) -> None:
        """Authenticate, check the adapter exists and is visible, then load it here if this replica
        lacks it. Failures end the call like the servicer's own (status, RPC log line, metric)."""
        if not adapter_id:
            return
        call = await start_call(method, self.state, context, adapter_id)
        try:
            access.check_visible(call.principal, adapter_id, access.owner_of(adapter_id))
            self.catalog.source_of(adapter_id)  # NOT_FOUND before Serve's cache counts it as loading
            await self.get_adapter(adapter_id)
        except Exception as exc:  # noqa: BLE001 - mapped to a status code in one place
            await call.fail(context, exc)  # type: ignore[arg-type]  # ForwardedContext: the part of it fail uses

    # ---- RPCs (the ingress calls these; a failure comes back as a ReplicaStatusError value) -----
    async def generate(self, request: pb.GenerateRequest,
                       metadata: Metadata = ()) -> pb.GenerateResponse | ReplicaStatusError:
        context = ForwardedContext(metadata)
        try:
            with self.adapters.holding(request.adapter_id):
                await self._ensure_adapter("Generate", request.adapter_id, context)
                return await self.servicer.Generate(request, context)
        except ReplicaStatusError as status:
            return status

    async def generate_stream(self, request: pb.GenerateRequest, metadata: Metadata = ()
                              ) -> AsyncIterator[pb.GenerateStreamResponse | ReplicaStatusError]:
        """Chunks; a failure is the last item."""
        context = ForwardedContext(metadata)
        try:
            with self.adapters.holding(request.adapter_id):
                await self._ensure_adapter("GenerateStream", request.adapter_id, context)
                async for chunk in self.servicer.GenerateStream(request, context):
                    yield chunk
        except ReplicaStatusError as status:
            yield status

    async def server_info(self, request: pb.GetServerInfoRequest,
                          metadata: Metadata = ()) -> pb.GetServerInfoResponse | ReplicaStatusError:
        try:
            return await self.servicer.GetServerInfo(request, ForwardedContext(metadata))
        except ReplicaStatusError as status:
            return status

    def serving(self) -> bool:
        return self.state.loop is not None and not self.state.draining

    def routing_stats(self) -> dict[str, Any]:
        """Adapters published here and requests in flight on this replica's engine."""
        return {"adapters": self.adapters.published(), "requests": self.loop.num_in_flight}

    def close(self) -> None:
        """Refuse new requests, abort what is in flight, stop the engine thread and its workers."""
        self.state.draining = True
        self.loop.shutdown()
