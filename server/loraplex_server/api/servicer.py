"""The gRPC service: converts protobuf at the edge and calls the shared service layer.

Nothing here blocks the event loop: tokenization and adapter reads run in worker threads, engine
state is read on the engine thread (``EngineLoop.call``), and deltas arrive through async queues.
"""

from __future__ import annotations

import asyncio

from loraplex.v1 import loraplex_pb2 as pb
from loraplex.v1 import loraplex_pb2_grpc as pb_grpc

from .. import __version__
from ..engine.loop import merge_outputs
from ..errors import InvalidRequestError
from ..lora.ids import AdapterId
from . import convert
from .calls import RpcCall, ServingState, admin_rpc, check_final, start_call
from .service import LoraplexService


class LoraplexServicer(pb_grpc.LoraplexServiceServicer):
    def __init__(self, state: ServingState):
        self.state = state
        self.service = LoraplexService(state)

    # ---- generation -------------------------------------------------------------------------
    def _deltas(self, request: pb.GenerateRequest, call: RpcCall):
        self.state.engine_loop()  # UNAVAILABLE while loading or draining, before anything else
        call.request_id = convert.request_id_of(request)
        adapter_id = AdapterId(request.adapter_id) if request.adapter_id else None
        self.service.check_model(call, adapter_id)  # NOT_FOUND before the prompt's own errors
        prompt = convert.prompt_from_proto(request)
        sampling = convert.sampling_from_proto(request.sampling)
        return self.service.generate(call, prompt, sampling, adapter_id)

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
        adapter_id = AdapterId(convert.check_id("adapter_id", request.adapter_id))
        if not request.source:
            raise InvalidRequestError("source", "is required")
        info = await self.service.load_adapter(call, adapter_id, request.source, request.pin)
        return pb.LoadAdapterResponse(adapter=convert.adapter_info(info))

    @admin_rpc
    async def UnloadAdapter(self, request, call):
        adapter_id = AdapterId(convert.check_id("adapter_id", request.adapter_id))
        await self.service.unload_adapter(call, adapter_id)
        return pb.UnloadAdapterResponse()

    @admin_rpc
    async def ListAdapters(self, request, call):
        visible, unrestored = await self.service.list_adapters(call)
        return pb.ListAdaptersResponse(adapters=[convert.adapter_info(i) for i in visible] +
                                       [convert.unrestored_adapter_info(e, err) for e, err in unrestored])

    @admin_rpc
    async def GetServerInfo(self, request, call):
        info = self.state.engine_loop().server_info()
        return pb.GetServerInfoResponse(
            model=info.model, dtype=info.dtype, device=info.device, max_loras=info.max_loras,
            max_lora_rank=info.max_lora_rank, context_length=info.context_length, version=__version__,
            max_cpu_loras=info.max_cpu_loras, kv_cache_tokens=info.kv_cache_tokens,
            prefix_caching=info.prefix_caching, lora_pool_rows=info.lora_pool_rows,
            lora_pool_bytes=info.lora_pool_bytes, kv_cache_bytes=info.kv_cache_bytes, memory_pool=info.memory_pool)
