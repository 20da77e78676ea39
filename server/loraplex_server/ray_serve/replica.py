"""The replica deployment: one Loraplex engine per replica, adapters placed by Serve's multiplexing.

Serve routes a request sent with ``multiplexed_model_id=X`` to a replica that already holds X
(one that is not at ``max_ongoing_requests``), else to one holding the fewest adapters, which then
loads X. Each replica reports what it holds to Serve (that is what routing reads) and, through
``record_routing_stats``, to whoever asks. A failed call returns (or, streaming, yields last) a
``ReplicaStatusError`` rather than raising it (see ``status``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from loraplex.v1 import loraplex_pb2 as pb

from ..config import Config
from .service import ReplicaService
from .status import Metadata, ReplicaStatusError


class LoraplexReplica:
    def __init__(self, config: Config, adapters_per_replica: int):
        cache = serve.multiplexed(max_num_models_per_replica=adapters_per_replica)
        self.service = ReplicaService(config, cache)

    async def generate(self, request: pb.GenerateRequest,
                       metadata: Metadata = ()) -> pb.GenerateResponse | ReplicaStatusError:
        return await self.service.generate(request, metadata)

    async def generate_stream(self, request: pb.GenerateRequest, metadata: Metadata = ()
                              ) -> AsyncIterator[pb.GenerateStreamResponse | ReplicaStatusError]:
        async for chunk in self.service.generate_stream(request, metadata):
            yield chunk

    async def server_info(self, request: pb.GetServerInfoRequest,
                          metadata: Metadata = ()) -> pb.GetServerInfoResponse | ReplicaStatusError:
        return await self.service.server_info(request, metadata)

    def serving(self) -> bool:
        return self.service.serving()

    def record_routing_stats(self) -> dict[str, Any]:
        """Polled by Serve for request routers: ``{"adapters": [ids held here], "requests": in flight}``."""
        return self.service.routing_stats()

    def __del__(self) -> None:
        """Serve calls this once the replica has drained (graceful shutdown)."""
        service = getattr(self, "service", None)
        if service is not None:
            service.close()
