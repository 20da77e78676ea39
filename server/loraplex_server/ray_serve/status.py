"""gRPC statuses across the replica -> ingress hop.

A replica runs the regular ``LoraplexServicer``, which ends a failed RPC with
``await context.abort(code, details)``. There is no gRPC call on a replica, so the servicer gets a
``ForwardedContext``: the caller's metadata in, and ``abort`` raising ``ReplicaStatusError``. The
replica hands that status to the ingress as a value (the return value, or a stream's last item),
not as a raised exception: Serve logs a traceback for every exception a replica raises, and a
NOT_FOUND is the client's error, not the server's. The ingress sets it on Serve's gRPC context.
Everything here is Ray-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

Metadata = tuple[tuple[str, str], ...]


class ReplicaStatusError(Exception):
    """A non-OK gRPC status decided on a replica (``code`` is a ``grpc.StatusCode`` name)."""

    def __init__(self, code: str, details: str, trailing_metadata: Metadata = ()):
        super().__init__(code, details, trailing_metadata)  # args round-trip through pickle
        self.code, self.details, self.trailing_metadata = code, details, tuple(trailing_metadata)

    @property
    def status_code(self) -> grpc.StatusCode:
        return grpc.StatusCode[self.code]

    def __str__(self) -> str:
        return f"{self.code}: {self.details}"

    def apply(self, grpc_context) -> None:
        """Set this status on Serve's ``RayServegRPCContext`` (what the proxy answers with)."""
        grpc_context.set_code(self.status_code)
        grpc_context.set_details(self.details)
        if self.trailing_metadata:
            grpc_context.set_trailing_metadata(list(self.trailing_metadata))


def forwarded_metadata(grpc_context) -> Metadata:
    """The caller's metadata to send on to a replica (``authorization`` is what the servicer reads)."""
    if grpc_context is None:
        return ()
    return tuple((str(k), v if isinstance(v, str) else v.decode("latin-1"))
                 for k, v in grpc_context.invocation_metadata())


class ForwardedContext:
    """The part of ``grpc.aio.ServicerContext`` the servicer uses, for a call forwarded by the ingress."""

    def __init__(self, metadata: Sequence[tuple[str, Any]] = ()):
        self._metadata = tuple(metadata)
        self._trailing: Metadata = ()

    def invocation_metadata(self) -> Metadata:
        return self._metadata

    def set_trailing_metadata(self, metadata) -> None:
        self._trailing = tuple(metadata)

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise ReplicaStatusError(code.name, details, self._trailing)
