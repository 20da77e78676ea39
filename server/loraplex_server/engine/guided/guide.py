"""One constrained request's grammar state: compiling -> ready (a matcher) or failed.

The engine thread alone touches the matcher: the sampler fills the request's row of the token
bitmask, the engine advances the matcher with each accepted token.
"""

from __future__ import annotations

import time
from concurrent.futures import Future

import torch

from ...errors import InvalidRequestError
from ..request import Constraint, Request
from .backend import GrammarBackend


class Guide:
    def __init__(self, constraint: Constraint, compiled: Future, timeout_s: float = float("inf")):
        self.constraint = constraint
        self._compiled = compiled  # -> (GrammarBackend, compiled grammar)
        self._timeout_s = timeout_s
        self._deadline = time.monotonic() + timeout_s
        self._matcher = None
        self.backend: GrammarBackend | None = None
        self.failure: str | None = None  # the grammar engine failed on this request's matcher

    @property
    def ready(self) -> bool:
        """Compiled successfully (a request waits in the queue until then)."""
        return self._compiled.done() and not self._compiled.cancelled() and self._compiled.exception() is None

    @property
    def error(self) -> str | None:
        """Why the constraint was refused (``field: message``), once its compile failed or overran its time."""
        refusal = self.refusal()
        return None if refusal is None else str(refusal)

    def refusal(self) -> InvalidRequestError | None:
        """The error refusing the constraint (a new one per call), once its compile failed or overran its time."""
        field = self.constraint.field
        if not self._compiled.done():
            if time.monotonic() > self._deadline:
                return InvalidRequestError(field, f"too complex: did not compile within {self._timeout_s:g} s")
            return None
        if self._compiled.cancelled():
            return InvalidRequestError(field, "compile cancelled (server shutting down)")
        exc = self._compiled.exception()
        if exc is None:
            return None
        if isinstance(exc, InvalidRequestError):
            return InvalidRequestError(exc.field, exc.message)
        return InvalidRequestError(field, f"does not compile: {type(exc).__name__}: {exc}")

    def compiled_result(self) -> tuple[GrammarBackend, object]:
        """(backend, compiled grammar); only once ``ready``."""
        return self._compiled.result()

    def ensure_matcher(self):
        if self._matcher is None:
            self.backend, grammar = self.compiled_result()
            self._matcher = self.backend.matcher(grammar)
        return self._matcher

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Row ``row`` of ``bitmask`` := the tokens the grammar allows next. A grammar-engine error
        is kept in ``failure`` (the row stays unmasked; ``accept`` then refuses its token), so it
        ends this request only, not the whole batch."""
        try:
            matcher = self.ensure_matcher()  # sets self.backend on first use
            assert self.backend is not None
            self.backend.fill(matcher, bitmask, row)
        except Exception as exc:  # noqa: BLE001 - contained to this request
            self.failure = f"{type(exc).__name__}: {exc}"

    def accept(self, token_id: int) -> bool:
        """Advance past a sampled token; False if the grammar rejects it (it never should) or
        failed while masking."""
        if self.failure is not None:
            return False
        try:
            return bool(self.ensure_matcher().accept_token(token_id))
        except Exception as exc:  # noqa: BLE001 - contained to this request
            self.failure = f"{type(exc).__name__}: {exc}"
            return False


def mask_constrained_rows(logits: torch.Tensor, rows: list[Request], constrained: list[int]) -> None:
    """In place: logits [N, V]; each row in ``constrained`` keeps only its grammar's allowed tokens
    (EOS only where the grammar is complete). Other rows are not touched."""
    guides: list[Guide] = []
    for i in constrained:
        guide = rows[i].guide
        assert isinstance(guide, Guide)  # the engine gives every constrained request a Guide
        guides.append(guide)
    backend: GrammarBackend = guides[0].compiled_result()[0]  # one backend per engine: all guides share it
    bitmask = backend.new_bitmask(logits.shape[0])  # [N, ceil(V / 32)] all allowed; only constrained rows filled
    for i, guide in zip(constrained, guides, strict=True):
        guide.fill(bitmask, i)
    backend.apply(logits, bitmask, constrained)
