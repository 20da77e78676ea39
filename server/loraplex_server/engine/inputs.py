"""Prompt input -> token ids, with every request-level check done before the engine sees it."""

from __future__ import annotations

import threading

from ..errors import InvalidRequestError, PromptTooLongError
from .request import Prompt, SamplingParams


class InputProcessor:
    """Tokenizes text and chat prompts and validates lengths; safe to call from any thread."""

    def __init__(self, tokenizer, vocab_size: int, max_model_len: int, kv_capacity_tokens: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.kv_capacity_tokens = kv_capacity_tokens
        self._lock = threading.Lock()  # HF fast tokenizers must not be used from two threads at once

    @property
    def max_total_tokens(self) -> int:
        """A sequence (prompt + output) never grows past this many tokens."""
        return min(self.max_model_len, self.kv_capacity_tokens)

    def token_ids(self, prompt: Prompt) -> list[int]:
        if prompt.token_ids is not None:
            ids = list(prompt.token_ids)
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequestError("prompt_token_ids",
                                          f"token id {bad[0]} outside vocabulary [0, {self.vocab_size})")
        else:
            ids = self._tokenize(prompt)
        if not ids:
            raise InvalidRequestError("prompt", "the prompt is empty")
        return ids

    def _tokenize(self, prompt: Prompt) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequestError("prompt", "this model has no tokenizer: send prompt_token_ids")
        with self._lock:
            if prompt.messages is not None:
                if not prompt.messages:
                    raise InvalidRequestError("messages", "no messages given")
                if getattr(self.tokenizer, "chat_template", None) is None:
                    raise InvalidRequestError("messages", "this model has no chat template")
                messages = [{"role": m.role, "content": m.content} for m in prompt.messages]
                ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                         return_dict=False)
                return list(ids["input_ids"] if isinstance(ids, dict) else ids)
            return list(self.tokenizer.encode(prompt.text, add_special_tokens=True))

    def check(self, token_ids: list[int], sampling: SamplingParams) -> None:
        sampling.validate()
        n = len(token_ids)
        if n >= self.max_model_len:
            raise PromptTooLongError(n, self.max_model_len - 1, "model's context length (less one output token)")
        if n >= self.kv_capacity_tokens:
            raise PromptTooLongError(n, self.kv_capacity_tokens - 1, "KV cache capacity (less one output token)")
        if any(t >= self.vocab_size for t in sampling.stop_token_ids):
            raise InvalidRequestError("sampling.stop_token_ids", f"ids must be < {self.vocab_size}")
