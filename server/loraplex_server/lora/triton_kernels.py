"""Triton kernels for the batched LoRA apply: shrink ``h = A[s] @ x`` then expand ``y += h @ Bt[s]``.

The maths is ``ops.lora_apply_reference``, generalised to ``P`` fused projections that share
their input (q/k/v, gate/up; ``P = 1`` is a plain module). Weights live in flat 1-D buffers
``A_p`` and ``Bt_p`` (B transposed, scale folded in, as ``LoraLinear`` keeps them; projections may
share one buffer): slot ``s`` of projection ``p`` is ``r = ranks[s, p]`` contiguous rows of ``in``
elements at element ``a_off[s, p]`` of ``A_p`` and ``r`` rows of ``out_p`` at ``b_off[s, p]`` of
``Bt_p`` (two unrelated offset tables, one column per projection); ``R`` is the largest rank
(``h``'s stride per projection):

    for t in range(num_tokens):
        s = token_slots[t]
        if s < 0:
            continue                                    # base-model row: y[t] stays as it is
        for p in range(P):
            r = ranks[s, p]                             # 0: the slot's adapter skips this projection
            a, b = a_off[s, p], b_off[s, p]
            for j in range(r):                          # shrink, fp32 accumulation
                h[t, p * R + j] = sum(A_p[a + j * in + k] * x[t, k] for k in range(in))
            for n in range(out_p):                      # expand, added in place
                y_p[t, n] += sum(h[t, p * R + j] * Bt_p[b + j * out_p + n] for j in range(r))

``h`` is rounded to the weights' dtype before the expand, as the torch path does. Two layouts:

- segment (SGMV): programs per (row block of one segment, projection, ...), tiles through
  ``tl.dot``. For prefill, where a segment holds many tokens of one adapter.
- gather (BGMV): one program per token (and projection, ...), reductions through ``tl.reduce`` (a sum).
  For decode, where segments are a token or two long.

Fused buffers (and outputs) are separate tensors or views of one buffer, addressed as element
offsets from the lowest-addressed one, passed as scalar kernel arguments (no per-call device
tensors); a slot's base is ``ptr + that offset + a_off[s, p]`` in int64. Launches, tile sizes and
argument checks live in ``triton_ops.py``. Without triton installed this module still imports (the
kernels stay plain, never-launched functions; see ``triton_common``).
"""

from ..triton_common import dot, jit, tl, tl_sum

_OFFSETS = ["off0", "off1", "off2"]


@jit()
def _pick(p, v0, v1, v2):
    """``(v0, v1, v2)[p]`` for a runtime projection index."""
    return tl.where(p == 0, v0, tl.where(p == 1, v1, v2))


