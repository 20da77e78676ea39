"""Host side of the Triton LoRA apply: segment tables, layout and tile choice, kernel launches.

``TritonLoraBackend`` is a drop-in for ``ops.lora_apply`` (same signature, same buffers: flat 1-D
``lora_a`` / ``lora_bt``, slot ``s`` of rank ``r`` at elements ``a_offsets[s] .. a_offsets[s] + r * in
- 1`` of A and ``b_offsets[s] .. b_offsets[s] + r * out - 1`` of Bt, two unrelated offset tables);
the kernels and the loop they compute are in ``triton_kernels.py``. ``lora_shrink`` /
``lora_expand`` also take up to ``MAX_FUSED`` projections that share their input (q/k/v, gate/up)
in one launch each, each projection with its own buffer (or one shared) and its own column of the
[num_slots, P] rank and offset tables. Layouts:
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

MAX_FUSED = 3  # projections per launch (q/k/v); the kernels take this many buffer offsets
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


def _check_buffers(buffers: list[torch.Tensor], what: str) -> None:
    """Weight buffers are 1-D with unit stride (rows of a slot are contiguous); fused ones may be
    one buffer or several (``_offsets`` checks they share dtype and device)."""
    if any(b.dim() != 1 or (b.numel() > 1 and b.stride(0) != 1) for b in buffers):
        raise ValueError(f"{what} buffers must be 1-D and contiguous")


def _slot_table(values: torch.Tensor | Sequence[int], num_proj: int, device: torch.device,
                what: str, num_slots: int | None = None) -> torch.Tensor:
    """[num_slots, num_proj] int32 on ``device`` (as is when already so): a per-projection table of
    ranks or element offsets; [num_slots] is accepted only when num_proj == 1. Shapes are checked,
    values are not (no device-to-host read)."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(list(values), dtype=torch.int32)
    if t.dim() == 1 and num_proj == 1:
        t = t[:, None]
    if t.dim() != 2 or t.shape[1] != num_proj or (num_slots is not None and t.shape[0] != num_slots):
        want = f"[{num_slots if num_slots is not None else 'num_slots'}, {num_proj}]"
        raise ValueError(f"{what} must be {want}" + (" or [num_slots]" if num_proj == 1 else "")
                         + f", got {list(t.shape)}")
    return t.to(device=device, dtype=torch.int32).contiguous()


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor | Sequence[torch.Tensor], ranks: torch.Tensor,
                a_offsets: torch.Tensor, max_rank: int, token_slots: torch.Tensor, segments: SegmentTensors,
                layout: str | None = None, out_dtype: torch.dtype = torch.float32,
                split_k: int | None = None) -> torch.Tensor:
    """h [T, P * max_rank], per token t with slot s and projection p:

        r, a = ranks[s, p], a_offsets[s, p]
        h[t, p*R : p*R + r] = lora_a[p][a : a + r * in].view(r, in) @ x[t]     # R = max_rank

    Only the cells of tokens with a slot and columns below the slot's rank are written.

    ``x`` [T, in]; ``lora_a`` one 1-D buffer or up to 3 (fused projections sharing ``x``; the
    same buffer may be given for several); ``ranks`` [num_slots] or [num_slots, P], each <=
    ``max_rank``; ``a_offsets`` int32 element offsets, [num_slots, P] ([num_slots] when P == 1),
    not checked against the buffers' sizes. Split-K needs fp32 ``h``.
    """
    buffers = _as_list(lora_a)
    _check_buffers(buffers, "A")
    num_proj, num_tokens, k = len(buffers), x.shape[0], x.shape[1]
    ranks = _slot_table(ranks, num_proj, x.device, "ranks")  # [num_slots, P]
    a_offsets = _slot_table(a_offsets, num_proj, x.device, "a_offsets", ranks.shape[0])  # [num_slots, P]
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
    base, offs = _offsets(buffers)
    args = (*offs, k, max_rank, num_proj, *x.stride(), h.stride(0))
    grid = (*grid[:-1], grid[-1] * split)
    if layout == "segment":
        kernel[grid](x, base, h, ranks, a_offsets, segments.starts, segments.lens, segments.slots, *args,
                     SPLIT_K=split, **tiles, **dot_options(kernel, x.dtype))
    else:
        kernel[grid](x, base, h, ranks, a_offsets, token_slots, *args, SPLIT_K=split, **tiles)
    return h


