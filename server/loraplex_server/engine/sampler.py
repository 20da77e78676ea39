"""Per-row sampling in one batch: greedy, temperature, top-k, top-p, repetition penalty, seeds.

Each seeded request owns a ``torch.Generator``; a row draws only from its own generator, so a
seeded request produces the same tokens whatever else shares its batch. Order per row (as in
transformers): repetition penalty -> grammar mask (constrained rows only) -> temperature -> top-k
-> top-p -> sample. Logprobs are those of
the model's raw distribution (log_softmax of the unprocessed logits).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .guided import mask_constrained_rows
from .request import Request, TokenLogprob


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


def apply_repetition_penalty(logits: torch.Tensor, rows: list[Request]) -> None:
    """In place: logits [N, V]; seen tokens' positive logits / p, negative ones * p."""
    for i, req in enumerate(rows):
        p = req.sampling.repetition_penalty
        if p == 1.0:
            continue
        seen = torch.tensor(sorted(set(req.all_token_ids)), dtype=torch.long, device=logits.device)
        values = logits[i, seen]
        logits[i, seen] = torch.where(values > 0, values / p, values * p)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits [N, V]; top_k [N] (0 = off); top_p [N] (1 = off). Returns masked logits."""
    vocab = logits.shape[1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    sorted_logits, sorted_idx = logits.sort(dim=1, descending=True)  # [N, V]
    rank = torch.arange(vocab, device=logits.device)[None, :]
    remove = rank >= k[:, None]
    probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=1)
    mass_before = probs.cumsum(dim=1) - probs
    remove |= mass_before > top_p[:, None]
    remove[:, 0] = False  # always keep the best token
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)


class Sampler:
    def __init__(self, device: torch.device):
        self.device = device
        self._generators: dict[str, torch.Generator] = {}
        # a faster row-wise argmax of fp32 CPU logits (the native kernels'), same answer as torch's
        self.fast_argmax: Callable[[torch.Tensor], torch.Tensor] | None = None

    def generator(self, req: Request) -> torch.Generator:
        g = self._generators.get(req.request_id)
        if g is None:
            seed = req.sampling.seed if req.sampling.seed is not None else random.SystemRandom().getrandbits(63)
            g = torch.Generator(device=self.device).manual_seed(seed)
            self._generators[req.request_id] = g
        return g

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, rows: list[Request]) -> SampleResult:
        """logits [N, V] for the N requests in ``rows`` (one row each). Constrained rows of
        ``logits`` may be masked in place when no row asks for logprobs."""
        logits = logits.float()
        if all(r.sampling.plain_greedy and r.guide is None for r in rows):  # the common step: one pass
            return SampleResult(self._argmax(logits).tolist(), [None] * len(rows))
        raw = logits
        if any(r.sampling.repetition_penalty != 1.0 for r in rows):
            logits = logits.clone()
            apply_repetition_penalty(logits, rows)
        constrained = [i for i, r in enumerate(rows) if r.guide is not None]
        if constrained:  # structured outputs: those rows keep only what their grammar allows
            if logits is raw and any(r.sampling.logprobs > 0 for r in rows):
                logits = logits.clone()  # logprobs are of the raw distribution; else mask in place
            mask_constrained_rows(logits, rows, constrained)
        tokens = self._argmax(logits)  # [N] greedy choice for every row
        sampled = [i for i, r in enumerate(rows) if not r.sampling.greedy]
        if sampled:
            tokens[sampled] = self._sample_rows(logits[sampled], [rows[i] for i in sampled])
        token_list = tokens.tolist()
        return SampleResult(token_list, self._logprobs(raw, rows, token_list))

    def _argmax(self, logits: torch.Tensor) -> torch.Tensor:
        if self.fast_argmax is not None and logits.device.type == "cpu" and logits.stride(1) == 1:
            return self.fast_argmax(logits)
        return logits.argmax(dim=1)

    def _sample_rows(self, logits: torch.Tensor, rows: list[Request]) -> torch.Tensor:
        dev = logits.device
        temps = torch.tensor([r.sampling.temperature for r in rows], device=dev)
        top_k = torch.tensor([r.sampling.top_k for r in rows], device=dev)
        top_p = torch.tensor([r.sampling.top_p for r in rows], device=dev)
        logits = logits / temps[:, None]
        if bool((top_k > 0).any()) or bool((top_p < 1).any()):
            logits = apply_top_k_top_p(logits, top_k, top_p)
        probs = logits.softmax(dim=1)  # [n, V]
        # Exponential race: argmax(p / E) with E ~ Exp(1) samples from p; one draw per row's generator.
        noise = torch.stack([torch.empty(probs.shape[1], device=dev).exponential_(generator=self.generator(r))
                             for r in rows])
        return self._argmax(probs / noise)

    @staticmethod
    def _logprobs(raw: torch.Tensor, rows: list[Request], tokens: list[int]) -> list[TokenLogprob | None]:
        wanted = [i for i, r in enumerate(rows) if r.sampling.logprobs > 0]
        out: list[TokenLogprob | None] = [None] * len(rows)
        if not wanted:
            return out
        logp = raw[wanted].log_softmax(dim=1)  # [n, V]
        n_top = max(rows[i].sampling.logprobs for i in wanted)
        top_vals, top_ids = logp.topk(n_top, dim=1)
        for j, i in enumerate(wanted):
            n = rows[i].sampling.logprobs
            top = tuple(zip(top_ids[j, :n].tolist(), top_vals[j, :n].tolist(), strict=True))
            out[i] = TokenLogprob(tokens[i], float(logp[j, tokens[i]]), top)
        return out
