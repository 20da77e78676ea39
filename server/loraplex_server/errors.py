"""Domain exceptions, raised where the problem is known and mapped to status codes at the API edge.

Any layer may raise these; only the API layer decides what a client sees.
"""

from __future__ import annotations


class LoraplexError(Exception):
    """Base of every error Loraplex raises on purpose."""


class InvalidRequestError(LoraplexError):
    """A request field has a bad value. ``field`` names it (e.g. ``sampling.top_p``)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class PromptTooLongError(InvalidRequestError):
    def __init__(self, num_tokens: int, limit: int, what: str):
        super().__init__("prompt", f"{num_tokens} tokens exceed the {what} of {limit} tokens")
        self.num_tokens = num_tokens
        self.limit = limit


class AdapterNotFoundError(LoraplexError):
    def __init__(self, adapter_id: str):
        super().__init__(f"adapter {adapter_id!r} is not loaded")
        self.adapter_id = adapter_id


class AdapterLoadError(LoraplexError):
    """An adapter was refused at load time; the message names the problem."""

    def __init__(self, adapter_id: str, message: str):
        super().__init__(f"adapter {adapter_id!r}: {message}")
        self.adapter_id = adapter_id
        self.reason = message


class AdapterSourceUnavailableError(AdapterLoadError):
    """Reading an adapter's files failed in a way that may pass (EIO, a vanished file, a timeout):
    retried with backoff; after the last attempt the client may retry (UNAVAILABLE)."""


class ModelLoadError(LoraplexError):
    """The base model could not be loaded (missing files, pickle weights, bad config)."""


class QueueFullError(LoraplexError):
    pass


class EngineStoppedError(LoraplexError):
    pass


class DuplicateRequestError(LoraplexError):
    def __init__(self, request_id: str):
        super().__init__(f"request id {request_id!r} is already in flight")
        self.request_id = request_id


class AdapterPinError(LoraplexError):
    """Pinning would leave no device slot for other adapters."""


class AdapterUnavailableError(LoraplexError):
    """A registered adapter's weights could not be loaded; its requests cannot run."""

    def __init__(self, adapter_id: str, reason: str):
        super().__init__(f"adapter {adapter_id!r} could not be loaded: {reason}")
        self.adapter_id = adapter_id


class EngineFailure(LoraplexError):
    """The engine ended a request with an internal error (a failed step, a broken grammar matcher);
    the message names the request, so it is shown to the client as it is."""


class GuidedDecodingUnavailableError(LoraplexError):
    """A constrained request reached a server without a grammar engine (xgrammar not installed)."""
