"""Shared helpers for the kernel tests: the grid switch, tolerances, random batches, the flat
weight buffers the kernels read (two placements of the slots in them) and the plain loop oracle."""

import itertools

import torch
from helpers import pack

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
# How slots sit in the flat buffers: "rows", the row pool of before in element offsets (a_off = row
# * in, b_off = row * out, one row table for every projection, a buffer per projection); "arena",
# one buffer per side shared by every projection, each (slot, projection) block packed at an
# unaligned element offset, A and Bt in unrelated orders.
PLACEMENTS = ("rows", "arena")


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
    """A [S, R, in] and Bt [S, R, out] in fp32, zero past each slot's rank."""
    a = torch.randn(num_slots, max_rank, fan_in, generator=gen) / fan_in ** 0.5
    bt = torch.randn(num_slots, max_rank, fan_out, generator=gen) / max_rank ** 0.5
    for s, r in enumerate(ranks.tolist()):
        a[s, r:] = 0
        bt[s, r:] = 0
    return a, bt


def pool_rows(ranks: torch.Tensor, seed: int = 0) -> tuple[list[int], int]:
    """Row offsets of slots in a row pool and its size: each slot holds an extent of its largest
    rank over the projections (``ranks`` [S, P]; at least one row), in a shuffled slot order with
    one free row before each extent (so neither slot order nor adjacency is assumed)."""
    extents = ranks.amax(dim=1).clamp(min=1).tolist()
    order = torch.randperm(len(extents), generator=torch.Generator().manual_seed(seed)).tolist()
    rows, top = [0] * len(extents), 0
    for s in order:
        rows[s] = top + 1
        top += 1 + extents[s]
    return rows, top + 1


def flat_buffers(a_list, bt_list, ranks, placement: str, device, dtype=torch.float32, seed: int = 0):
    """Each projection's A [S, R, in] / Bt [S, R, out_p] stacks at their true ranks (``ranks``
    [S, P]) in flat buffers, NaN in every element no (slot, projection) owns, so a kernel that
    reads another block, a gap or past a rank returns NaN or a wrong sum. Returns, on ``device``,
    the A buffers, Bt buffers (P each: separate tensors, or P times the one arena, in ``dtype``)
    and the [S, P] int32 element offsets of A and Bt."""
    num_slots, num_proj = ranks.shape
    if placement == "rows":
        rows, num_rows = pool_rows(ranks, seed)
        sides = []
        for stacks in (a_list, bt_list):
            bufs = []
            for p, st in enumerate(stacks):
                buf = torch.full((num_rows, st.shape[2]), float("nan"))
                for s, r in enumerate(ranks[:, p].tolist()):
                    buf[rows[s]:rows[s] + r] = st[s, :r]
                bufs.append(buf.reshape(-1).to(device, dtype))
            offs = torch.tensor([[rows[s] * st.shape[2] for st in stacks] for s in range(num_slots)])
            sides.append((bufs, offs))
    else:
        gen = torch.Generator().manual_seed(seed)
        sides = []
        for stacks in (a_list, bt_list):
            keys = [(s, p) for s in range(num_slots) for p in range(num_proj)]
            buf, where = pack({(s, p): stacks[p][s, :int(ranks[s, p])] for s, p in keys}, gen)
            offs = torch.tensor([[where[s, p] for p in range(num_proj)] for s in range(num_slots)])
            sides.append(([buf.to(device, dtype)] * num_proj, offs))
    (a_bufs, a_off), (bt_bufs, b_off) = sides
    return a_bufs, bt_bufs, a_off.to(device, torch.int32), b_off.to(device, torch.int32)


def stack_reference(y, x, a, bt, ranks, token_slots) -> None:
    """The oracle, a plain loop on [S, R, cols] stacks (no buffers, no offsets), in place:

        for t with s = token_slots[t] >= 0:  r = ranks[s];  y[t] += (a[s, :r] @ x[t]) @ bt[s, :r]
    """
    for t, s in enumerate(token_slots.tolist()):
        if s >= 0:
            r = int(ranks[s])
            y[t] += (a[s, :r] @ x[t]) @ bt[s, :r]
