"""Domain exceptions -> gRPC status codes, in one place. Unknown exceptions are INTERNAL."""

from __future__ import annotations

import grpc

from .. import errors as e
from .. import tenancy as t

_CODES: list[tuple[type[Exception], grpc.StatusCode]] = [
    (e.PromptTooLongError, grpc.StatusCode.INVALID_ARGUMENT),
    (e.InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (e.AdapterNotFoundError, grpc.StatusCode.NOT_FOUND),
    (e.AdapterSourceUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (e.AdapterLoadError, grpc.StatusCode.INVALID_ARGUMENT),
    (e.AdapterPinError, grpc.StatusCode.FAILED_PRECONDITION),
    (e.AdapterUnavailableError, grpc.StatusCode.FAILED_PRECONDITION),
    (e.DuplicateRequestError, grpc.StatusCode.ALREADY_EXISTS),
    (e.QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (t.RateLimitError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (t.AuthenticationError, grpc.StatusCode.UNAUTHENTICATED),
    (t.PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (e.EngineStoppedError, grpc.StatusCode.UNAVAILABLE),
    (e.GuidedDecodingUnavailableError, grpc.StatusCode.FAILED_PRECONDITION),
]


def status_for(exc: Exception) -> grpc.StatusCode:
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL
