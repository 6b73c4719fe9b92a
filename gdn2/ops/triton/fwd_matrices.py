r"""The chunk-local matrices of the forward: T, Aqk and A = (I + T)^-1 per chunk and key head, by three chunk-parallel
kernels (the forward for fp32 inputs; for 16-bit inputs the wy kernel forms them itself, fwd_wy.py).

Per chunk of 64 tokens (rows r, s = 0..63), per key head, with G the chunk-local cumsum of g (gates.py):
    T_rs   = sum_d b_rd k_rd k_sd exp(G_rd - G_sd)        s <  r        A = (I + T)^-1   (fp32)
    Aqk_rs = scale sum_d q_rd k_sd exp(G_rd - G_sd)       s <= r
A [TT, H, 64] fp32 and Aqk [TT, H, 64] depend on key-head inputs only, so grouped value heads share them.

Kernels (in launch order)
  gdn2_fwd_kernel_intra   grid (4 x chunks, key heads): one 16-row sub-chunk per program, K in slices of BK: its rows
                          of T (into A) and of Aqk, one [16, BK] x [BK, 16] product per block (the earlier sub-chunks,
                          and the diagonal block on the midpoint channels); counts the sub-chunk's channels off the
                          midpoint form (n_exact). Where there are none, the diagonal block is whole, and it stores its
                          inverse (I + T_ii)^-1 (unit_lower_inverse16) instead.
  gdn2_fwd_kernel_exact_diag  grid (4 x chunks, key heads): adds the other channels' share of the diagonal blocks
                          (exact form) and stores the block's inverse; a sub-chunk with n_exact = 0 returns at once.
                          So every diagonal block of A holds its inverse, written by the last kernel that touched it.
  gdn2_fwd_kernel_solve   grid (chunks, key heads): A = (I + T)^-1 in place, fp32: the block recursion over the
                          inverted diagonal blocks and the off-diagonal blocks of T (solve_chunk, which the wy kernel
                          with SOLVE_A calls too).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gdn2.ops.triton.gates import diag_exact_fwd, exact_channels, load_sub_chunk, midpoint_channels, midpoint_factors
from gdn2.ops.triton.tiles import (
    chunk_span,
    key_head_inputs,
    l2_rows,
    load_rows,
    store_rows,
    store_tile,
    sub_chunk_span,
)
from gdn2.ops.triton.utils import CHUNK, SUBS_PER_CHUNK, dot_precision, tuned

# Intra kernel: one 16-row sub-chunk per program, K in slices of BK. Every product is [16, BK] x [BK, 16], and Triton
# lays the warps of an M = 16 product along M, so at w > 1 each warp computes the whole block: one warp is fastest
# (docs/kernels.md#launch-configs). The first entry is the default without autotuning.
INTRA_CONFIGS = [triton.Config({"BK": bk}, num_warps=w, num_stages=st, maxnreg=reg)
                 for bk, w, st, reg in ((16, 1, 1, None), (16, 1, 2, None), (16, 1, 1, 168), (32, 2, 1, None))]
INTRA_INTERPRET = triton.Config({"BK": 32}, num_warps=4, num_stages=1)
# Exact form of the diagonal blocks, for the channels the midpoint form leaves out: one sub-chunk per program.
EXACT_CONFIGS = [triton.Config({"BK": bk}, num_warps=w, num_stages=1) for bk, w in ((32, 1), (64, 2))]
EXACT_INTERPRET = triton.Config({"BK": 32}, num_warps=1, num_stages=1)
# Solve kernel: ten [16, 16] fp32 blocks per chunk and key head (1 warp passes the check but is never picked).
SOLVE_CONFIGS = [triton.Config({}, num_warps=w, num_stages=1) for w in (4, 2)]
SOLVE_INTERPRET = triton.Config({}, num_warps=4, num_stages=1)

@triton.jit
def _earlier_block(k, g, rk, t_j, eos, cols, x_T, x_Q, mid, acc_T, acc_Q, SK, H, K: tl.constexpr,
                   USE_L2: tl.constexpr, PREC: tl.constexpr):
    """Block (i, j) of T and Aqk for an earlier sub-chunk j (rows t_j), one K slice: x_T, x_Q are the row
    sub-chunk's b k and scale q times e^(lc) (lc: its in-sub-chunk cumsum), mid the sum of g over the sub-chunks
    between j and i. Returns the updated accumulators and mid + the total of j."""
    gj = load_rows(g, t_j, eos, SK, cols, K)
    kj = load_rows(k, t_j, eos, SK, cols, K)
    kj = l2_rows(kj, rk, t_j, eos, H, USE_L2)
    tot = tl.sum(gj, 0)
    right = tl.trans(kj * tl.exp(tot[None, :] - tl.cumsum(gj, 0)))           # k_s e^(ce_j - G_s) <= 1
    f = tl.exp(mid)[None, :]                                                  # e^(cb_i - ce_j) <= 1
    acc_T += tl.dot(x_T * f, right, input_precision=PREC)
    acc_Q += tl.dot(x_Q * f, right, input_precision=PREC)
    return acc_T, acc_Q, mid + tot


@tuned(INTRA_CONFIGS, key=["K", "USE_L2", "PREC"], interpret_config=INTRA_INTERPRET, dtype_arg="q")
@triton.jit
def gdn2_fwd_kernel_intra(q, k, g, b, rq, rk, A, Aqk, n_exact, cu_seqlens, chunk_indices, scale,
                          H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, USE_L2: tl.constexpr,
                          PREC: tl.constexpr):
    """Rows of sub-chunk i (r0 = 16 i) of T (into A) and of Aqk, over K in slices of BK, as [16, BK] x [BK, 16]
    tensor-core products, one per block. Every exponent is local to a sub-chunk: with lc the inclusive cumsum of g
    inside a sub-chunk and tot its total, for r in i and s in an earlier sub-chunk j
        e^(G_r - G_s) = e^(lc_r) * e^(cb_i - ce_j) * e^(tot_j - lc_s)        (each factor <= 1)
    where cb_i - ce_j = -(sum of g over the sub-chunks between j and i). The diagonal block takes the midpoint,
    e^(lc_r - tot_i / 2) e^(tot_i / 2 - lc_s), on the midpoint channels; gdn2_fwd_kernel_exact_diag adds the
    others (n_exact [4 x chunks, H] int32: how many channels of the sub-chunk are not midpoint channels, so the
    exact kernels skip the sub-chunks without any). Where n_exact = 0 the diagonal block is whole and is stored as its
    inverse (I + T_ii)^-1, which is all the solve needs of it. Columns after the sub-chunk are stored as 0."""
    i_s, i_h = tl.program_id(0), tl.program_id(1)
    r0, i_t, bos, eos = sub_chunk_span(chunk_indices, cu_seqlens, i_s)
    SK = H * K
    S64 = H * 64
    q, k, g, b, rq, rk = key_head_inputs(q, k, g, b, rq, rk, i_h, K)
    A += i_h * 64
    Aqk += i_h * 64
    r16 = tl.arange(0, 16)
    t_c = bos + i_t * 64 + r16                               # the chunk's first sub-chunk; t_c + 16 j is sub-chunk j
    ti = t_c + r0
    T1 = tl.zeros([16, 16], dtype=tl.float32)               # blocks (i, i-1), (i, i-2), (i, i-3)
    Q1 = tl.zeros([16, 16], dtype=tl.float32)
    T2 = tl.zeros([16, 16], dtype=tl.float32)
    Q2 = tl.zeros([16, 16], dtype=tl.float32)
    T3 = tl.zeros([16, 16], dtype=tl.float32)
    Q3 = tl.zeros([16, 16], dtype=tl.float32)
    T_d = tl.zeros([16, 16], dtype=tl.float32)
    Q_d = tl.zeros([16, 16], dtype=tl.float32)
    n_mid = 0
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        lc, tot, qs_i, k_i, bk_i, gb = load_sub_chunk(q, k, g, b, rq, rk, ti, eos, tl.zeros([BK], dtype=tl.float32),
                                                      cols, scale, SK, H, K, USE_L2)
        lo = tl.exp(lc)                                      # e^(G_r - cb_i) <= 1
        x_T = bk_i * lo
        x_Q = qs_i * lo
        mid = tl.zeros([BK], dtype=tl.float32)
        if r0 >= 16:
            T1, Q1, mid = _earlier_block(k, g, rk, ti - 16, eos, cols, x_T, x_Q, mid, T1, Q1, SK, H, K, USE_L2, PREC)
        if r0 >= 32:
            T2, Q2, mid = _earlier_block(k, g, rk, ti - 32, eos, cols, x_T, x_Q, mid, T2, Q2, SK, H, K, USE_L2, PREC)
        if r0 >= 48:
            T3, Q3, mid = _earlier_block(k, g, rk, ti - 48, eos, cols, x_T, x_Q, mid, T3, Q3, SK, H, K, USE_L2, PREC)
        on = midpoint_channels(gb)
        n_mid += tl.sum((on & (cols < K)).to(tl.int32), 0)
        left, rm = midpoint_factors(lc, tl.zeros([BK], dtype=tl.float32), tot, on)
        kr = tl.trans(k_i * rm)
        T_d += tl.dot(bk_i * left, kr, input_precision=PREC)
        Q_d += tl.dot(qs_i * left, kr, input_precision=PREC)
    if r0 >= 16:
        store_tile(A, T1, ti, eos, S64, r0 - 16, 64, 16)
        store_tile(Aqk, Q1, ti, eos, S64, r0 - 16, 64, 16)
    if r0 >= 32:
        store_tile(A, T2, ti, eos, S64, r0 - 32, 64, 16)
        store_tile(Aqk, Q2, ti, eos, S64, r0 - 32, 64, 16)
    if r0 >= 48:
        store_tile(A, T3, ti, eos, S64, r0 - 48, 64, 16)
        store_tile(Aqk, Q3, ti, eos, S64, r0 - 48, 64, 16)
    T_d = tl.where(r16[:, None] > r16[None, :], T_d, 0.)
    if n_mid == K:                      # the diagonal block is whole (no exact channels): store its inverse
        T_d = unit_lower_inverse16(T_d)
    store_tile(A, T_d, ti, eos, S64, r0, 64, 16)
    store_tile(Aqk, tl.where(r16[:, None] >= r16[None, :], Q_d, 0.), ti, eos, S64, r0, 64, 16)
    c64 = tl.arange(0, 64)
    after = (ti < eos)[:, None] & (c64 >= r0 + 16)[None, :]
    zero = tl.zeros([16, 64], dtype=tl.float32)
    tl.store(A + ti[:, None] * S64 + c64[None, :], zero, mask=after)
    tl.store(Aqk + ti[:, None] * S64 + c64[None, :], zero.to(Aqk.dtype.element_ty), mask=after)
    tl.store(n_exact + i_s * H + i_h, K - n_mid)


@tuned(EXACT_CONFIGS, key=["K", "USE_L2"], interpret_config=EXACT_INTERPRET, dtype_arg="q",
       restore_value=("A", "Aqk"))
@triton.jit
def gdn2_fwd_kernel_exact_diag(q, k, g, b, rq, rk, A, Aqk, n_exact, cu_seqlens, chunk_indices, scale,
                               H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, USE_L2: tl.constexpr):
    """Adds to the diagonal blocks that gdn2_fwd_kernel_intra stored the channels it left out (exact_channels: some g
    outside [MIDPOINT_G_MIN, 0] in the sub-chunk), row by row with exact exponentials, and stores the completed
    block's inverse (I + T_ii)^-1 for the solve. A sub-chunk without such a channel (n_exact, counted by the intra
    kernel, is 0; intra stored the inverse itself) only reads that count."""
    i_s, i_h = tl.program_id(0), tl.program_id(1)
    if tl.load(n_exact + i_s * H + i_h) > 0:
        r0, i_t, bos, eos = sub_chunk_span(chunk_indices, cu_seqlens, i_s)
        SK = H * K
        S64 = H * 64
        q, k, g, b, rq, rk = key_head_inputs(q, k, g, b, rq, rk, i_h, K)
        r16 = tl.arange(0, 16)
        t0 = bos + i_t * 64 + r0
        ti = t0 + r16
        Tx = tl.zeros([16, 16], dtype=tl.float32)
        Qx = tl.zeros([16, 16], dtype=tl.float32)
        for k0 in range(0, K, BK):
            cols = k0 + tl.arange(0, BK)
            exact = exact_channels(load_rows(g, ti, eos, SK, cols, K))
            if tl.sum(exact.to(tl.int32), 0) > 0:
                kt = l2_rows(load_rows(k, ti, eos, SK, cols, K), rk, ti, eos, H, USE_L2)
                Tx, Qx = diag_exact_fwd(q, k, g, b, rq, rk, t0, eos, cols, kt, exact, Tx, Qx, scale, SK, H, K, BK,
                                        USE_L2)
        pa = A + i_h * 64 + ti[:, None] * S64 + r0 + r16[None, :]
        pq = Aqk + i_h * 64 + ti[:, None] * S64 + r0 + r16[None, :]
        rows = (ti < eos)[:, None]
        T_ii = tl.load(pa, mask=rows, other=0.) + tl.where(r16[:, None] > r16[None, :], Tx, 0.)
        tl.store(pa, unit_lower_inverse16(T_ii), mask=rows)
        tl.store(pq, (tl.load(pq, mask=rows, other=0.).to(tl.float32)
                      + tl.where(r16[:, None] >= r16[None, :], Qx, 0.)).to(Aqk.dtype.element_ty), mask=rows)


@triton.jit
def unit_lower_inverse16(Tm):
    """(I + Tm)^-1 for a strictly lower triangular [16, 16] fp32 Tm. Tm is nilpotent (Tm^16 = 0), so with P = -Tm
    (I + Tm)^-1 = I + P + ... + P^15 = (I + P)(I + P^2)(I + P^4)(I + P^8): six fp32 products (IEEE), no serial
    row-by-row substitution (half the solve kernel's time of forward substitution, docs/kernels.md#precision). Its
    rounding against float64 matches forward substitution's (relative error ~1e-7), also for blocks whose inverse
    reaches ~1e4; tests/test_triton_chunk.py checks it."""
    r16 = tl.arange(0, 16)
    P = -Tm
    X = (r16[:, None] == r16[None, :]).to(tl.float32) + P
    P = tl.dot(P, P, input_precision="ieee")
    X += tl.dot(X, P, input_precision="ieee")
    P = tl.dot(P, P, input_precision="ieee")
    X += tl.dot(X, P, input_precision="ieee")
    P = tl.dot(P, P, input_precision="ieee")
    return X + tl.dot(X, P, input_precision="ieee")


@triton.jit
def _load16(ptr, t, eos, col0, stride_t):
    """[16, 16] fp32 block of a [TT, ., 64] per-chunk matrix: rows t (0 past eos), columns col0 .. col0 + 15."""
    return load_rows(ptr, t, eos, stride_t, col0 + tl.arange(0, 16), 64)


@triton.jit
def _store16(ptr, blk, t, eos, col0, stride_t):
    store_rows(ptr, blk, t, eos, stride_t, col0 + tl.arange(0, 16), 64)


@triton.jit
def solve_chunk(A, t0, eos, S64, INVERT_DIAG: tl.constexpr):
    """A = (I + T)^-1 in place for the chunk whose rows start at token t0, A pointing at its key head's columns
    ([TT, ., 64] fp32, row stride S64): reads the off-diagonal [16, 16] blocks of the strictly lower T and the
    diagonal blocks, inverted already (A_ii) or, with INVERT_DIAG, still T_ii (then inverted here by
    unit_lower_inverse16). The block recursion A_ij = -A_ii sum_{j <= m < i} T_im A_mj (all fp32, IEEE
    products) fills the off-diagonal blocks."""
    ta = t0 + tl.arange(0, 16)
    tb = ta + 16
    tc = ta + 32
    td = ta + 48
    Tba = _load16(A, tb, eos, 0, S64)
    Tca = _load16(A, tc, eos, 0, S64)
    Tcb = _load16(A, tc, eos, 16, S64)
    Tda = _load16(A, td, eos, 0, S64)
    Tdb = _load16(A, td, eos, 16, S64)
    Tdc = _load16(A, td, eos, 32, S64)
    Aaa = _load16(A, ta, eos, 0, S64)
    Abb = _load16(A, tb, eos, 16, S64)
    Acc = _load16(A, tc, eos, 32, S64)
    Add = _load16(A, td, eos, 48, S64)
    if INVERT_DIAG:
        Aaa = unit_lower_inverse16(Aaa)
        Abb = unit_lower_inverse16(Abb)
        Acc = unit_lower_inverse16(Acc)
        Add = unit_lower_inverse16(Add)
        _store16(A, Aaa, ta, eos, 0, S64)
        _store16(A, Abb, tb, eos, 16, S64)
        _store16(A, Acc, tc, eos, 32, S64)
        _store16(A, Add, td, eos, 48, S64)
    Aba = -tl.dot(Abb, tl.dot(Tba, Aaa, input_precision="ieee"), input_precision="ieee")
    Acb = -tl.dot(Acc, tl.dot(Tcb, Abb, input_precision="ieee"), input_precision="ieee")
    Aca = -tl.dot(Acc, tl.dot(Tca, Aaa, input_precision="ieee") + tl.dot(Tcb, Aba, input_precision="ieee"),
                  input_precision="ieee")
    Adc = -tl.dot(Add, tl.dot(Tdc, Acc, input_precision="ieee"), input_precision="ieee")
    Adb = -tl.dot(Add, tl.dot(Tdb, Abb, input_precision="ieee") + tl.dot(Tdc, Acb, input_precision="ieee"),
                  input_precision="ieee")
    Ada = -tl.dot(Add, tl.dot(Tda, Aaa, input_precision="ieee") + tl.dot(Tdb, Aba, input_precision="ieee")
                  + tl.dot(Tdc, Aca, input_precision="ieee"), input_precision="ieee")
    _store16(A, Aba, tb, eos, 0, S64)
    _store16(A, Aca, tc, eos, 0, S64)
    _store16(A, Acb, tc, eos, 16, S64)
    _store16(A, Ada, td, eos, 0, S64)
    _store16(A, Adb, td, eos, 16, S64)
    _store16(A, Adc, td, eos, 32, S64)


@tuned(SOLVE_CONFIGS, key=["H"], interpret_config=SOLVE_INTERPRET, dtype_arg="A", restore_value=("A",))
@triton.jit
def gdn2_fwd_kernel_solve(A, cu_seqlens, chunk_indices, H: tl.constexpr):
    """A = (I + T)^-1 in place, per chunk and key head, from what the intra and exact_diag kernels left in A: the
    off-diagonal [16, 16] blocks of the strictly lower T, and the diagonal blocks already inverted (solve_chunk)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_t, bos, eos = chunk_span(chunk_indices, cu_seqlens, i_c)
    solve_chunk(A + i_h * 64, bos + i_t * 64, eos, H * 64, False)


def chunk_matrices(q, n_chunks, with_n_exact: bool = True):
    """Empty A (fp32) and Aqk (q's dtype) per key head, [TT, H, 64] each, and n_exact [4 x chunks, H] int32 (None
    unless with_n_exact): what local_matrices, or the wy kernel with SOLVE_A, fills."""
    TT, H, _ = q.shape
    A = torch.empty(TT, H, CHUNK, device=q.device, dtype=torch.float32)
    Aqk = torch.empty(TT, H, CHUNK, device=q.device, dtype=torch.float32 if q.dtype == torch.float32 else q.dtype)
    n_exact = torch.empty(SUBS_PER_CHUNK * n_chunks, H, device=q.device, dtype=torch.int32) if with_n_exact else None
    return A, Aqk, n_exact


def local_matrices(q, k, g, b, rq, rk, scale, layout, use_l2):
    """The intra, exact_diag and solve launches: A = (I + T)^-1 (fp32) and Aqk (q's dtype) per key head, [TT, H, 64]
    each; n_exact [4 x chunks, H] int32, the number of channels per sub-chunk off the midpoint form (the exact kernels
    skip the sub-chunks where it is 0)."""
    cu, chunk_indices, _, n_chunks = layout
    TT, H, K = q.shape
    A, Aqk, n_exact = chunk_matrices(q, n_chunks)
    grid = (SUBS_PER_CHUNK * n_chunks, H)
    gdn2_fwd_kernel_intra[grid](q, k, g, b, rq, rk, A, Aqk, n_exact, cu, chunk_indices, scale,
                                H=H, K=K, USE_L2=use_l2, PREC=dot_precision(q.dtype))
    gdn2_fwd_kernel_exact_diag[grid](q, k, g, b, rq, rk, A, Aqk, n_exact, cu, chunk_indices, scale,
                                     H=H, K=K, USE_L2=use_l2)
    gdn2_fwd_kernel_solve[(n_chunks, H)](A, cu, chunk_indices, H=H)
    return A, Aqk, n_exact
