"""Turn sampled tokens into per-request output deltas and decide when a request is finished.

Order of checks per new token: stop token id -> EOS -> stop strings -> length. Text that could be
the beginning of a stop string is held back until it is known not to be one.

Only a request with stop strings needs its text to know when it ends, so only those are
detokenized as the token is recorded. The deltas of the others leave ``append`` with empty text
and a ``PendingText`` each (``take_undecoded``) that decodes it later: ``EngineLoop`` does that on
its output thread while the engine thread runs the next step (vLLM v1 detokenizes in another
process); ``LLMEngine.step()`` does it before returning. Each request's pending texts must be
decoded in order, on one thread at a time.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from ..errors import LoraplexError
from .detokenizer import IncrementalDetokenizer, StreamDetokenizer, make_detokenizer
from .request import FinishReason, Request, RequestOutput, TokenLogprob

log = logging.getLogger(__name__)


@dataclass
class TextState:
    detokenizer: IncrementalDetokenizer | StreamDetokenizer
    text: str = ""  # requests with stop strings only: all text so far
    emitted_chars: int = 0
    emitted_tokens: int = 0
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    undecoded: list[int] = field(default_factory=list)  # the others: text tokens since the last delta


@dataclass(slots=True)
class PendingText:
    """The text of ``output`` (made with none) is ``token_ids`` through the request's detokenizer."""

    output: RequestOutput
    detokenizer: IncrementalDetokenizer | StreamDetokenizer
    token_ids: tuple[int, ...]  # the delta's text tokens (a closing EOS or stop token is not text)

    def decode(self) -> None:
        add = self.detokenizer.add
        self.output.text = "".join([add(token_id) for token_id in self.token_ids])


def decode_texts(pending: list[PendingText]) -> None:
    """Decode each pending text in order. One that fails (a tokenizer error) logs and leaves its
    delta without text: the tokens still reach the caller and the other requests go on."""
    for item in pending:
        try:
            item.decode()
        except Exception:  # one request's text, never the thread
            log.exception("detokenizing request %s failed; its delta goes out without text", item.output.request_id)


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: set[int], max_total_tokens: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_total_tokens = max_total_tokens
        self._states: dict[str, TextState] = {}
        self._undecoded: list[PendingText] = []

    def start(self, request: Request) -> None:
        self._states[request.request_id] = TextState(make_detokenizer(self.tokenizer, request.prompt_token_ids))

    def release(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    def take_undecoded(self) -> list[PendingText]:
        """The deltas made since the last call whose text is still to decode, in the order made."""
        pending, self._undecoded = self._undecoded, []
        return pending

    def append(self, request: Request, token_id: int, logprob: TokenLogprob | None) -> RequestOutput | None:
        """Record a sampled token; sets ``request.finish_reason`` when the request is done."""
        state = self._states[request.request_id]
        output_ids = request.output_token_ids
        output_ids.append(token_id)
        if request.first_token_time is None:
            request.first_token_time = time.monotonic()
        sp = request.sampling
        is_text = False
        if token_id in sp.stop_token_ids:
            request.finish_reason = FinishReason.STOP
        elif not sp.ignore_eos and token_id in self.eos_token_ids:
            request.finish_reason = FinishReason.EOS
        elif sp.stop:  # its text decides when it ends: decoded now
            state.text += state.detokenizer.add(token_id)
            if self._truncate_at_stop(state, sp.stop):
                request.finish_reason = FinishReason.STOP
        else:
            is_text = True
        if request.finish_reason is None and (
                len(output_ids) >= sp.max_new_tokens
                or len(request.prompt_token_ids) + len(output_ids) >= self.max_total_tokens):
            request.finish_reason = FinishReason.LENGTH
        if sp.stop or logprob is not None or state.emitted_tokens != len(output_ids) - 1:
            if logprob is not None:
                state.pending_logprobs.append(logprob)
            if is_text:
                state.undecoded.append(token_id)
            return self._delta(request, state)
        return self._token_delta(request, state, token_id, is_text)

    def _token_delta(self, request: Request, state: TextState, token_id: int, is_text: bool) -> RequestOutput:
        """The delta of one token with nothing held back (no stop strings, no logprobs): the common
        case, built directly; its text, if the token is text, is left to decode."""
        reason = request.finish_reason
        num_output = len(request.output_token_ids)
        out = RequestOutput(request.request_id, (token_id,), "", reason is not None, reason,
                            len(request.prompt_token_ids), num_output, (), None, request.adapter_id,
                            None if reason is None else request.timings())
        state.emitted_tokens = num_output
        if is_text:
            self._undecoded.append(PendingText(out, state.detokenizer, (token_id,)))
        return out

    @staticmethod
    def _truncate_at_stop(state: TextState, stops: tuple[str, ...]) -> bool:
        longest = max(len(s) for s in stops)
        search_from = max(0, state.emitted_chars - longest)
        hits = [i for i in (state.text.find(s, search_from) for s in stops) if i >= 0]
        if not hits:
            return False
        state.text = state.text[:min(hits)]
        return True

    def _delta(self, request: Request, state: TextState) -> RequestOutput | None:
        reason = request.finish_reason
        finished = reason is not None
        text, output_ids = state.text, request.output_token_ids
        visible = len(text)
        stop = request.sampling.stop
        if stop and not finished:
            visible = max(state.emitted_chars, visible - (max(len(s) for s in stop) - 1))
        if not finished and state.emitted_tokens == len(output_ids):
            return None
        logprobs = tuple(state.pending_logprobs) if state.pending_logprobs else ()
        out = RequestOutput(request.request_id, tuple(output_ids[state.emitted_tokens:]),
                            text[state.emitted_chars:visible], finished, reason, len(request.prompt_token_ids),
                            len(output_ids), logprobs, None, request.adapter_id,
                            request.timings() if finished else None)
        state.emitted_chars = visible
        state.emitted_tokens = len(output_ids)
        if logprobs:
            state.pending_logprobs = []
        if state.undecoded:
            self._undecoded.append(PendingText(out, state.detokenizer, tuple(state.undecoded)))
            state.undecoded = []
        return out

    def final(self, request: Request, reason: FinishReason, error: LoraplexError | None = None) -> RequestOutput:
        """The closing delta of a request that ends outside ``append`` (abort, error)."""
        request.finish_reason = reason
        state = self._states.get(request.request_id)
        text = state.text[state.emitted_chars:] if state and reason is not FinishReason.ERROR else ""
        return RequestOutput(request_id=request.request_id, token_ids=(), text=text, finished=True,
                             finish_reason=reason, prompt_tokens=request.num_prompt_tokens,
                             completion_tokens=len(request.output_token_ids), error=error,
                             adapter_id=request.adapter_id, timings=request.timings())
