r"""The wy kernel: the state-independent work of each chunk, one chunk-parallel launch.

Per chunk (rows r = 0..63) and key head, with G the chunk-local cumsum of g and A = (I + T)^-1 (fwd_matrices.py):
    E_r = exp(G_r) b_r k_r,   Z_r = w_r v_r,   Q_r = scale exp(G_r) q_r,   Kt_r = exp(G_C - G_r) k_r
    Y = A E,   U = A Z        (one inverse serves the erase and the write side)
Stored: Y, Q, Kt [TT, H, K] and U [TT, Hv, V] in v's dtype (the tensor-core operand dtype), exp(G_C) [NC, H, K] fp32.

  gdn2_fwd_kernel_wy   grid (chunks, key heads), K in blocks of BK (64 or 32, a launch config).
  SOLVE_A              the kernel forms T and Aqk itself (chunk_pairs: one [64, BK] x [BK, 64] product each per K
                       block, the exponent split at one reference per chunk and channel, gates.py), inverts T in place
                       in A's buffer (fwd_matrices.solve_chunk), then goes on as above: the forward's only
                       chunk-parallel launch. COUNT_EXACT (training) also stores n_exact for the backward.
  APPLY_A              (with SOLVE_A, inference) the state kernel applies A itself: the kernel stores E (into Y), Q,
                       Kt and exp(G_C) in its one pass over the inputs and stops after the solve (no Y = A E, no U).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gdn2.ops.triton.fwd_matrices import solve_chunk
from gdn2.ops.triton.gates import (
    CHUNK_SPAN,
    chunk_cumsum,
    chunk_key_side,
    diag_exact_fwd,
    exact_channels,
    midpoint_factors,
)
from gdn2.ops.triton.tiles import chunk_span, l2_rows, load_rows, store_rows, store_tile, tile
from gdn2.ops.triton.utils import SERIAL_PRECISION, block_sizes, dot_precision, tuned

# BK (the K block) is a launch config; BV is fixed by the shape (<= 64). Four entries at 4 warps: register caps spill
# and 8 warps measured slower (docs/kernels.md#launch-configs).
WY_CONFIGS = [triton.Config({"BK": bk}, num_warps=4, num_stages=st) for bk, st in ((64, 1), (64, 2), (32, 2), (32, 1))]
WY_INTERPRET = triton.Config({"BK": 32}, num_warps=4, num_stages=1)


@triton.jit
def wide_channels_exact(q, k, g, b, rq, rk, t0, t, eos, k0, wide, T, Aqk, scale, SK, H, K: tl.constexpr,
                        BK: tl.constexpr, USE_L2: tl.constexpr):
    """T, Aqk [64, 64] plus the share of the channels k0 .. k0 + BK marked in `wide` [BK] (int 0 / 1), row by row with
    exact exponentials (diag_exact_fwd over the chunk's 64 rows), in slices of 16 channels so that few registers are
    live beside T and Aqk; a slice without a marked channel is skipped. The marks are taken from the caller, so the
    exact form covers exactly the channels the midpoint product left out (deciding again from a recomputed cumsum
    could round the other way at the threshold)."""
    per16 = tl.reshape(wide, [BK // 16, 16])
    slices = tl.arange(0, BK // 16)
    for j in range(BK // 16):
        marked = tl.sum(tl.where(slices[:, None] == j, per16, 0), 0) > 0
        if tl.sum(marked.to(tl.int32), 0) > 0:
            cols = k0 + j * 16 + tl.arange(0, 16)
            kt = l2_rows(load_rows(k, t, eos, SK, cols, K), rk, t, eos, H, USE_L2)
            T, Aqk = diag_exact_fwd(q, k, g, b, rq, rk, t0, eos, cols, kt, marked, T, Aqk, scale, SK, H, K, 16, USE_L2)
    return T, Aqk


@triton.jit
def chunk_pairs(q, k, g, b, rq, rk, Y, Qg, Kt, gC, t0, eos, scale, SK, H, K: tl.constexpr, BK: tl.constexpr,
                USE_L2: tl.constexpr, PREC: tl.constexpr, COUNT_EXACT: tl.constexpr, KEY_SIDE: tl.constexpr):
    """T (strictly lower) and Aqk (lower) [64, 64] of one chunk (rows from token t0 on; pointers at the key head's
    columns) straight from the inputs, in K blocks of BK, for the wy kernel with SOLVE_A, and with COUNT_EXACT the
    number of channels off the midpoint form of the diagonal blocks (exact_channels) anywhere in the chunk. KEY_SIDE
    (the state kernel applies A, so the key side needs no A): in the same pass, stores Q = scale e^G q,
    Kt = e^(G_C - G) k, E = e^G b k (into Y) and exp(G_C) (gC at the chunk's row). Without it the kernel makes those
    after the solve, reloading the inputs (key_side_tiles), which measured faster there as it keeps this loop's
    registers for the products (docs/kernels.md#the-wy-kernel).
    T and Aqk: per K block one [64, BK] x [BK, 64] product each, e^(G_r - G_s) = e^(G_r - m) e^(m - G_s) with m halfway
    between the largest and the smallest G of the channel in the chunk, on the channels where those two are at most
    CHUNK_SPAN apart: every factor is then within e^(+-CHUNK_SPAN / 2), finite and normal in fp32 / tf32, so the
    entries s <= r carry the usual operand rounding; the masked ones (s > r, up to e^CHUNK_SPAN) may overflow and are
    dropped by the final mask. The other channels ("wide") take the exact form row by row (wide_channels_exact), in the
    K blocks that have any. The count bounds each sub-chunk's n_exact from above, which is all the backward's
    exact_diag kernel needs: it skips a sub-chunk where the count is 0 and finds the channels itself (counting per
    sub-chunk through tl.reshape measured ~0.25 ms slower at B=8, T=4096)."""
    t = t0 + tl.arange(0, 64)
    T = tl.zeros([64, 64], dtype=tl.float32)
    Aqk = tl.zeros([64, 64], dtype=tl.float32)
    n_exact = 0
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        G, G_hi, G_lo, gt = chunk_cumsum(g, t, eos, SK, cols, K)
        if COUNT_EXACT:
            n_exact += tl.sum((exact_channels(gt) & (cols < K)).to(tl.int32), 0)
        kt = l2_rows(load_rows(k, t, eos, SK, cols, K), rk, t, eos, H, USE_L2)
        qt = l2_rows(load_rows(q, t, eos, SK, cols, K), rq, t, eos, H, USE_L2) * scale
        bk = load_rows(b, t, eos, SK, cols, K) * kt
        if KEY_SIDE:
            gamma = tl.exp(G)
            G_last = tl.sum(gt, 0)
            store_rows(Qg, gamma * qt, t, eos, SK, cols, K)
            store_rows(Kt, tl.exp(G_last[None, :] - G) * kt, t, eos, SK, cols, K)
            store_rows(Y, gamma * bk, t, eos, SK, cols, K)
            tl.store(gC + cols, tl.exp(G_last), mask=cols < K)
        near = G_hi - G_lo <= CHUNK_SPAN
        left, right = midpoint_factors(G, G_hi, G_lo, near)
        kr = tl.trans(kt * right)
        T += tl.dot(bk * left, kr, input_precision=PREC)
        Aqk += tl.dot(qt * left, kr, input_precision=PREC)
        wide = ((~near) & (cols < K)).to(tl.int32)
        if tl.sum(wide, 0) > 0:          # rare; the complement of the very `near` above, so no channel is lost or twice
            T, Aqk = wide_channels_exact(q, k, g, b, rq, rk, t0, t, eos, k0, wide, T, Aqk, scale, SK, H, K, BK,
                                         USE_L2)
    r = tl.arange(0, 64)
    return tl.where(r[:, None] > r[None, :], T, 0.), tl.where(r[:, None] >= r[None, :], Aqk, 0.), n_exact


@triton.jit
def key_side_tiles(q, k, g, b, rq, rk, Am, Y, Qg, Kt, gC, t, eos, i_c, i_h, koff, scale, H: tl.constexpr,
                   K: tl.constexpr, BK: tl.constexpr, USE_L2: tl.constexpr, PREC: tl.constexpr):
    """The key-side outputs of the plain wy kernel for chunk i_c, key head i_h (columns from koff = i_h K on), in K
    blocks of BK: Q, Kt, exp(G_C) and Y = Am E (Am the chunk's [64, 64] fp32 A)."""
    SK = H * K
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        G, G_last, E, Q, Ktb, _, _, _ = chunk_key_side(q + koff, k + koff, g + koff, b + koff, rq + i_h, rk + i_h,
                                                       t, eos, cols, scale, SK, H, K, USE_L2)
        store_tile(Y + koff, tl.dot(Am, E, input_precision=PREC), t, eos, SK, k0, K, BK)
        store_tile(Qg + koff, Q, t, eos, SK, k0, K, BK)
        store_tile(Kt + koff, Ktb, t, eos, SK, k0, K, BK)
        tl.store(gC + (i_c * H + i_h) * K + cols, tl.exp(G_last), mask=cols < K)


@triton.jit
def write_side(Am, v, w, U, t, eos, i_h, HV: tl.constexpr, H: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
               PREC: tl.constexpr):
    """U = Am Z, Z = w v, for each value head of key head i_h's group ([64, BV] blocks)."""
    SV = HV * V
    for j in range(HV // H):
        voff = (i_h * (HV // H) + j) * V
        for v0 in range(0, V, BV):
            Z = tile(w + voff, t, eos, SV, v0, V, BV).to(tl.float32) * tile(v + voff, t, eos, SV, v0, V, BV).to(
                tl.float32)
            store_tile(U + voff, tl.dot(Am, Z, input_precision=PREC), t, eos, SV, v0, V, BV)


def wy_fits(config, dtype, K) -> bool:
    """Whether a wy config's K block suits K: BK = 32 always, BK = 64 only where K needs more than 32 columns."""
    return K is None or config.kwargs["BK"] <= max(32, triton.next_power_of_2(K))


@tuned(WY_CONFIGS, key=["K", "V", "HV", "USE_L2", "PREC", "SOLVE_A", "COUNT_EXACT", "APPLY_A"],
       interpret_config=WY_INTERPRET, fits=wy_fits, dtype_arg="v")
@triton.jit
def gdn2_fwd_kernel_wy(q, k, v, g, b, w, rq, rk, A, Aqk, n_exact, Y, Qg, Kt, gC, U, cu_seqlens, chunk_indices, scale,
                       H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                       BV: tl.constexpr, USE_L2: tl.constexpr, PREC: tl.constexpr, SOLVE_A: tl.constexpr,
                       PAIR_PREC: tl.constexpr, COUNT_EXACT: tl.constexpr, APPLY_A: tl.constexpr):
    """Y = A E, Q, Kt, exp(G_C) and U = A Z of one chunk and key head, with A from the intra / exact_diag / solve
    kernels; BK (the K block) is a launch config. SOLVE_A (ForwardPlan.solve_in_wy): the kernel makes A itself, so it
    is the only chunk-parallel launch of the forward: T, Aqk and (COUNT_EXACT, for the backward) n_exact by
    chunk_pairs (PAIR_PREC: the intra kernel's dot_precision), Aqk and n_exact stored, T stored into A and inverted
    in place there (solve_chunk, the diagonal blocks included), then read back whole for the key and write sides.
    Each hand-over through A is fenced by a block barrier. APPLY_A (with SOLVE_A; inference,
    ForwardPlan.state_applies_a): the state kernel applies A, R = A (Z - E S_0), so chunk_pairs stores E = e^G b k
    (where Y would go), Q, Kt and exp(G_C) in its pass over the inputs, and the kernel stops after the solve (no U, no
    product with A)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_t, bos, eos = chunk_span(chunk_indices, cu_seqlens, i_c)
    SK = H * K
    t = bos + i_t * 64 + tl.arange(0, 64)
    koff = i_h * K
    if SOLVE_A:
        T, Aqk_c, n_ex = chunk_pairs(q + koff, k + koff, g + koff, b + koff, rq + i_h, rk + i_h, Y + koff, Qg + koff,
                                     Kt + koff, gC + (i_c * H + i_h) * K, bos + i_t * 64, eos, scale, SK, H, K, BK,
                                     USE_L2, PAIR_PREC, COUNT_EXACT, APPLY_A)
        store_tile(Aqk + i_h * 64, Aqk_c, t, eos, H * 64, 0, 64, 64)
        if COUNT_EXACT:
            tl.store(n_exact + (4 * i_c + tl.arange(0, 4)) * H + i_h, tl.zeros([4], dtype=tl.int32) + n_ex)
        store_tile(A + i_h * 64, T, t, eos, H * 64, 0, 64, 64)
        tl.debug_barrier()
        solve_chunk(A + i_h * 64, bos + i_t * 64, eos, H * 64, True)
        if not APPLY_A:
            tl.debug_barrier()
    if not APPLY_A:
        Am = tile(A + i_h * 64, t, eos, H * 64, 0, 64, 64).to(tl.float32)
        key_side_tiles(q, k, g, b, rq, rk, Am, Y, Qg, Kt, gC, t, eos, i_c, i_h, koff, scale, H, K, BK, USE_L2, PREC)
        write_side(Am, v, w, U, t, eos, i_h, HV, H, V, BV, PREC)


def wy_forward(q, k, v, g, b, w, rq, rk, A, Aqk, n_exact, scale, layout, use_l2, solve_a: bool, apply_a: bool):
    """The wy launch. Returns Y (E with apply_a), Qg, Kt [TT, H, K] in v's dtype, gC [NC, H, K] fp32 and U
    [TT, Hv, V] (v itself with apply_a: the state kernel reads v there). With solve_a it also fills A, Aqk and, where
    given, n_exact (chunk_matrices allocates them)."""
    cu, chunk_indices, _, n_chunks = layout
    TT, H, K = q.shape
    HV, V = v.shape[1], v.shape[2]
    _, BV = block_sizes(K, V)
    Y, Qg, Kt = (torch.empty(TT, H, K, device=q.device, dtype=v.dtype) for _ in range(3))
    gC = torch.empty(n_chunks, H, K, device=q.device, dtype=torch.float32)
    U = v if apply_a else torch.empty_like(v)
    # without n_exact (inference) A stands in for its pointer, never touched (COUNT_EXACT=False)
    gdn2_fwd_kernel_wy[(n_chunks, H)](q, k, v, g, b, w, rq, rk, A, Aqk, A if n_exact is None else n_exact, Y, Qg, Kt,
                                      gC, U, cu, chunk_indices, scale, H=H, HV=HV, K=K, V=V, BV=BV,
                                      USE_L2=use_l2, PREC=SERIAL_PRECISION, SOLVE_A=solve_a,
                                      PAIR_PREC=dot_precision(q.dtype), COUNT_EXACT=solve_a and n_exact is not None,
                                      APPLY_A=apply_a)
    return Y, Qg, Kt, gC, U
