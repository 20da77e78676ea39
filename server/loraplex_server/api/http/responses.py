"""Engine outputs -> OpenAI response objects (completions and chat; whole and streamed chunks)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ...engine.request import FinishReason, RequestOutput, TokenLogprob

FINISH = {FinishReason.STOP: "stop", FinishReason.EOS: "stop", FinishReason.LENGTH: "length"}


def finish_reason(out: RequestOutput) -> str | None:
    if not out.finished or out.finish_reason is None:
        return None if not out.finished else "stop"
    return FINISH.get(out.finish_reason, "stop")


@dataclass
class TokenText:
    """Token id -> its text (for logprobs), cached per request."""

    decode: Callable[[list[int]], str]  # token ids -> text
    cache: dict[int, str] = field(default_factory=dict)

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.cache[token_id] = self.decode([token_id])
        return text


def completion_logprobs(items: tuple[TokenLogprob, ...], top_n: int, text: TokenText, offset: int) -> dict:
    """OpenAI's completions ``logprobs`` (``offset``: characters of text before these tokens)."""
    tokens = [text(lp.token_id) for lp in items]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in items],
            "top_logprobs": [{text(t): v for t, v in lp.top[:top_n]} for lp in items], "text_offset": offsets}


def _chat_token(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def chat_logprobs(items: tuple[TokenLogprob, ...], top_n: int, text: TokenText) -> dict:
    return {"content": [dict(_chat_token(text(lp.token_id), lp.logprob),
                             top_logprobs=[_chat_token(text(t), v) for t, v in lp.top[:top_n]]) for lp in items]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def total_usage(finals: list[RequestOutput], n: int) -> dict:
    """Prompt tokens once per prompt (its ``n`` choices share it), completion tokens of every choice."""
    return usage(sum(o.prompt_tokens for o in finals[::n]), sum(o.completion_tokens for o in finals))
