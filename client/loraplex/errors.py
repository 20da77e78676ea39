"""Exceptions raised by the Loraplex client.

Every gRPC failure surfaces as a :class:`LoraplexError` subclass chosen by its status code;
the original ``grpc.RpcError`` is kept as ``__cause__``.
"""

from __future__ import annotations

from typing import Any

import grpc

__all__ = [
    "CancelledError",
    "DeadlineExceededError",
    "InvalidArgumentError",
    "LoraplexError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "ServerError",
    "UnavailableError",
    "from_rpc_error",
]

RETRY_AFTER_KEY = "retry-after-s"


class LoraplexError(Exception):
    """A failed call: ``code`` is the ``grpc.StatusCode``, ``details`` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        super().__init__(f"{code.name}: {details}" if details else code.name)
        self.code = code
        self.details = details


class InvalidArgumentError(LoraplexError):
    """The request was refused as malformed or out of range (INVALID_ARGUMENT, OUT_OF_RANGE)."""


class NotFoundError(LoraplexError):
    """The adapter (or other named resource) does not exist (NOT_FOUND)."""


class ResourceExhaustedError(LoraplexError):
    """The server is at capacity (RESOURCE_EXHAUSTED).

    ``retry_after`` is the server's suggested wait in seconds (trailing metadata
    ``retry-after-s``), or ``None`` if it sent none.
    """

    def __init__(self, code: grpc.StatusCode, details: str = "",
                 retry_after: float | None = None) -> None:
        super().__init__(code, details)
        self.retry_after = retry_after


class UnavailableError(LoraplexError):
    """The server could not be reached or is shutting down (UNAVAILABLE)."""


class DeadlineExceededError(LoraplexError):
    """The call's deadline passed before it finished (DEADLINE_EXCEEDED)."""


class CancelledError(LoraplexError):
    """The call was cancelled (CANCELLED)."""


class PermissionDeniedError(LoraplexError):
    """Missing or rejected credentials (PERMISSION_DENIED, UNAUTHENTICATED)."""


class ServerError(LoraplexError):
    """A server-side failure (INTERNAL) or any status without a more specific class."""


_CLASSES: dict[grpc.StatusCode, type[LoraplexError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: PermissionDeniedError,
}


def status_code_of(err: grpc.RpcError) -> grpc.StatusCode:
    """The status code of an RPC error (``UNKNOWN`` for errors that carry none)."""
    code = getattr(err, "code", None)
    value = code() if callable(code) else None
    return value if isinstance(value, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def _details_of(err: grpc.RpcError) -> str:
    details = getattr(err, "details", None)
    if not callable(details):  # a bare RpcError: its message is all there is
        return str(err)
    value = details()
    return "" if value is None else str(value)


def _retry_after_of(err: grpc.RpcError) -> float | None:
    trailing = getattr(err, "trailing_metadata", None)
    metadata: Any = trailing() if callable(trailing) else None
    for key, value in metadata or ():
        if key.lower() == RETRY_AFTER_KEY:
            try:
                seconds = float(value.decode() if isinstance(value, bytes) else value)
            except ValueError:
                return None
            return seconds if seconds >= 0 else None
    return None


def from_rpc_error(err: grpc.RpcError) -> LoraplexError:
    """Map a ``grpc.RpcError`` (sync or ``grpc.aio``) to the matching :class:`LoraplexError`."""
    code = status_code_of(err)
    details = _details_of(err)
    cls = _CLASSES.get(code, ServerError)
    if cls is ResourceExhaustedError:
        return ResourceExhaustedError(code, details, retry_after=_retry_after_of(err))
    return cls(code, details)
