"""A request's last delta carries the domain error it ended with; ``check_final`` raises it and the
status table maps it, with the same codes as when the engine sent a kind string."""

from __future__ import annotations

import grpc
import pytest

from loraplex_server.api.calls import Call, ServingState, check_final
from loraplex_server.api.errors import status_for
from loraplex_server.engine.request import FinishReason, RequestOutput
from loraplex_server.errors import (AdapterUnavailableError, EngineFailure, EngineStoppedError,
                                    InvalidRequestError)
from loraplex_server.metrics import Metrics


def final(reason: FinishReason, error=None) -> RequestOutput:
    return RequestOutput("r", (), "", finished=True, finish_reason=reason, error=error)


@pytest.mark.parametrize("error, code", [
    (AdapterUnavailableError("a", "disk gone"), grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidRequestError("sampling.regex", "too complex"), grpc.StatusCode.INVALID_ARGUMENT),
    (EngineFailure("internal error in the engine step (request id r): boom"), grpc.StatusCode.INTERNAL),
])
def test_the_engine_error_is_raised_as_is_and_keeps_its_status(error, code):
    with pytest.raises(type(error)) as raised:
        check_final(final(FinishReason.ERROR, error))
    assert raised.value is error and status_for(raised.value) is code


def test_an_error_finish_without_an_error_is_an_engine_failure_and_an_abort_is_unavailable():
    with pytest.raises(EngineFailure):
        check_final(final(FinishReason.ERROR))
    with pytest.raises(EngineStoppedError) as aborted:
        check_final(final(FinishReason.ABORT))
    assert status_for(aborted.value) is grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("reason", [FinishReason.LENGTH, FinishReason.STOP, FinishReason.EOS])
def test_a_normal_finish_raises_nothing(reason):
    check_final(final(reason))


def test_an_engine_failure_is_shown_to_the_client_by_its_message_other_internal_errors_are_not():
    call = Call("Generate", ServingState(metrics=Metrics()), ())
    failure = call.failure(EngineFailure("internal error in the engine step (request id r): boom"))
    assert failure.code is grpc.StatusCode.INTERNAL and failure.message.endswith("boom")
    hidden = call.failure(RuntimeError("secret detail"))
    assert hidden.code is grpc.StatusCode.INTERNAL and "secret" not in hidden.message
