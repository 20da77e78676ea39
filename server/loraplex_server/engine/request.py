"""The engine's own request types: what callers submit and what they get back.

Protobuf never reaches here; the API layer converts at its edge.
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import InvalidRequestError, LoraplexError
from ..lora.ids import AdapterId, VersionKey

CONSTRAINT_KINDS = ("json_schema", "regex", "choice", "grammar", "json_object")
DEFAULT_MAX_NEW_TOKENS = 64  # the documented default of both APIs (unset / zero max_new_tokens, max_tokens)


@dataclass(frozen=True)
class Constraint:
    """What a request's output must match (structured outputs; see engine/guided).

    ``kind`` is one of CONSTRAINT_KINDS; ``spec`` is the schema / regex / grammar text (empty for
    ``json_object``); ``choices`` the allowed strings of a ``choice``. Hashable: the compiled-grammar
    cache is keyed by it.
    """

    kind: str
    spec: str = ""
    choices: tuple[str, ...] = ()

    @property
    def field(self) -> str:
        return f"sampling.{self.kind}"

    @property
    def size(self) -> int:
        """Bytes of constraint text (what the size limit counts)."""
        return len(self.spec.encode()) + sum(len(c.encode()) for c in self.choices)

    def validate(self) -> None:
        """Structural checks only; whether it compiles is the grammar engine's call."""
        if self.kind not in CONSTRAINT_KINDS:
            raise InvalidRequestError("sampling.constraint", f"unknown kind {self.kind!r}")
        if self.kind == "choice":
            if not self.choices:
                raise InvalidRequestError(self.field, "the choice list is empty")
            if not all(self.choices):
                raise InvalidRequestError(self.field, "choices must be non-empty strings")
        elif self.kind != "json_object" and not self.spec.strip():
            raise InvalidRequestError(self.field, "is empty")


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding parameters. ``temperature == 0`` means greedy."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int = 0  # top-n logprobs per generated token; 0 = off
    constraint: Constraint | None = None  # structured output (JSON schema, regex, choice, grammar)
    # greedy on the raw logits, nothing asked of them besides: the token is their argmax (set once)
    plain_greedy: bool = field(init=False, repr=False, compare=False)

    MAX_LOGPROBS = 20

    def __post_init__(self) -> None:
        object.__setattr__(self, "plain_greedy", self.temperature == 0.0 and self.repetition_penalty == 1.0
                           and self.logprobs == 0)

    def validate(self) -> None:
        """Raise InvalidRequestError naming the first bad field."""
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
            ("temperature", math.isfinite(self.temperature) and self.temperature >= 0, "must be >= 0"),
            ("top_k", self.top_k >= 0, "must be >= 0"),
            ("top_p", math.isfinite(self.top_p) and 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("repetition_penalty", math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
             "must be > 0"),
            ("logprobs", 0 <= self.logprobs <= self.MAX_LOGPROBS, f"must be in [0, {self.MAX_LOGPROBS}]"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty"),
            ("stop_token_ids", all(t >= 0 for t in self.stop_token_ids), "must be >= 0"),
            ("seed", self.seed is None or 0 <= self.seed < 2**63, "must be in [0, 2^63)"),
        ]
        for name, ok, message in checks:
            if not ok:
                raise InvalidRequestError(f"sampling.{name}", message)
        if self.constraint is not None:
            self.constraint.validate()
            if self.ignore_eos:  # a complete grammar allows only EOS: ignoring it cannot end well
                raise InvalidRequestError("sampling.ignore_eos", "cannot be combined with a constraint")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class Prompt:
    """Exactly one of text, chat messages or token ids."""

    text: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    token_ids: tuple[int, ...] | None = None

    def __post_init__(self):
        given = [x is not None for x in (self.text, self.messages, self.token_ids)]
        if sum(given) != 1:
            raise InvalidRequestError("prompt", "give exactly one of text, messages or token_ids")


class GuideLike(Protocol):
    """What the scheduler and engine see of a constrained request's grammar state (engine/guided/guide.py)."""

    failure: str | None  # why the grammar engine failed on this request's matcher, if it did

    @property
    def ready(self) -> bool: ...

    def refusal(self) -> InvalidRequestError | None: ...

    def accept(self, token_id: int) -> bool: ...


class FinishReason(enum.Enum):
    LENGTH = "length"
    STOP = "stop"  # a stop string or stop token id
    EOS = "eos"
    ABORT = "abort"
    ERROR = "error"


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), best first


@dataclass(frozen=True)
class RequestTimings:
    """Monotonic timestamps of one request's life (seconds)."""

    arrival: float
    first_scheduled: float | None
    first_token: float | None
    finished: float

    @property
    def queue_wait(self) -> float | None:
        return None if self.first_scheduled is None else self.first_scheduled - self.arrival

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def end_to_end(self) -> float:
        return self.finished - self.arrival


@dataclass(slots=True)
class RequestOutput:
    """One delta for one request: the tokens and text produced since the previous delta. Not
    frozen, for speed (a frozen dataclass took 4.5 us to build, one per request per step), but
    never changed once made: consumers treat it as a value."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finished: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()
    # why a request ended with FinishReason.ERROR, as the domain error the API maps to a status:
    # AdapterUnavailableError, InvalidRequestError (a grammar that did not compile), EngineFailure
    error: LoraplexError | None = None
    adapter_id: str | None = None
    timings: RequestTimings | None = None  # on the final delta only


@dataclass(eq=False, slots=True)
class Request:
    """A request's state inside the engine (one sequence per request).

    The scheduler owns ``status``, ``num_computed_tokens`` and the block fields; the output processor
    owns the detokenizer state and the finish reason.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    adapter_id: AdapterId | None = None
    adapter_key: VersionKey | None = None  # the adapter version this request is bound to (id@n)
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # prefix-cache chain hashes of full blocks (memo)
    num_published_blocks: int = 0  # leading blocks published in, or taken from, the prefix cache
    num_preemptions: int = 0
    slot_waits: int = 0  # steps passed over while the max_loras cap kept its adapter out
    finish_reason: FinishReason | None = None
    tenant: str = ""
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    guide: GuideLike | None = None  # the grammar matcher of a constrained request (engine/guided)

    @property
    def guide_ready(self) -> bool:
        """False while the request's grammar is still compiling (it waits in the queue)."""
        return self.guide is None or self.guide.ready

    def timings(self) -> RequestTimings:
        return RequestTimings(self.arrival_time, self.first_scheduled_time, self.first_token_time,
                              time.monotonic())

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_at(self, position: int) -> int:
        """Token ``position`` of prompt + output."""
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < n else self.output_token_ids[position - n]

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without copying the whole sequence."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)
