"""Host side of the Triton LoRA apply: segment tables, layout and tile choice, kernel launches.

``TritonLoraBackend`` is a drop-in for ``ops.lora_apply`` (same signature, same buffers: the row
pools ``lora_a`` [pool_rows, in], ``lora_bt`` [pool_rows, out], slot ``s`` at rows ``offsets[s] ..
offsets[s] + ranks[s] - 1``); the kernels and the
loop they compute are in ``triton_kernels.py``. ``lora_shrink`` / ``lora_expand`` also take up to
``MAX_FUSED`` projections that share their input (q/k/v, gate/up) in one launch each. Layouts:
'segment' (SGMV) when segments hold several tokens each (prefill), else 'gather' (BGMV, decode).

``select_lora_backend(device)`` gives a backend for a CUDA device when triton imports, else None
(``ops.apply_function`` then falls back to the torch ops). Without triton this module still imports.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..triton_common import cdiv, dot_options, interpreted, next_pow2, triton_available
from .mapping import LoraMapping, device_table, rank_bound
from .triton_kernels import bgmv_expand_kernel, bgmv_shrink_kernel, sgmv_expand_kernel, sgmv_shrink_kernel

MAX_FUSED = 3  # projections per launch (q/k/v); the kernels take this many offsets
SGMV_MIN_TOKENS_PER_SEGMENT = 8  # below this the gather layout wins (decode)
_TARGET_PROGRAMS = 512  # split-K fills the GPU when a shrink launches fewer programs than this
INTERPRETER_TILE_SCALE = 4  # wider K/N tiles under the CPU interpreter, where each program costs Python time
_TABLE_CACHE_SIZE = 64


@dataclass(frozen=True)
class SegmentTensors:
    """A step's adapter segments on the device (built once per step, shared by every layer)."""

    starts: torch.Tensor  # [num_segments] int32 first token row
    lens: torch.Tensor  # [num_segments] int32
    slots: torch.Tensor  # [num_segments] int32
    max_len: int
    num_tokens: int  # tokens inside segments (rows with an adapter)

    @classmethod
    def from_segments(cls, segments: Sequence[tuple[int, int, int]],
                      device: torch.device | str) -> "SegmentTensors":
        """``segments``: (start, end, slot) runs with slot >= 0, as in ``LoraMapping.segments``."""
        table = torch.tensor([[s, e - s, slot] for s, e, slot in segments], dtype=torch.int32)
        table = table.reshape(-1, 3).t().contiguous().to(device)  # [3, num_segments]
        lens = [e - s for s, e, _ in segments]
        return cls(table[0], table[1], table[2], max(lens, default=0), sum(lens))

    @property
    def count(self) -> int:
        return self.starts.shape[0]


def choose_layout(segments: SegmentTensors) -> str:
    """'segment' (SGMV) when segments hold several tokens each (prefill), else 'gather' (BGMV)."""
    if segments.num_tokens >= SGMV_MIN_TOKENS_PER_SEGMENT * max(segments.count, 1):
        return "segment"
    return "gather"