@jit()
def _shrink_tile(x_ptr, a_ptr, rows, row_ok, rank, k_lo, k_hi, K, sx_t, sx_k,
                 BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """[BLOCK_M, BLOCK_R] tile, rows of ``a`` K elements apart:

        for m, j (j < rank): acc[m, j] = sum(x[rows[m], k] * a[j * K + k] for k in range(k_lo, k_hi))
    """
    cols = tl.arange(0, BLOCK_R)
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_hi
        xt = tl.load(x_ptr + rows[:, None] * sx_t + ks[None, :] * sx_k,
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        at = tl.load(a_ptr + cols[None, :] * K + ks[:, None],
                     mask=(cols[None, :] < rank) & k_ok[:, None], other=0.0)  # [BLOCK_K, BLOCK_R]
        acc += dot(xt, at.to(xt.dtype), PRECISION, UPCAST)
    return acc


@jit()
def _k_range(K, split, SPLIT_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """This split's [k_lo, k_hi) of the reduction (whole BLOCK_K blocks, the last one cut at K)."""
    k_span = (K + SPLIT_K * BLOCK_K - 1) // (SPLIT_K * BLOCK_K) * BLOCK_K
    k_lo = split * k_span
    return k_lo, tl.minimum(k_lo + k_span, K)


@jit(do_not_specialize=_OFFSETS)
def sgmv_shrink_kernel(x_ptr, a_ptr, h_ptr, ranks_ptr, a_offsets_ptr, seg_start_ptr, seg_len_ptr, seg_slot_ptr,
                        off0, off1, off2, K, R, P, sx_t, sx_k, sh_t,
                        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                        SPLIT_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Segment shrink; grid (row blocks, segments, P * SPLIT_K). For each segment (start, len, s):

        for t in range(start, start + len):
            for p in range(P):
                r, a = ranks[s, p], a_off[s, p]
                A = A_p[a : a + r * K].view(r, K)         # A_p at a_ptr + off_p
                h[t, p*R : p*R + r] = A @ x[t]            # fp32; atomic under split-K
    """
    pid_m, seg, pid_pk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    p, split = pid_pk // SPLIT_K, pid_pk % SPLIT_K
    seg_len = tl.load(seg_len_ptr + seg)
    slot = tl.load(seg_slot_ptr + seg).to(tl.int64)
    rank = tl.load(ranks_ptr + slot * P + p)
    if (pid_m * BLOCK_M >= seg_len) | (rank == 0):
        return
    local = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = local < seg_len
    rows = (tl.load(seg_start_ptr + seg) + local).to(tl.int64)  # [BLOCK_M] token rows
    k_lo, k_hi = _k_range(K, split, SPLIT_K, BLOCK_K)
    a_base = a_ptr + _pick(p, off0, off1, off2) + tl.load(a_offsets_ptr + slot * P + p).to(tl.int64)
    acc = _shrink_tile(x_ptr, a_base, rows, row_ok, rank, k_lo, k_hi, K, sx_t, sx_k,
                       BLOCK_M, BLOCK_R, BLOCK_K, PRECISION, UPCAST)  # [BLOCK_M, BLOCK_R]
    cols = tl.arange(0, BLOCK_R)
    ptrs = h_ptr + rows[:, None] * sh_t + (p * R + cols)[None, :]
    mask = row_ok[:, None] & (cols[None, :] < rank)
    if SPLIT_K == 1:
        tl.store(ptrs, acc.to(h_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ptrs, acc, mask=mask)


@jit(do_not_specialize=_OFFSETS)
def bgmv_shrink_kernel(x_ptr, a_ptr, h_ptr, ranks_ptr, a_offsets_ptr, token_slots_ptr, off0, off1, off2,
                        K, R, P, sx_t, sx_k, sh_t,
                        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """Gather shrink; grid (tokens, P * SPLIT_K). For token t with slot s = token_slots[t] >= 0:

        for p in range(P):
            r, a = ranks[s, p], a_off[s, p]               # A_p at a_ptr + off_p
            for j in range(r):
                h[t, p*R + j] = sum(A_p[a + j * K + k] * x[t, k] for k in range(K))   # fp32
    """
    t, pid_pk = tl.program_id(0).to(tl.int64), tl.program_id(1)
    p, split = pid_pk // SPLIT_K, pid_pk % SPLIT_K
    slot = tl.load(token_slots_ptr + t).to(tl.int64)
    if slot < 0:
        return
    rank = tl.load(ranks_ptr + slot * P + p)
    if rank == 0:
        return
    cols = tl.arange(0, BLOCK_R)
    k_lo, k_hi = _k_range(K, split, SPLIT_K, BLOCK_K)
    a_base = a_ptr + _pick(p, off0, off1, off2) + tl.load(a_offsets_ptr + slot * P + p).to(tl.int64)
    acc = tl.full((BLOCK_R,), 0.0, tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_hi
        xk = tl.load(x_ptr + t * sx_t + ks * sx_k, mask=k_ok, other=0.0).to(tl.float32)  # [BLOCK_K]
        at = tl.load(a_base + cols[:, None] * K + ks[None, :],
                     mask=(cols[:, None] < rank) & k_ok[None, :], other=0.0)  # [BLOCK_R, BLOCK_K]
        acc += tl_sum(at.to(tl.float32) * xk[None, :], 1)
    ptrs = h_ptr + t * sh_t + p * R + cols
    if SPLIT_K == 1:
        tl.store(ptrs, acc.to(h_ptr.dtype.element_ty), mask=cols < rank)
    else:
        tl.atomic_add(ptrs, acc, mask=cols < rank)


@jit()
def _bt_tile(b_ptr, p, slot, P, b_offsets_ptr, rank, tile, n_out, b0, b1, b2,
             BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """The tile's columns of slot ``slot``'s Bt for projection ``p`` (rows ``n_out`` apart), zeros
    past rank and out_p, with the tile's column indices and their in-range mask:

        b = b_off[slot, p]; Bt = Bt_p[b : b + rank * n_out].view(rank, n_out)   # Bt_p at b_ptr + b_p
        tile = Bt[:, tile * BLOCK_N : (tile + 1) * BLOCK_N]                       # [BLOCK_R, BLOCK_N]
    """
    cols = tl.arange(0, BLOCK_R)
    ns = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < n_out
    b_base = b_ptr + _pick(p, b0, b1, b2) + tl.load(b_offsets_ptr + slot * P + p).to(tl.int64)
    bt = tl.load(b_base + cols[:, None] * n_out + ns[None, :],
                 mask=(cols[:, None] < rank) & n_ok[None, :], other=0.0)
    return bt, ns, n_ok


@jit(do_not_specialize=["b0", "b1", "b2", "y0", "y1", "y2"])
def sgmv_expand_kernel(h_ptr, b_ptr, y_ptr, ranks_ptr, b_offsets_ptr, seg_start_ptr, seg_len_ptr, seg_slot_ptr,
                        n0, n1, n2, b0, b1, b2, y0, y1, y2, ys0, ys1, ys2, R, P, N_TILES, sh_t,
                        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                        PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Segment expand; grid (row blocks, segments, P * N_TILES). For each segment (start, len, s):

        for t in range(start, start + len):
            for p in range(P):
                r, b = ranks[s, p], b_off[s, p]
                Bt = Bt_p[b : b + r * out_p].view(r, out_p)   # Bt_p at b_ptr + b_p, out_p = n_p
                y_p[t, :] += h[t, p*R : p*R + r] @ Bt         # fp32 accumulation, in place
    """
    pid_m, seg, pid_pn = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    p, tile = pid_pn // N_TILES, pid_pn % N_TILES
    n_out = _pick(p, n0, n1, n2)
    seg_len = tl.load(seg_len_ptr + seg)
    slot = tl.load(seg_slot_ptr + seg).to(tl.int64)
    rank = tl.load(ranks_ptr + slot * P + p)
    if (pid_m * BLOCK_M >= seg_len) | (rank == 0) | (tile * BLOCK_N >= n_out):
        return
    local = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = local < seg_len
    rows = (tl.load(seg_start_ptr + seg) + local).to(tl.int64)  # [BLOCK_M]
    cols = tl.arange(0, BLOCK_R)
    bt, ns, n_ok = _bt_tile(b_ptr, p, slot, P, b_offsets_ptr, rank, tile, n_out, b0, b1, b2,
                            BLOCK_R, BLOCK_N)  # [BLOCK_R, BLOCK_N]
    ht = tl.load(h_ptr + rows[:, None] * sh_t + (p * R + cols)[None, :],
                 mask=row_ok[:, None] & (cols[None, :] < rank), other=0.0)  # [BLOCK_M, BLOCK_R]
    acc = dot(ht.to(bt.dtype), bt, PRECISION, UPCAST)  # [BLOCK_M, BLOCK_N]
    y_ptrs = y_ptr + _pick(p, y0, y1, y2) + rows[:, None] * _pick(p, ys0, ys1, ys2) + ns[None, :]
    mask = row_ok[:, None] & n_ok[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=mask)


@jit(do_not_specialize=["b0", "b1", "b2", "y0", "y1", "y2"])
def bgmv_expand_kernel(h_ptr, b_ptr, y_ptr, ranks_ptr, b_offsets_ptr, token_slots_ptr,
                        n0, n1, n2, b0, b1, b2, y0, y1, y2, ys0, ys1, ys2, R, P, N_TILES, sh_t,
                        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """Gather expand; grid (tokens, P * N_TILES). For token t with slot s = token_slots[t] >= 0:

        for p in range(P):
            r, b = ranks[s, p], b_off[s, p]               # Bt_p at b_ptr + b_p, out_p = n_p
            for n in range(out_p):
                y_p[t, n] += sum(h[t, p*R + j] * Bt_p[b + j * out_p + n] for j in range(r))   # fp32
    """
    t, pid_pn = tl.program_id(0).to(tl.int64), tl.program_id(1)
    p, tile = pid_pn // N_TILES, pid_pn % N_TILES
    n_out = _pick(p, n0, n1, n2)
    slot = tl.load(token_slots_ptr + t).to(tl.int64)
    if (slot < 0) | (tile * BLOCK_N >= n_out):
        return
    rank = tl.load(ranks_ptr + slot * P + p)
    if rank == 0:
        return
    cols = tl.arange(0, BLOCK_R)
    bt, ns, n_ok = _bt_tile(b_ptr, p, slot, P, b_offsets_ptr, rank, tile, n_out, b0, b1, b2,
                            BLOCK_R, BLOCK_N)  # [BLOCK_R, BLOCK_N]
    ht = tl.load(h_ptr + t * sh_t + p * R + cols, mask=cols < rank, other=0.0)  # [BLOCK_R]
    ht = ht.to(bt.dtype).to(tl.float32)
    acc = tl_sum(bt.to(tl.float32) * ht[:, None], 0)  # [BLOCK_N]
    y_ptrs = y_ptr + _pick(p, y0, y1, y2) + t * _pick(p, ys0, ys1, ys2) + ns
    y = tl.load(y_ptrs, mask=n_ok, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=n_ok)