def _output_slices(y: torch.Tensor | Sequence[torch.Tensor], num_proj: int) -> list[torch.Tensor]:
    """One [T, out_p] view per projection: a list as given (column views of one fused output pass
    uncopied), or one tensor for one projection. The widths come from the outputs: flat Bt
    buffers do not carry them."""
    ys = [y] if isinstance(y, torch.Tensor) else list(y)
    if len(ys) != num_proj:
        raise ValueError(f"{num_proj} projections need {num_proj} outputs, got {len(ys)}")
    if any(t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1) for t in ys):
        raise ValueError("each output must be [T, out_p] with contiguous columns")
    return ys


def lora_expand(y: torch.Tensor | Sequence[torch.Tensor], h: torch.Tensor,
                lora_bt: torch.Tensor | Sequence[torch.Tensor], ranks: torch.Tensor, b_offsets: torch.Tensor,
                token_slots: torch.Tensor, segments: SegmentTensors, layout: str | None = None) -> None:
    """In place, per token t with slot s and projection p (R = h's columns per projection):

        r, b = ranks[s, p], b_offsets[s, p]
        y_p[t] += h[t, p*R : p*R + r] @ lora_bt[p][b : b + r * out_p].view(r, out_p)

    ``lora_bt`` one 1-D buffer or up to 3 (the same buffer may be given for several); ``y`` one
    [T, out] tensor, or a list of [T, out_p] (e.g. column views of one fused output), out_p =
    y_p.shape[1]; ``b_offsets`` int32 element offsets, [num_slots, P] ([num_slots] when P == 1),
    unrelated to the shrink's ``a_offsets`` and not checked against the buffers' sizes.
    """
    buffers = _as_list(lora_bt)
    _check_buffers(buffers, "Bt")
    num_proj, num_tokens = len(buffers), h.shape[0]
    ys = _output_slices(y, num_proj)
    ranks = _slot_table(ranks, num_proj, h.device, "ranks")  # [num_slots, P]
    b_offsets = _slot_table(b_offsets, num_proj, h.device, "b_offsets", ranks.shape[0])  # [num_slots, P]
    if segments.count == 0 or num_tokens == 0:
        return
    max_rank = h.shape[1] // num_proj
    outs = [t.shape[1] for t in ys]
    layout = layout or choose_layout(segments)
    kernel = sgmv_expand_kernel if layout == "segment" else bgmv_expand_kernel
    tiles = _tiles(kernel, layout, buffers[0].dtype, max_rank, segments.max_len)
    del tiles["BLOCK_K"]
    n_tiles = cdiv(max(outs), tiles["BLOCK_N"])
    b_base, b_offs = _offsets(buffers)
    y_base, y_offs = _offsets(ys)
    args = (*_padded(outs), *b_offs, *y_offs, *_padded([t.stride(0) for t in ys]), max_rank, num_proj, n_tiles,
            h.stride(0))
    if layout == "segment":
        grid = (cdiv(segments.max_len, tiles["BLOCK_M"]), segments.count, num_proj * n_tiles)
        kernel[grid](h, b_base, y_base, ranks, b_offsets, segments.starts, segments.lens, segments.slots, *args,
                     **tiles, **dot_options(kernel, b_base.dtype))
    else:
        kernel[(num_tokens, num_proj * n_tiles)](h, b_base, y_base, ranks, b_offsets, token_slots, *args, **tiles)


