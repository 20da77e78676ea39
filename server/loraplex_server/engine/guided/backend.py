"""The grammar engine behind structured outputs: the only module that imports ``xgrammar``.

Everything else in the engine talks to ``GrammarBackend``. When xgrammar is not importable the
server still starts; constrained requests are refused (``GuidedDecodingUnavailableError``).
"""

from __future__ import annotations

import json
import re

import torch

from ...errors import GuidedDecodingUnavailableError, InvalidRequestError
from ..request import Constraint

try:  # optional at run time: only constrained requests need it
    import xgrammar as xgr

    IMPORT_ERROR: str | None = None
except Exception as exc:  # noqa: BLE001 - ImportError, or a broken native library
    xgr = None  # type: ignore[assignment]  # optional dependency: None marks it missing (require_backend)
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

ANY_OBJECT = '{"type": "object"}'
_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


def require_backend() -> None:
    if xgr is None:
        raise GuidedDecodingUnavailableError(f"the grammar engine (xgrammar) is not installed: {IMPORT_ERROR}")


def compile_error_message(exc: Exception) -> str:
    """xgrammar's error text without its log prefix and trailing echo of the input."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    first = _LOG_PREFIX.sub("", lines[0]) if lines else type(exc).__name__
    return first[:500]


def choice_grammar(choices: tuple[str, ...]) -> str:
    """EBNF accepting exactly one of ``choices`` (JSON string escapes are valid EBNF literals)."""
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


class GrammarBackend:
    """Compiles constraints for one tokenizer and masks logits with the compiled grammars."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: set[int]):
        require_backend()
        self.vocab_size = vocab_size
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=sorted(stop_token_ids))
        # our own LRU (cache.py) keys by constraint; one compile thread per call
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)

    def compile(self, constraint: Constraint):
        """A compiled grammar, or InvalidRequestError naming what does not compile."""
        try:
            return self._compile(constraint)
        except InvalidRequestError:
            raise
        except Exception as exc:  # xgrammar raises RuntimeError/ValueError with a message
            raise InvalidRequestError(constraint.field, f"does not compile: {compile_error_message(exc)}") from exc

    def _compile(self, c: Constraint):
        if c.kind == "json_schema":
            try:
                schema = json.loads(c.spec)
            except json.JSONDecodeError as exc:
                raise InvalidRequestError(c.field, f"is not valid JSON: {exc}") from exc
            if not isinstance(schema, (dict, bool)):
                raise InvalidRequestError(c.field, "must be a JSON object")
            return self._compiler.compile_json_schema(c.spec, any_whitespace=False)
        if c.kind == "json_object":  # any object (the builtin JSON grammar would allow arrays too)
            return self._compiler.compile_json_schema(ANY_OBJECT, any_whitespace=False, strict_mode=False)
        if c.kind == "regex":
            return self._compiler.compile_regex(c.spec)
        if c.kind == "choice":
            return self._compiler.compile_grammar(choice_grammar(c.choices))
        return self._compiler.compile_grammar(c.spec)

    @staticmethod
    def matcher(compiled):
        return xgr.GrammarMatcher(compiled)

    def new_bitmask(self, rows: int) -> torch.Tensor:
        return xgr.allocate_token_bitmask(rows, self.vocab_size)  # [rows, ceil(V / 32)] int32

    @staticmethod
    def fill(matcher, bitmask: torch.Tensor, row: int) -> None:
        matcher.fill_next_token_bitmask(bitmask, row)

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
        """In place: logits [N, V]; disallowed tokens of ``rows`` become -inf (other rows untouched)."""
        if logits.device.type != "cpu" and bitmask.device != logits.device:
            bitmask = bitmask.to(logits.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab_size, indices=rows)
