"""Shared helpers for the kernel tests: the grid switch, tolerances and random batches."""

import itertools

import torch

from loraplex_server.lora.ops import lora_apply_reference

ON_GPU = torch.cuda.is_available()

# (atol, rtol) of a kernel's output against the fp64 loop on the same (rounded) inputs. fp16/bf16
# round h to the weight dtype and y to its dtype (bf16 keeps 8 bits: 2^-5 steps near |y| = 4).
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 3e-2),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
RANK_CHOICES = (4, 8, 16, 64)


def grid(full: list[tuple], cpu: list[tuple]) -> list[tuple]:
    """The whole product on a GPU; a representative subset under the (slow) CPU interpreter."""
    return full if ON_GPU else cpu


def product(*axes) -> list[tuple]:
    return list(itertools.product(*axes))


def random_runs(num_tokens: int, num_slots: int, gen: torch.Generator) -> list[tuple[int, int]]:
    """(slot, length) runs in slot order like the runner packs them: base rows (-1) first, then
    random lengths over slot 0 and a random choice of the other slots (the rank-0 one included)."""
    if num_tokens == 1:
        return [(0, 1)]
    num_runs = min(num_slots + 1, num_tokens)
    cuts = sorted((torch.randperm(num_tokens - 1, generator=gen)[:num_runs - 1] + 1).tolist())
    lengths = [b - a for a, b in zip([0] + cuts, cuts + [num_tokens])]
    others = (torch.randperm(num_slots - 1, generator=gen)[:num_runs - 2] + 1).tolist()
    return list(zip([-1, 0] + sorted(others), lengths))


def slot_ranks(num_slots: int, max_rank: int) -> torch.Tensor:
    """Mixed ranks <= max_rank (slot 0 at max_rank), the last slot unused by the module (rank 0)."""
    choices = [r for r in RANK_CHOICES if r <= max_rank] or [max_rank]
    ranks = [max_rank] + [choices[i % len(choices)] for i in range(1, num_slots - 1)] + [0]
    return torch.tensor(ranks[:num_slots], dtype=torch.int32)


def lora_stacks(num_slots: int, max_rank: int, fan_in: int, fan_out: int, ranks: torch.Tensor,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A [S, R, in] and Bt [S, R, out] in fp32, zero past each slot's rank (the buffers' contract)."""
    a = torch.randn(num_slots, max_rank, fan_in, generator=gen) / fan_in ** 0.5
    bt = torch.randn(num_slots, max_rank, fan_out, generator=gen) / max_rank ** 0.5
    for s, r in enumerate(ranks.tolist()):
        a[s, r:] = 0
        bt[s, r:] = 0
    return a, bt


def pool_layout(ranks: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, int]:
    """Row offsets [S] int32 of slots in a row pool and its size: each slot holds an extent of its
    largest rank over the projections (``ranks`` [S] or [S, P]; at least one row), in a shuffled
    slot order with one free row before each extent (so neither slot order nor adjacency is assumed)."""
    extents = ranks.reshape(ranks.shape[0], -1).amax(dim=1).clamp(min=1).tolist()
    order = torch.randperm(len(extents), generator=torch.Generator().manual_seed(seed)).tolist()
    offsets, top = [0] * len(extents), 0
    for s in order:
        offsets[s] = top + 1
        top += 1 + extents[s]
    return torch.tensor(offsets, dtype=torch.int32), top + 1


def to_pool(stack: torch.Tensor, ranks: torch.Tensor, offsets: torch.Tensor, num_rows: int) -> torch.Tensor:
    """A [S, R, cols] stack's true-rank rows moved into a [num_rows, cols] pool at ``offsets``;
    every other row (free rows, rows past a slot's rank for this projection) is NaN, so a kernel
    that reads a row it does not own returns NaN."""
    pool = torch.full((num_rows, stack.shape[2]), float("nan"), dtype=stack.dtype)
    for s, (o, r) in enumerate(zip(offsets.tolist(), ranks.tolist())):
        pool[o:o + r] = stack[s, :r]
    return pool


def stack_reference(y, x, a, bt, ranks, token_slots) -> None:
    """``lora_apply_reference`` on [S, R, cols] stacks: slot s is rows s*R.. of the flattened pool."""
    num_slots, max_rank = a.shape[:2]
    lora_apply_reference(y, x, a.reshape(num_slots * max_rank, -1), bt.reshape(num_slots * max_rank, -1),
                         [int(r) for r in ranks], [s * max_rank for s in range(num_slots)], token_slots)


def poison_padding(stack: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """A copy with NaN past each slot's rank: a kernel that reads padding returns NaN."""
    out = stack.clone()
    for s, r in enumerate(ranks.tolist()):
        out[s, r:] = float("nan")
    return out