def triton_lora_apply(y, x: torch.Tensor, lora_a, lora_bt, ranks: torch.Tensor, a_offsets: torch.Tensor,
                      b_offsets: torch.Tensor, max_rank: int, token_slots: torch.Tensor, segments: SegmentTensors,
                      layout: str | None = None) -> None:
    """``ops.lora_apply`` semantics on the GPU (optionally fused over up to 3 projections):

        for t with s = token_slots[t] >= 0:
            for p in range(P):
                r, a, b = ranks[s, p], a_offsets[s, p], b_offsets[s, p]
                h = lora_a[p][a : a + r * in].view(r, in) @ x[t]              # fp32
                y_p[t] += h @ lora_bt[p][b : b + r * out_p].view(r, out_p)

    ``y`` [T, out] (or a list of outputs, see ``lora_expand``), in place; ``token_slots`` [T] (-1
    = base model); ``segments`` from the same mapping.
    """
    if segments.count == 0:
        return
    layout = layout or choose_layout(segments)
    h = lora_shrink(x, lora_a, ranks, a_offsets, max_rank, token_slots, segments, layout)  # [T, P * max_rank] fp32
    lora_expand(y, h, lora_bt, ranks, b_offsets, token_slots, segments, layout)


class TritonLoraBackend:
    """Drop-in for ``ops.lora_apply`` (same signature, same flat buffers) running the kernels.

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
        """[num_slots] int32 on ``device``: a ``SlotTable``'s device table (ranks or element
        offsets) as is, else a copy of the list cached by value (a slot change makes a new key)."""
        if getattr(values, "table", None) is not None:
            return device_table(values, device)
        key = (tuple(values), str(device))
        if key not in self._tables:
            if len(self._tables) >= _TABLE_CACHE_SIZE:
                self._tables.clear()
            self._tables[key] = device_table(key[0], device)
        return self._tables[key]

    def projection_table(self, values, device: torch.device) -> torch.Tensor:
        """[num_slots, P] int32 on ``device``: a tensor as is, else P per-slot values (``SlotTable``s
        or lists, one per projection) stacked as columns (one small device op, no host copy for
        ``SlotTable``s)."""
        if isinstance(values, torch.Tensor):
            return values
        return torch.stack([self.table_for(v, device) for v in values], dim=1)

    def __call__(self, y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_bt: torch.Tensor,
                 ranks, a_offsets, b_offsets, mapping: LoraMapping) -> None:
        """``y`` [T, out] += each token's delta, in place; ``x`` [T, in]; ``lora_a`` / ``lora_bt``
        1-D buffers; ``ranks`` and the element offsets ``a_offsets`` / ``b_offsets`` per slot
        (``SlotTable`` or a list). A static mapping launches the gather kernels over every row with
        no host reads, so the launch can be captured in a CUDA graph."""
        if not (mapping.is_static or mapping.segments):
            return
        segments, layout = self.step_inputs(mapping)
        dev = x.device
        triton_lora_apply(y, x, lora_a, lora_bt, self.table_for(ranks, dev), self.table_for(a_offsets, dev),
                          self.table_for(b_offsets, dev), rank_bound(ranks), mapping.token_slots, segments, layout)

    def shrink(self, x: torch.Tensor, lora_as: Sequence[torch.Tensor], ranks: torch.Tensor, a_offsets,
               max_rank: int, mapping: LoraMapping) -> torch.Tensor:
        """h [T, P * max_rank] fp32 for up to 3 projections sharing ``x`` [T, in], one launch;
        ``ranks`` [num_slots, P] int32 on the device; ``a_offsets`` each projection's element
        offsets: P ``SlotTable``s / lists, or a [num_slots, P] tensor. Pair with ``expand`` per
        projection."""
        segments, layout = self.step_inputs(mapping)
        return lora_shrink(x, list(lora_as), ranks, self.projection_table(a_offsets, x.device), max_rank,
                           mapping.token_slots, segments, layout)

    def expand(self, y: torch.Tensor, h: torch.Tensor, lora_bt: torch.Tensor, ranks, b_offsets,
               mapping: LoraMapping) -> None:
        """``y`` [T, out] += ``h`` [T, max_rank] (one projection's columns of a fused shrink) @ Bt,
        Bt of slot s at element ``b_offsets[s]`` of ``lora_bt`` (1-D)."""
        segments, layout = self.step_inputs(mapping)
        lora_expand(y, h, lora_bt, self.table_for(ranks, y.device), self.table_for(b_offsets, y.device),
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
