"""Projections that read one input computed by one matmul: q/k/v of an attention block, gate/up of
a gated MLP.

A decode step of a small model is many small GEMMs, each paying a fixed launch and packing cost;
on this 2-core CPU (bf16, oneDNN, 64 tokens) q+k+v as three calls take 300 us and as one 175 us,
gate+up 571 and 471 us. ``merge_projections`` concatenates the members' weights (output columns
in member order) into one ``nn.Linear`` registered on the parent as ``merged_name``, and gives each
member a ``ColumnSlice`` of it as its base, so the member's weights are not kept twice. The
parent's forward (model/fused_ops.py) calls the merged linear once and hands each member its
column view to add its LoRA delta to:

    y = x @ cat(W_q, W_k, W_v)^T            # [T, n_q + n_k + n_v]
    y[:, lo_p:hi_p] += delta_p(x)          # for each member p that carries LoRA (add_delta)

Code that still calls a member directly (a fallback forward) gets the same numbers from its
column slice, at the cost of the whole merged matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class ColumnSlice(nn.Module):
    """Columns ``lo:hi`` of a merged linear's output, as a drop-in base for one member. The merged
    linear is looked up on the parent at each call, so it may be replaced later (packed for oneDNN)
    without a stale copy kept alive here."""

    def __init__(self, parent: nn.Module, merged_name: str, lo: int, hi: int):
        super().__init__()
        self._parent = (parent,)  # a tuple: not registered as a child (no module cycle)
        self.merged_name, self.lo, self.hi = merged_name, lo, hi
        self.in_features, self.out_features = self.merged.in_features, hi - lo

    @property
    def merged(self) -> nn.Linear:
        """The merged linear (or the ``PackedLinear`` that replaced it: no ``weight`` then)."""
        return getattr(self._parent[0], self.merged_name)

    @property
    def weight(self) -> torch.Tensor:
        return self.merged.weight[self.lo:self.hi]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merged(x)[..., self.lo:self.hi].contiguous()


@dataclass(frozen=True)
class MergedMember:
    module: nn.Module  # the member as the parent holds it (a plain base or a LoRA wrapper)
    lo: int
    hi: int

    def add_delta(self, y2d: torch.Tensor, x: torch.Tensor) -> None:
        """Add the member's LoRA delta for input ``x`` to its columns of the merged output ``y2d``."""
        add = getattr(self.module, "add_delta", None)
        if add is not None:
            add(y2d[:, self.lo:self.hi], x)


def _base_of(member: nn.Module) -> nn.Module:
    """The plain linear under a LoRA wrapper (anything with ``base`` and ``add_delta``), or the member."""
    base = getattr(member, "base", None) if hasattr(member, "add_delta") else None
    return base if isinstance(base, nn.Module) else member


def _mergeable_linears(bases: list[nn.Module]) -> list[nn.Linear] | None:
    """``bases`` when all are plain linears of one input size, dtype and device, with a bias on all
    or none; else None."""
    linears = [b for b in bases if type(b) is nn.Linear]
    if len(linears) != len(bases):
        return None
    first = linears[0]
    if all(b.in_features == first.in_features and b.weight.dtype == first.weight.dtype
           and b.weight.device == first.weight.device and (b.bias is None) == (first.bias is None) for b in linears):
        return linears
    return None


@torch.no_grad()
def merge_projections(parent: nn.Module, names: tuple[str, ...], merged_name: str) -> tuple[MergedMember, ...] | None:
    """Merge ``parent``'s linears ``names`` into ``parent.<merged_name>``; returns the members with
    their column ranges, or None (nothing changed) when they are not plain linears of one input
    size, dtype and device."""
    members = [m for m in (getattr(parent, name, None) for name in names) if m is not None]
    if len(members) != len(names):
        return None
    bases = _mergeable_linears([_base_of(m) for m in members])
    if bases is None:
        return None
    merged = nn.Linear(bases[0].in_features, sum(b.out_features for b in bases), bias=bases[0].bias is not None,
                       device=bases[0].weight.device, dtype=bases[0].weight.dtype)
    merged.weight.copy_(torch.cat([b.weight for b in bases]))
    if merged.bias is not None:
        merged.bias.copy_(torch.cat([b.bias for b in bases]))
    merged.requires_grad_(False)
    setattr(parent, merged_name, merged)
    out: list[MergedMember] = []
    lo = 0
    for name, member, base in zip(names, members, bases, strict=True):
        piece = ColumnSlice(parent, merged_name, lo, lo + base.out_features)
        if member is base:
            setattr(parent, name, piece)
        else:
            member.base = piece
        out.append(MergedMember(getattr(parent, name), lo, piece.hi))
        lo = piece.hi
    return tuple(out)
