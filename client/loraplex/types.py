"""Plain, immutable values returned by the Loraplex client.

These are the only data types the client hands to callers: protobuf messages never leave the
package. String-valued enums use lowercase labels taken from the proto enum names, e.g. the
proto's ``FINISH_REASON_STOP`` is ``"stop"`` here and ``ADAPTER_STATE_DEVICE`` is ``"device"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "AdapterInfo",
    "ChatMessage",
    "GenerateResult",
    "ServerInfo",
    "StreamChunk",
    "TokenLogprob",
    "Usage",
]


@dataclass(frozen=True)
class Usage:
    """Token accounting for one request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TokenLogprob:
    """The log-probability of one generated token and the best alternatives at its position.

    ``top`` holds ``(token_id, logprob)`` pairs, best first; it is empty unless the request
    asked for ``logprobs > 0``.
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class GenerateResult:
    """A whole completion.

    ``finish_reason`` is one of ``"length"``, ``"stop"``, ``"eos"``, ``"abort"`` or
    ``"unspecified"``.
    """

    text: str
    token_ids: tuple[int, ...] = ()
    finish_reason: str = "unspecified"
    usage: Usage = field(default_factory=Usage)
    adapter_id: str = ""
    request_id: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class StreamChunk:
    """One streamed delta: the text and tokens of this chunk only.

    ``finish_reason`` and ``usage`` are ``None`` except on the last chunk of a stream.
    """

    text: str
    token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None
    usage: Usage | None = None
    adapter_id: str = ""
    request_id: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class AdapterInfo:
    """A registered adapter.

    ``state`` is where its weights are: ``"disk"``, ``"loading"``, ``"cpu"`` or ``"device"``
    (``"unspecified"`` if the server did not say). ``version`` bumps on every hot-swap;
    ``owner`` is the owning tenant ("" = public). ``error`` is why its weights could not be read
    (while ``retrying``, the last transient error); ``content_sha256``, ``source_bytes`` and
    ``source_mtime_unix`` describe the files this version was read from (``content_sha256`` is
    empty for an adapter registered lazily, by discovery, until its weights are first read).
    """

    adapter_id: str
    rank: int = 0
    target_modules: tuple[str, ...] = ()
    state: str = "unspecified"
    pinned: bool = False
    request_count: int = 0
    source: str = ""
    size_bytes: int = 0
    version: int = 0
    last_used_unix: float = 0.0
    load_latency_s: float = 0.0
    owner: str = ""
    error: str = ""
    load_attempts: int = 0
    retrying: bool = False
    content_sha256: str = ""
    source_bytes: int = 0
    source_mtime_unix: float = 0.0


@dataclass(frozen=True)
class ServerInfo:
    """The served base model and the server's limits."""

    model: str
    dtype: str = ""
    device: str = ""
    max_loras: int = 0
    max_lora_rank: int = 0
    context_length: int = 0
    version: str = ""
    max_cpu_loras: int = 0
    kv_cache_tokens: int = 0
    prefix_caching: bool = False
    lora_pool_rows: int = 0  # rank rows of the LoRA weight pool (a rank-r adapter holds r while resident)
    lora_pool_bytes: int = 0  # device bytes of that pool (0 when unified)
    kv_cache_bytes: int = 0  # device bytes of the KV cache (unified: shared by KV blocks and adapter weights)
    memory_pool: str = ""  # "separate" or "unified"; "" from a server older than the field


@dataclass(frozen=True)
class ChatMessage:
    """One chat turn; ``role`` is ``"system"``, ``"user"`` or ``"assistant"``."""

    role: str
    content: str