def _as_list(t: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    stacks = [t] if isinstance(t, torch.Tensor) else list(t)
    if not 1 <= len(stacks) <= MAX_FUSED:
        raise ValueError(f"between 1 and {MAX_FUSED} fused projections, got {len(stacks)}")
    return stacks


def _padded(values: list[int]) -> list[int]:
    return values + [0] * (MAX_FUSED - len(values))


def _offsets(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """The lowest-addressed tensor and every tensor's element offset from it (padded to MAX_FUSED)."""
    if len(tensors) == 1:
        return tensors[0], [0] * MAX_FUSED
    base = min(tensors, key=lambda t: t.data_ptr())
    size = base.element_size()
    offsets = []
    for t in tensors:
        diff = t.data_ptr() - base.data_ptr()
        if t.dtype != base.dtype or t.device != base.device or diff % size:
            raise ValueError("fused tensors must share dtype and device")
        offsets.append(diff // size)
    return base, _padded(offsets)


def _ranks_2d(ranks: torch.Tensor | Sequence[int], num_slots: int, num_proj: int,
              device: torch.device) -> torch.Tensor:
    """[num_slots, num_proj] int32 on ``device``; accepts [num_slots] when num_proj == 1."""
    t = ranks if isinstance(ranks, torch.Tensor) else torch.tensor(list(ranks))
    return t.to(device=device, dtype=torch.int32).reshape(num_slots, num_proj).contiguous()


def _tiles(kernel, layout: str, dtype: torch.dtype, max_rank: int, max_len: int) -> dict:
    """Tile sizes, tuned for the GPU (K and N tiles scaled up under the interpreter)."""
    scale = INTERPRETER_TILE_SCALE if interpreted(kernel) else 1
    block_r = max(16, next_pow2(max_rank))
    if layout == "segment":
        return dict(BLOCK_M=min(64, max(16, next_pow2(max_len))), BLOCK_R=block_r,
                    BLOCK_K=(32 if dtype == torch.float32 else 64) * scale, BLOCK_N=64 * scale)
    wide = max(32, min(256, 4096 // block_r)) * scale  # [BLOCK_R, wide] tiles of ~4K elements
    return dict(BLOCK_R=block_r, BLOCK_K=wide, BLOCK_N=wide)


def _split_k(programs: int, k_blocks: int, device: torch.device, requested: int | None) -> int:
    """Split the reduction over K when too few programs would run (decode on a large GPU)."""
    if requested is not None:
        return requested
    split = 1
    if device.type == "cuda":
        while programs * split * 2 <= _TARGET_PROGRAMS and split * 2 <= min(16, k_blocks):
            split *= 2
    return split


def _check_stacks(stacks: list[torch.Tensor], what: str, same_shape: bool) -> None:
    """Fused [pool_rows, cols] pools share pool_rows and the column stride (A: all strides)."""
    first = stacks[0]
    for s in stacks:
        if s.dim() != 2 or s.shape[0] != first.shape[0] or s.stride(1) != first.stride(1):
            raise ValueError(f"fused {what} pools must share pool rows and column stride")
        if same_shape and (s.shape != first.shape or s.stride() != first.stride()):
            raise ValueError(f"fused {what} pools must share shape and strides")


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor | Sequence[torch.Tensor], ranks: torch.Tensor,
                offsets: torch.Tensor, max_rank: int, token_slots: torch.Tensor, segments: SegmentTensors,
                layout: str | None = None, out_dtype: torch.dtype = torch.float32,
                split_k: int | None = None) -> torch.Tensor:
    """h [T, P * max_rank] = per token and projection ``A_p[o : o + r] @ x[t]`` (o = offsets[slot],
    r = ranks[slot, p]).

    Only the cells of tokens with a slot and columns below the slot's rank are written.

    ``x`` [T, in]; ``lora_a`` one [pool_rows, in] pool or up to 3 of them (fused projections
    sharing ``x`` and the offsets); ``ranks`` [num_slots] or [num_slots, P], each <= ``max_rank``;
    ``offsets`` [num_slots] int32. Split-K needs fp32 ``h``.
    """
    stacks = _as_list(lora_a)
    _check_stacks(stacks, "A", same_shape=True)
    k = stacks[0].shape[1]
    offsets = offsets.to(device=x.device, dtype=torch.int32)  # [num_slots], as is when already so
    num_slots = offsets.shape[0]
    num_proj, num_tokens = len(stacks), x.shape[0]
    ranks = _ranks_2d(ranks, num_slots, num_proj, x.device)
    layout = layout or choose_layout(segments)
    kernel = sgmv_shrink_kernel if layout == "segment" else bgmv_shrink_kernel
    tiles = _tiles(kernel, layout, x.dtype, max_rank, segments.max_len)
    del tiles["BLOCK_N"]
    grid: tuple[int, ...]
    if layout == "segment":
        grid = (cdiv(segments.max_len, tiles["BLOCK_M"]), segments.count, num_proj)
    else:
        grid = (num_tokens, num_proj)
    fp32 = out_dtype == torch.float32
    k_blocks = cdiv(k, tiles["BLOCK_K"])
    split = _split_k(math.prod(grid), k_blocks, x.device, split_k) if fp32 else (split_k or 1)
    if split > 1 and not fp32:
        raise ValueError("split-K accumulates atomically and needs an fp32 h")
    alloc = torch.zeros if split > 1 else torch.empty  # only cells the expand reads are written
    h = alloc(num_tokens, num_proj * max_rank, dtype=out_dtype, device=x.device)  # [T, P * R]
    if segments.count == 0 or num_tokens == 0:
        return h
    base, offs = _offsets(stacks)
    args = (*offs, k, max_rank, num_proj, *x.stride(), *base.stride(), h.stride(0))
    grid = (*grid[:-1], grid[-1] * split)
    if layout == "segment":
        kernel[grid](x, base, h, ranks, offsets, segments.starts, segments.lens, segments.slots, *args,
                     SPLIT_K=split, **tiles, **dot_options(kernel, x.dtype))
    else:
        kernel[grid](x, base, h, ranks, offsets, token_slots, *args, SPLIT_K=split, **tiles)
    return h


def _output_slices(y: torch.Tensor | Sequence[torch.Tensor], outs: list[int]) -> list[torch.Tensor]:
    """One [T, out_p] view per projection: a list as given, or column slices of one fused output."""
    if isinstance(y, torch.Tensor) and len(outs) == 1:
        ys = [y]
    elif isinstance(y, torch.Tensor):
        if y.shape[1] != sum(outs):
            raise ValueError(f"fused output has {y.shape[1]} columns, projections need {sum(outs)}")
        ys = list(y.split(outs, dim=1))
    else:
        ys = list(y)
    if len(ys) != len(outs) or any(t.shape[1] != n or t.stride(1) != 1 for t, n in zip(ys, outs, strict=True)):
        raise ValueError("each output must be [T, out_p] with contiguous columns")
    return ys


def lora_expand(y: torch.Tensor | Sequence[torch.Tensor], h: torch.Tensor,
                lora_bt: torch.Tensor | Sequence[torch.Tensor], ranks: torch.Tensor, offsets: torch.Tensor,
                token_slots: torch.Tensor, segments: SegmentTensors, layout: str | None = None) -> None:
    """In place: ``y_p[t] += h[t, p*R : p*R + r] @ Bt_p[o : o + r]`` for every token with a slot
    (o = offsets[slot], r = ranks[slot, p], R = h's columns per projection).

    ``lora_bt`` one [pool_rows, out] pool or up to 3 (out may differ; strides are read, so views
    pass uncopied); ``y`` one tensor ([T, out], or [T, sum out_p] written slice by slice) or a list
    of [T, out_p].
    """
    stacks = _as_list(lora_bt)
    _check_stacks(stacks, "Bt", same_shape=False)
    offsets = offsets.to(device=h.device, dtype=torch.int32)  # [num_slots], as is when already so
    num_slots = offsets.shape[0]
    num_proj, num_tokens = len(stacks), h.shape[0]
    max_rank = h.shape[1] // num_proj
    outs = [b.shape[1] for b in stacks]
    ys = _output_slices(y, outs)
    if segments.count == 0 or num_tokens == 0:
        return
    ranks = _ranks_2d(ranks, num_slots, num_proj, h.device)
    layout = layout or choose_layout(segments)
    kernel = sgmv_expand_kernel if layout == "segment" else bgmv_expand_kernel
    tiles = _tiles(kernel, layout, stacks[0].dtype, max_rank, segments.max_len)
    del tiles["BLOCK_K"]
    n_tiles = cdiv(max(outs), tiles["BLOCK_N"])
    b_base, b_offs = _offsets(stacks)
    y_base, y_offs = _offsets(ys)
    args = (*_padded(outs), *b_offs, *_padded([b.stride(0) for b in stacks]),
            *y_offs, *_padded([t.stride(0) for t in ys]), max_rank, num_proj, n_tiles, h.stride(0), b_base.stride(1))
    if layout == "segment":
        grid = (cdiv(segments.max_len, tiles["BLOCK_M"]), segments.count, num_proj * n_tiles)
        kernel[grid](h, b_base, y_base, ranks, offsets, segments.starts, segments.lens, segments.slots, *args,
                     **tiles, **dot_options(kernel, b_base.dtype))
    else:
        kernel[(num_tokens, num_proj * n_tiles)](h, b_base, y_base, ranks, offsets, token_slots, *args, **tiles)


def triton_lora_apply(y, x: torch.Tensor, lora_a, lora_bt, ranks: torch.Tensor, offsets: torch.Tensor,
                      max_rank: int, token_slots: torch.Tensor, segments: SegmentTensors,
                      layout: str | None = None) -> None:
    """``ops.lora_apply`` semantics on the GPU (optionally fused over up to 3 projections).

    ``y`` [T, out] (or fused outputs, see ``lora_expand``) += the LoRA delta of every token with a
    slot, in place; ``token_slots`` [T] (-1 = base model); ``segments`` from the same mapping.
    """
    if segments.count == 0:
        return
    layout = layout or choose_layout(segments)
    h = lora_shrink(x, lora_a, ranks, offsets, max_rank, token_slots, segments, layout)  # [T, P * max_rank] fp32
    lora_expand(y, h, lora_bt, ranks, offsets, token_slots, segments, layout)


class TritonLoraBackend:
    """Drop-in for ``ops.lora_apply`` (same signature, same ``lora_bt`` layout) running the kernels.

    One per model: it keeps the current step's segment tensors (one mapping per step, shared by
    every layer) and device copies of rank and offset lists given as lists (a layer's ``SlotTable``
    is already on the device), so no layer copies host to device.
    """

    def __init__(self) -> None:
        self._mapping: LoraMapping | None = None
        self._segments: SegmentTensors | None = None
        self._tables: dict[tuple, torch.Tensor] = {}

    def segments_for(self, mapping: LoraMapping) -> SegmentTensors:
        if mapping is not self._mapping or self._segments is None:
            self._segments = SegmentTensors.from_segments(mapping.segments, mapping.token_slots.device)
            self._mapping = mapping
        return self._segments

    def table_for(self, values, device: torch.device) -> torch.Tensor:
        """[num_slots] int32 on ``device``: a ``SlotTable``'s device table (ranks or row offsets)
        as is, else a copy of the list cached by value (a slot change makes a new key)."""
        if getattr(values, "table", None) is not None:
            return device_table(values, device)
        key = (tuple(values), str(device))
        if key not in self._tables:
            if len(self._tables) >= _TABLE_CACHE_SIZE:
                self._tables.clear()
            self._tables[key] = device_table(key[0], device)
        return self._tables[key]

    def __call__(self, y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_bt: torch.Tensor,
                 ranks, offsets, mapping: LoraMapping) -> None:
        """``y`` [T, out] += each token's delta, in place; ``x`` [T, in]; ``ranks`` and ``offsets``
        per slot (``SlotTable`` or a list). A static mapping launches the gather kernels over every
        row with no host reads, so the launch can be captured in a CUDA graph."""
        if not (mapping.is_static or mapping.segments):
            return
        segments, layout = self.step_inputs(mapping)
        triton_lora_apply(y, x, lora_a, lora_bt, self.table_for(ranks, x.device), self.table_for(offsets, x.device),
                          rank_bound(ranks), mapping.token_slots, segments, layout)

    def shrink(self, x: torch.Tensor, lora_as: Sequence[torch.Tensor], ranks: torch.Tensor, offsets,
               max_rank: int, mapping: LoraMapping) -> torch.Tensor:
        """h [T, P * max_rank] fp32 for up to 3 projections sharing ``x`` [T, in] and ``offsets``,
        one launch; ``ranks`` [num_slots, P] int32 on the device. Pair with ``expand`` per projection."""
        segments, layout = self.step_inputs(mapping)
        return lora_shrink(x, list(lora_as), ranks, self.table_for(offsets, x.device), max_rank,
                           mapping.token_slots, segments, layout)

    def expand(self, y: torch.Tensor, h: torch.Tensor, lora_bt: torch.Tensor, ranks, offsets,
               mapping: LoraMapping) -> None:
        """``y`` [T, out] += ``h`` [T, max_rank] (one projection's columns of a fused shrink) @ Bt."""
        segments, layout = self.step_inputs(mapping)
        lora_expand(y, h, lora_bt, self.table_for(ranks, y.device), self.table_for(offsets, y.device),
                    mapping.token_slots, segments, layout)

    def step_inputs(self, mapping: LoraMapping) -> tuple[SegmentTensors, str]:
        """The step's segment tensors and layout (gather for a static mapping)."""
        if mapping.is_static:
            return self.static_segments(mapping), "gather"
        segments = self.segments_for(mapping)
        return segments, choose_layout(segments)

    @staticmethod
    def static_segments(mapping: LoraMapping) -> SegmentTensors:
        """Stand-in segments for a static mapping: the gather kernels read only ``token_slots``,
        so the tables are views of it (no allocation, no host-to-device copy while capturing);
        ``count`` 1 and ``num_tokens`` every row keep the launch unconditional."""
        unused = mapping.token_slots[:1]
        return SegmentTensors(unused, unused, unused, max_len=1, num_tokens=mapping.num_tokens)


def select_lora_backend(device: torch.device | str) -> TritonLoraBackend | None:
    """A new Triton backend for a CUDA device when triton imports; None means: use the torch ops."""
    if torch.device(device).type == "cuda" and triton_available():
        return TritonLoraBackend()
    return None
