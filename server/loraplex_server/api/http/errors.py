"""Domain errors -> OpenAI's error JSON with the HTTP status of our gRPC table (``api/errors.py``).

``{"error": {"message", "type", "param", "code"}}``; 429 carries ``Retry-After`` (seconds); 500 names
the request id only.
"""

from __future__ import annotations

import math

import grpc
from starlette.responses import JSONResponse

from ...errors import AdapterNotFoundError, InvalidRequestError
from ..calls import Failure

# gRPC code -> (HTTP status, OpenAI error type)
HTTP_STATUS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.INTERNAL: (500, "internal_error"),
}
# engine field names (SamplingParams.validate) -> the request body's
_PARAMS = {"sampling.max_new_tokens": "max_tokens", "sampling.json_schema": "response_format",
           "sampling.json_object": "response_format", "sampling.regex": "guided_regex",
           "sampling.choice": "guided_choice", "sampling.grammar": "guided_grammar",
           "sampling.constraint": "response_format", "input": "prompt"}


def param_of(exc: Exception | None) -> str | None:
    if isinstance(exc, InvalidRequestError):
        return _PARAMS.get(exc.field, exc.field.removeprefix("sampling."))
    if isinstance(exc, AdapterNotFoundError):
        return "model"
    return None


def error_body(failure: Failure) -> tuple[int, dict]:
    status, kind = HTTP_STATUS.get(failure.code, (500, "internal_error"))
    code = "model_not_found" if isinstance(failure.exc, AdapterNotFoundError) else failure.code.name.lower()
    message = failure.message
    if isinstance(failure.exc, InvalidRequestError):  # "sampling.top_p: ..." -> "top_p: ..."
        message = f"{param_of(failure.exc)}: {message.partition(': ')[2]}"
    return status, {"error": {"message": message, "type": kind, "param": param_of(failure.exc), "code": code}}


def error_response(failure: Failure, request_id: str = "") -> JSONResponse:
    status, body = error_body(failure)
    headers = {"x-request-id": request_id} if request_id else {}
    if failure.retry_after_s is not None:
        headers["retry-after"] = str(max(1, math.ceil(failure.retry_after_s)))
    return JSONResponse(body, status_code=status, headers=headers)
