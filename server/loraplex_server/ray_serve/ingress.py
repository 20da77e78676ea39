"""The ingress deployment behind Serve's gRPC proxy: ``loraplex.v1.LoraplexService`` and
``grpc.health.v1.Health``, so the same ``loraplex`` client works against one server or a cluster.

Serve's proxy calls the method named like the RPC with the request message (and
``grpc_context``). Generation is sent on to the replica deployment with
``multiplexed_model_id=request.adapter_id``, so Serve picks a replica that already holds the
adapter. Adapter management is per replica and not offered here: those RPCs answer UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import logging

from grpc_health.v1 import health_pb2
from ray.serve.handle import DeploymentHandle

from loraplex.v1 import loraplex_pb2 as pb

from .status import ReplicaStatusError, forwarded_metadata

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LoraplexService"].full_name
HEALTH_TIMEOUT_S = 5.0
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_MANAGED_ON_DEMAND = ("adapters load on demand on the replicas that Serve routes them to (from the adapter "
                      "root or the configured adapters); add one there instead")


def unimplemented(method: str, reason: str) -> ReplicaStatusError:
    details = f"{method} is not available through the Ray Serve ingress: {reason}"
    return ReplicaStatusError("UNIMPLEMENTED", details)


class LoraplexIngress:
    def __init__(self, replicas: DeploymentHandle):
        self.replicas = replicas

    def _to_adapter(self, adapter_id: str, stream: bool = False) -> DeploymentHandle:
        return self.replicas.options(multiplexed_model_id=adapter_id, stream=stream)

    # ---- generation -------------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, grpc_context=None) -> pb.GenerateResponse:
        result = await self._to_adapter(request.adapter_id).generate.remote(
            request, forwarded_metadata(grpc_context))
        return _answer(result, grpc_context, pb.GenerateResponse)

    async def GenerateStream(self, request: pb.GenerateRequest, grpc_context=None):
        """A failure is raised, not returned: Serve sends a stream's status only with an exception."""
        chunks = self._to_adapter(request.adapter_id, stream=True).generate_stream.remote(
            request, forwarded_metadata(grpc_context))
        async for item in chunks:  # type: ignore[union-attr]  # stream=True: a response generator
            if isinstance(item, ReplicaStatusError):
                item.apply(grpc_context)
                raise item
            yield item

    async def GetServerInfo(self, request: pb.GetServerInfoRequest,
                            grpc_context=None) -> pb.GetServerInfoResponse:
        """Any replica answers: they all run the same model and settings."""
        result = await self.replicas.server_info.remote(request, forwarded_metadata(grpc_context))
        return _answer(result, grpc_context, pb.GetServerInfoResponse)

    # ---- adapter management: per replica, so not here ----------------------------------------
    async def ListAdapters(self, request, grpc_context=None) -> pb.ListAdaptersResponse:
        status = unimplemented("ListAdapters", "each replica holds its own adapters; " + _MANAGED_ON_DEMAND)
        return _answer(status, grpc_context, pb.ListAdaptersResponse)

    async def LoadAdapter(self, request, grpc_context=None) -> pb.LoadAdapterResponse:
        return _answer(unimplemented("LoadAdapter", _MANAGED_ON_DEMAND), grpc_context, pb.LoadAdapterResponse)

    async def UnloadAdapter(self, request, grpc_context=None) -> pb.UnloadAdapterResponse:
        return _answer(unimplemented("UnloadAdapter", _MANAGED_ON_DEMAND), grpc_context, pb.UnloadAdapterResponse)

    # ---- grpc.health.v1 -----------------------------------------------------------------------
    async def _serving(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self.replicas.serving.remote(), HEALTH_TIMEOUT_S))
        except Exception as exc:  # noqa: BLE001 - any failure to reach a replica means not serving
            log.warning("health check: no replica answered: %s", exc)
            return False

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    grpc_context=None) -> health_pb2.HealthCheckResponse:
        if request.service not in ("", SERVICE_NAME):
            status = ReplicaStatusError("NOT_FOUND", f"unknown service {request.service!r}")
            return _answer(status, grpc_context, health_pb2.HealthCheckResponse)
        return health_pb2.HealthCheckResponse(status=_SERVING if await self._serving() else _NOT_SERVING)

    async def List(self, request, grpc_context=None) -> health_pb2.HealthListResponse:
        status = health_pb2.HealthCheckResponse(status=_SERVING if await self._serving() else _NOT_SERVING)
        return health_pb2.HealthListResponse(statuses={"": status, SERVICE_NAME: status})

    async def Watch(self, request, grpc_context=None):
        """Raised, like GenerateStream's errors: a stream's status travels only with an exception."""
        status = unimplemented("Health/Watch", "poll Health/Check instead")
        status.apply(grpc_context)
        raise status
        yield  # unreachable; makes this an async generator, as Serve calls a server-streaming method


def _answer(result, grpc_context, response_type):
    """A replica's response, or its failure set on Serve's context with an empty response."""
    if isinstance(result, ReplicaStatusError):
        result.apply(grpc_context)
        return response_type()
    return result
