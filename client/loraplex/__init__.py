"""Loraplex: a Python client for the multi-LoRA inference server.

    from loraplex import Client

    with Client("localhost:50051", api_key="...") as client:
        result = client.generate("Translate to French: cheese", adapter_id="fr", max_new_tokens=32)
        print(result.text, result.finish_reason, result.usage)
"""

from loraplex._version import __version__
from loraplex.client import AsyncClient, Client
from loraplex.errors import (
    CancelledError,
    DeadlineExceededError,
    InvalidArgumentError,
    LoraplexError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    ServerError,
    UnavailableError,
    from_rpc_error,
)
from loraplex.types import (
    AdapterInfo,
    ChatMessage,
    GenerateResult,
    ServerInfo,
    StreamChunk,
    TokenLogprob,
    Usage,
)

__all__ = [
    "AdapterInfo",
    "AsyncClient",
    "CancelledError",
    "ChatMessage",
    "Client",
    "DeadlineExceededError",
    "GenerateResult",
    "InvalidArgumentError",
    "LoraplexError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "ServerError",
    "ServerInfo",
    "StreamChunk",
    "TokenLogprob",
    "UnavailableError",
    "Usage",
    "__version__",
    "from_rpc_error",
]
