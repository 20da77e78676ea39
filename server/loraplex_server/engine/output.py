"""Turn sampled tokens into per-request output deltas and decide when a request is finished.

Order of checks per new token: stop token id -> EOS -> stop strings -> length. Text that could be
the beginning of a stop string is held back until it is known not to be one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..errors import LoraplexError
from .detokenizer import IncrementalDetokenizer, StreamDetokenizer, make_detokenizer
from .request import FinishReason, Request, RequestOutput, TokenLogprob


@dataclass
class TextState:
    detokenizer: IncrementalDetokenizer | StreamDetokenizer
    text: str = ""
    emitted_chars: int = 0
    emitted_tokens: int = 0
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: set[int], max_total_tokens: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_total_tokens = max_total_tokens
        self._states: dict[str, TextState] = {}

    def start(self, request: Request) -> None:
        self._states[request.request_id] = TextState(make_detokenizer(self.tokenizer, request.prompt_token_ids))

    def release(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    def append(self, request: Request, token_id: int, logprob: TokenLogprob | None) -> RequestOutput | None:
        """Record a sampled token; sets ``request.finish_reason`` when the request is done."""
        state = self._states[request.request_id]
        output_ids = request.output_token_ids
        output_ids.append(token_id)
        if request.first_token_time is None:
            request.first_token_time = time.monotonic()
        if logprob is not None:
            state.pending_logprobs.append(logprob)
        sp = request.sampling
        if token_id in sp.stop_token_ids:
            request.finish_reason = FinishReason.STOP
        elif not sp.ignore_eos and token_id in self.eos_token_ids:
            request.finish_reason = FinishReason.EOS
        else:
            state.text += state.detokenizer.add(token_id)
            if sp.stop and self._truncate_at_stop(state, sp.stop):
                request.finish_reason = FinishReason.STOP
            elif (len(output_ids) >= sp.max_new_tokens
                  or len(request.prompt_token_ids) + len(output_ids) >= self.max_total_tokens):
                request.finish_reason = FinishReason.LENGTH
        return self._delta(request, state)

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
