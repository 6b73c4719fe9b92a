r"""GDN-2 chunkwise forward kernels (WY form, decay absorbed into asymmetric erase factors).

Per chunk of C = 64 tokens (rows r, s = 0..63), per head, elementwise over the K key channels:

    G_r = sum_{i<=r} g_i                     (chunk-local inclusive cumsum, fp32)
    T_rs   = sum_d b_rd k_rd k_sd exp(G_rd - G_sd)            s <  r      A = (I + T)^-1  (fp32)
    Aqk_rs = scale sum_d q_rd k_sd exp(G_rd - G_sd)           s <= r
    E_r = exp(G_r) b_r k_r,  Z_r = w_r v_r,  Q_r = scale exp(G_r) q_r,  Kt_r = exp(G_C - G_r) k_r
    Y = A E,  U = A Z                (one inverse serves the erase and the write side)
    R   = U - Y S_0
    O   = Q S_0 + Aqk R
    S_C = Diag(exp G_C) S_0 + Kt^T R

Only R and S_C depend on the state carried between chunks; everything else is chunk-parallel.

Exponents are differences, split at reference points so that every factor is bounded and the pairwise products
run on the tensor cores. For the columns s of an earlier sub-chunk j against the rows r of sub-chunk i, with cb_i /
ce_j = G before sub-chunk i / at the last row of j: exp(G_r - G_s) = exp(G_r - cb_i) * exp(cb_i - ce_j) *
exp(ce_j - G_s), all three <= 1 because G never increases (g <= 0); the outer two need only the in-sub-chunk cumsum,
the middle one the sum of g over the sub-chunks between j and i (the backward uses the same boundary references).
Inside a sub-chunk (the diagonal [16, 16] blocks) the reference is m halfway between G before the sub-chunk and G at
its last row: exp(G_r - m) * exp(m - G_s). On a channel whose g stays in [MIDPOINT_G_MIN, 0] = [-5, 0] on the
sub-chunk's rows, |G - m| <= 40, so each factor is <= e^40 (~2e17): the "midpoint channels". The others (a per-token
decay below e^-5: rare in trained models, but legal) take the exact form, exp(G_r - G_s) elementwise with s > r
masked to -inf, row by row, in a kernel of their own. Either way the result is exp(G_r - G_s) up to rounding (never
gamma_r * (1 / gamma_s)).

Kernels (in launch order)
  gdn2_fwd_kernel_intra   grid (4 x chunks, key heads): one 16-row sub-chunk per program, K in slices of BK: its rows
                          of T (into A) and of Aqk, one [16, BK] x [BK, 16] product per block (the earlier sub-chunks,
                          and the diagonal block on the midpoint channels), every exponent local to a sub-chunk (below);
                          counts the sub-chunk's channels off the midpoint form (n_exact). Where there are none, the
                          diagonal block is whole, and it stores its inverse (I + T_ii)^-1 (utils.unit_lower_inverse16,
                          repeated squaring, fp32) instead.
  gdn2_fwd_kernel_exact_diag  grid (4 x chunks, key heads): adds the other channels' share of the diagonal blocks
                          (exact form) and stores the block's inverse; a sub-chunk without such channels (n_exact = 0)
                          returns at once. So every diagonal block of A now holds its inverse, computed by the last
                          kernel that wrote it (this moved 0.109 ms off the solve for 0.079 ms more intra: H100, B=8).
  gdn2_fwd_kernel_solve   grid (chunks, key heads): A = (I + T)^-1 in place, fp32: the block recursion over the
                          inverted diagonal blocks and the off-diagonal blocks of T. A [TT, H, 64] fp32
                          and Aqk [TT, H, 64] depend on key-head inputs only, so grouped value heads share them.
  gdn2_fwd_kernel_wy      grid (chunks, key heads): the rest of the state-independent work, in K blocks of BK (64 or
                          32, a launch config): Y = A E, Q, Kt [TT, H, K] and exp(G_C) [NC, H, K] (fp32); U = A Z
                          [TT, Hv, V] for each value head of the group. Y, Q, Kt, U are stored in v's dtype (the
                          tensor-core operand dtype).
  gdn2_fwd_kernel_wy, MERGED  (chunk_infer.use_merged_kernel: the default for 16-bit inputs) replaces the four
                          launches above: per chunk, T and Aqk with one [64, BK] x [BK, 64] product each, the exponent
                          split at one reference per chunk and channel, m halfway between its largest and smallest G,
                          on the channels whose G spans at most CHUNK_SPAN in the chunk (exp(G_r - m), exp(m - G_s)
                          both within e^(+-80)); the rest row by row with exact exponentials; T inverted in place in
                          A's buffer (solve_chunk), then as wy. With APPLY_A (inference, the walk applies A) the
                          key side is stored in the same pass over the inputs and the kernel stops after the solve.
  gdn2_fwd_kernel_state   grid (V blocks, sequences * value heads): the only sequential kernel. Per chunk: stores the
                          entering state S_0 (v's dtype), R = U - Y S_0 (K/BK products [64, BK] x [BK, BV]), stores R,
                          S <- Diag(exp G_C) S + Kt^T R (K/BK products [BK, 64] x [64, BV]). The state [K, BV] lives in
                          fp32 registers as up to four [BK, BV] blocks (K <= 256), so no [64, K] tile is ever formed.
  gdn2_fwd_kernel_output  grid (V blocks, chunks, value heads): O = Q S_0 + Aqk R, chunk-parallel.
The per-chunk states (NC x Hv x K x V in v's dtype: 0.27 GB at B=8, T=4096, H=16, K=V=128, bf16) are written by the
state kernel and read once by the output kernel. Inference may instead compute O inside the state kernel
(fuse_output; chunk_infer.py says when).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gdn2.ops.triton.utils import (CHUNK, SERIAL_PRECISION, dot_precision, l2_rows, load_rows, row_tile,
                                   store_rows, tuned, unit_lower_inverse16)

# Intra kernel: one 16-row sub-chunk per program, K in slices of BK (T reduces over K, so K stays in the program).
# Every product is [16, BK] x [BK, 16], and Triton lays the warps of an M = 16 product along M (warpsPerCTA [w, 1]
# in the sm_90 build), so at w > 1 each warp computes the whole block. Measured on the H100 (B=8, T=4096, bf16,
# benchmarks/time_configs.py, 2026-11-27, results/bench/configs-*): (16, 1) 0.88-0.91 ms, (16, 1, 2 stages) 0.94,
# (16, 1, maxnreg 168) 0.92-0.96, (32, 2) 1.41; dropped: (16, 1, 3 stages) 0.94, (16, 1, maxnreg 128) 1.28,
# (16, 2) 1.72, (64, 4) 1.91, (32, 4) 2.05. The first entry is the default without autotuning.
INTRA_CONFIGS = [triton.Config({"BK": bk}, num_warps=w, num_stages=st, maxnreg=reg)
                 for bk, w, st, reg in ((16, 1, 1, None), (16, 1, 2, None), (16, 1, 1, 168), (32, 2, 1, None))]
INTRA_INTERPRET = triton.Config({"BK": 32}, num_warps=4, num_stages=1)
# Solve kernel: ten [16, 16] fp32 blocks per chunk and key head.
SOLVE_CONFIGS = [triton.Config({}, num_warps=w, num_stages=1) for w in (4, 2)]   # 1 warp: passes, never picked
SOLVE_INTERPRET = triton.Config({}, num_warps=4, num_stages=1)
# Exact form of the diagonal blocks, for the channels the midpoint form leaves out: one sub-chunk per program.
EXACT_CONFIGS = [triton.Config({"BK": bk}, num_warps=w, num_stages=1) for bk, w in ((32, 1), (64, 2))]
EXACT_INTERPRET = triton.Config({"BK": 32}, num_warps=1, num_stages=1)
# The diagonal blocks' midpoint form is used on the channels whose g stays in [MIDPOINT_G_MIN, 0] on all 16 rows of
# the sub-chunk: G then moves by at most 80 across it, so with m halfway each factor exp(G_r - m), exp(m - G_s) is
# <= e^40 (~2e17), far from fp32 overflow, and the masked s > r terms stay finite (<= e^80 |b k| |k|). A per-token
# decay below e^-5 = 0.0067 is rare in trained models but legal: those channels take the exact form.
MIDPOINT_G_MIN = tl.constexpr(-5.0)

# WY kernel: one [64, 64] fp32 A tile times [64, BK] / [64, BV] tiles; BK (the K block) is a launch config, BV fixed
# by the shape (<= 64). Measured on the H100 at B=8, T=4096 (ninth session, time_configs.py,
# results/bench/configs-session9-*), ms as plain / merged inference / merged training, with BK = 64: (4, 2) 0.722 /
# 1.338 / 1.416, (4, 1) 0.699 / 1.327 / 1.368, (8, 1, r128) 0.709 / 1.425 / 1.667, (8, 2, r128) 0.751 / 1.555 /
# 1.818, (8, 1) 0.949 / 1.857 / 1.991. Tenth session (results/bench/configs-session10-*), merged with the walk
# applying A (chunk_pairs storing the key side in its pass): BK=32 (4, 2) 0.924, BK=64 (4, 1) 0.949, BK=64 (4, 2)
# 0.959, BK=32 (4, 1) 0.965; dropped there: BK=32 (4, 2, r168) 0.997, (4, 1, r168) 1.058, (4, 1, r128) 2.049 (the
# register cap spills 0.4-1 KB per thread), BK=64 (8, 1, r128) 1.189, BK=32 (8, 1) 1.528, and the ninth session's
# slower 8-warp entries. The same build without the walk applying A (key side in the pass too) was slower than
# this one's two passes in every entry (best 1.427 against 1.289 ms on the same machine), so only APPLY_A does that.
# MERGED (inference): the chunk-level midpoint form of T and Aqk holds on the channels whose G moves by at most
# CHUNK_SPAN over the 64 rows (an average g of -2.5 per token), each factor then within e^(+-80) (fp32 max ~e^88.7,
# smallest normal ~e^-87.3).
CHUNK_SPAN = tl.constexpr(160.0)
WY_CONFIGS = [triton.Config({"BK": bk}, num_warps=4, num_stages=st) for bk, st in ((64, 1), (64, 2), (32, 2), (32, 1))]
WY_INTERPRET = triton.Config({"BK": 32}, num_warps=4, num_stages=1)

# Sequential state kernel: BV is the V slice per program (B*Hv*V/BV programs). fla's equivalent (chunk_delta_h)
# tunes BV in {32, 64}, 2-4 warps, 2-4 stages; BV=16 is for few sequences*heads (B=1, H=16: 128 programs at V=128).
# The first entry is the default (GDN2_TRITON_AUTOTUNE=0). The autotune key includes log2(sequences * value heads),
# so B=1 and B=8 are tuned separately. state_fits: from benchmarks/compile_check_sm90.py (sm_90, 2026-11-27).
# The training walk (states stored, output inside) on the H100, 2026-11-27 (results/bench/configs-session7-*): at
# B=1, T=65536 BV=16 with 3 stages takes 1.85 ms against 2.12 for the next best (BV=32, 3 stages); at B=8, T=4096
# 0.96 against 0.46 (BV=64, 3 stages). Timed and dropped there: (32, 8 warps, 2 or 3 stages), (64, 8 warps, 3
# stages), (16, 2 warps, 3 stages): 2.24-3.50 ms at B=1, none best at B=8.
STATE_CONFIGS = [
    triton.Config({"BV": 32}, num_warps=4, num_stages=2),
    triton.Config({"BV": 64}, num_warps=4, num_stages=2),
    triton.Config({"BV": 16}, num_warps=4, num_stages=2),
    triton.Config({"BV": 32}, num_warps=2, num_stages=2),
    triton.Config({"BV": 64}, num_warps=4, num_stages=3),
    triton.Config({"BV": 32}, num_warps=4, num_stages=3),
    triton.Config({"BV": 16}, num_warps=4, num_stages=3),
]
STATE_INTERPRET = triton.Config({"BV": 16}, num_warps=4, num_stages=1)

OUTPUT_CONFIGS = [
    triton.Config({"BV": 64}, num_warps=4, num_stages=2),
    triton.Config({"BV": 32}, num_warps=4, num_stages=2),
    triton.Config({"BV": 64}, num_warps=8, num_stages=2),
]
OUTPUT_INTERPRET = triton.Config({"BV": 16}, num_warps=4, num_stages=1)


@triton.jit
def _load_sub(q, k, g, b, rq, rk, t, eos, carry, cols, scale, SK, SH, K: tl.constexpr, USE_L2: tl.constexpr):
    """One 16-row sub-chunk, one K slice: G (cumsum continued from `carry`), the new carry (G at its last row),
    scale*q, k, b*k and g itself."""
    gb = load_rows(g, t, eos, SK, cols, K)
    G = tl.cumsum(gb, 0) + carry[None, :]
    kb = load_rows(k, t, eos, SK, cols, K)
    qb = load_rows(q, t, eos, SK, cols, K)
    kb = l2_rows(kb, rk, t, eos, SH, USE_L2)
    qb = l2_rows(qb, rq, t, eos, SH, USE_L2)
    bk = load_rows(b, t, eos, SK, cols, K) * kb
    return G, carry + tl.sum(gb, 0), qb * scale, kb, bk, gb


@triton.jit
def diag_row(q, k, g, b, rq, rk, tr, ok, r, cols, G_r, Gs, scale, SK, H, K: tl.constexpr, USE_L2: tl.constexpr):
    """Row r (token tr, 0 past eos) of a sub-chunk for the exact diagonal blocks (forward and backward): the running
    G_r and the [16, .] tile Gs with its row r set to it, e_rs = exp(G_r - G_s) for s <= r (0 above), scale q_r and
    (b k)_r (q, k scaled by their inverse L2 norms if fused). Gs has one row per row of the block (16, or 64)."""
    r16 = tl.arange(0, Gs.shape[0])
    G_r += tl.load(g + tr * SK + cols, mask=(cols < K) & ok, other=0.)
    Gs = tl.where((r16 == r)[:, None], G_r[None, :], Gs)
    kr = tl.load(k + tr * SK + cols, mask=(cols < K) & ok, other=0.).to(tl.float32)
    qr = tl.load(q + tr * SK + cols, mask=(cols < K) & ok, other=0.).to(tl.float32) * scale
    if USE_L2:
        kr = kr * tl.load(rk + tr * H, mask=ok, other=0.)
        qr = qr * tl.load(rq + tr * H, mask=ok, other=0.)
    bkr = tl.load(b + tr * SK + cols, mask=(cols < K) & ok, other=0.).to(tl.float32) * kr
    e = tl.exp(tl.where((r16 <= r)[:, None], G_r[None, :] - Gs, float("-inf")))
    return G_r, Gs, e, qr, bkr


@triton.jit
def midpoint_channels(gb):
    """[16, BK] g rows of a sub-chunk -> [BK]: the channels on the midpoint form, g in [MIDPOINT_G_MIN, 0] on every
    row (tl.min / tl.max are exact, so every kernel makes the same choice); exact_channels is the complement."""
    return (tl.min(gb, 0) >= MIDPOINT_G_MIN) & (tl.max(gb, 0) <= 0.)


@triton.jit
def exact_channels(gb):
    return (tl.min(gb, 0) < MIDPOINT_G_MIN) | (tl.max(gb, 0) > 0.)


@triton.jit
def midpoint_factors(G, c0, c1, on):
    """exp(G - m) and exp(m - G) for a sub-chunk's [16, BK] G, m = (c0 + c1) / 2 halfway between G before the
    sub-chunk (c0) and at its last row (c1); 0 on the channels where `on` [BK] is false."""
    m = ((c0 + c1) * 0.5)[None, :]
    on2 = on[None, :]
    return tl.exp(tl.where(on2, G - m, float("-inf"))), tl.exp(tl.where(on2, m - G, float("-inf")))


@triton.jit
def diag_exact_fwd(q, k, g, b, rq, rk, t0, eos, cols, kt, exact, Tx, Qx, scale, SK, H, K: tl.constexpr,
                   BK: tl.constexpr, USE_L2: tl.constexpr):
    """Tx, Qx plus the diagonal [16, 16] blocks of T (s <= r; the caller masks s = r) and Aqk summed over the `exact`
    channels [BK] only, row by row with exact exponentials. kt: the sub-chunk's k rows [16, BK] (or a whole chunk's,
    [64, BK], with [64, 64] Tx, Qx: then the chunk's blocks, rows from t0 on)."""
    NR: tl.constexpr = kt.shape[0]
    r16 = tl.arange(0, NR)
    G_r = tl.zeros([BK], dtype=tl.float32)
    Gs = tl.zeros([NR, BK], dtype=tl.float32)
    for r in range(NR):
        tr = t0 + r
        G_r, Gs, e, qr, bkr = diag_row(q, k, g, b, rq, rk, tr, tr < eos, r, cols, G_r, Gs, scale, SK, H, K, USE_L2)
        right = kt * tl.where(exact[None, :], e, 0.)
        row = (r16 == r)[:, None]
        Tx = tl.where(row, Tx + tl.sum(right * bkr[None, :], 1)[None, :], Tx)
        Qx = tl.where(row, Qx + tl.sum(right * qr[None, :], 1)[None, :], Qx)
    return Tx, Qx


@triton.jit
def sub_chunk_span(chunk_indices, cu_seqlens, i_s):
    """Program index i_s over 4 x chunks (one 16-row sub-chunk each) -> (r0, the sub-chunk's first row within its
    chunk; i_t, bos, eos as chunk_span)."""
    i_t, bos, eos = chunk_span(chunk_indices, cu_seqlens, i_s // 4)
    return (i_s % 4) * 16, i_t, bos, eos


@triton.jit
def key_head_inputs(q, k, g, b, rq, rk, i_h, K: tl.constexpr):
    """q, k, g, b ([TT, H, K]) and the inverse norms rq, rk ([TT, H]) moved to key head i_h."""
    return q + i_h * K, k + i_h * K, g + i_h * K, b + i_h * K, rq + i_h, rk + i_h


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
        lc, tot, qs_i, k_i, bk_i, gb = _load_sub(q, k, g, b, rq, rk, ti, eos, tl.zeros([BK], dtype=tl.float32),
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
    utils.unit_lower_inverse16). The block recursion A_ij = -A_ii sum_{j <= m < i} T_im A_mj (all fp32, IEEE
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


@triton.jit
def chunk_key_side(q, k, g, b, rq, rk, t, eos, cols, scale, SK, SH, K: tl.constexpr, USE_L2: tl.constexpr):
    """Full-K tiles of one chunk: G [64, BK], decay exp(G_C) [BK], E = e^G b k, Q = scale e^G q, Kt = e^(G_C-G) k."""
    gt = load_rows(g, t, eos, SK, cols, K)
    G = tl.cumsum(gt, 0)
    G_last = tl.sum(gt, 0)
    kt = load_rows(k, t, eos, SK, cols, K)
    qt = load_rows(q, t, eos, SK, cols, K)
    kt = l2_rows(kt, rk, t, eos, SH, USE_L2)
    qt = l2_rows(qt, rq, t, eos, SH, USE_L2)
    bt = load_rows(b, t, eos, SK, cols, K)
    gamma = tl.exp(G)
    E = gamma * bt * kt
    Q = gamma * qt * scale
    Kt = tl.exp(G_last[None, :] - G) * kt
    return G, G_last, E, Q, Kt, qt, kt, bt



@triton.jit
def tile(ptr, t, eos, stride_t, c0, n_cols, BC: tl.constexpr):
    """[len(t), BC] row_tile (stored dtype) of rows t < eos, columns c0 .. c0 + BC (masked < n_cols)."""
    return row_tile(ptr, t, eos, stride_t, c0 + tl.arange(0, BC), n_cols)


@triton.jit
def tile_t(ptr, t, eos, stride_t, c0, n_cols, BC: tl.constexpr):
    """[BC, len(t)] transposed tile: out[c, j] = M[t_j, c0 + c] (loaded transposed, no tl.trans)."""
    cols = c0 + tl.arange(0, BC)
    return tl.load(ptr + t[None, :] * stride_t + cols[:, None], mask=(t < eos)[None, :] & (cols < n_cols)[:, None],
                   other=0.)


@triton.jit
def store_tile(ptr, x, t, eos, stride_t, c0, n_cols, BC: tl.constexpr):
    """The inverse of tile (utils.store_rows)."""
    store_rows(ptr, x, t, eos, stride_t, c0 + tl.arange(0, BC), n_cols)


@triton.jit
def state_block(ptr, k0, cv, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr):
    """[BK, BV] block (stored dtype) of a row-major [K, V] state at ptr: rows k0 .. k0 + BK, columns cv."""
    ck = k0 + tl.arange(0, BK)
    return tl.load(ptr + ck[:, None] * V + cv[None, :], mask=(ck < K)[:, None] & (cv < V)[None, :], other=0.)


@triton.jit
def state_block_t(ptr, k0, cv, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr):
    """[BV, BK] transposed block of a row-major [K, V] state: out[j, c] = S[k0 + c, cv_j]."""
    ck = k0 + tl.arange(0, BK)
    return tl.load(ptr + ck[None, :] * V + cv[:, None], mask=(ck < K)[None, :] & (cv < V)[:, None], other=0.)


@triton.jit
def store_state_block(ptr, x, k0, cv, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr):
    ck = k0 + tl.arange(0, BK)
    tl.store(ptr + ck[:, None] * V + cv[None, :], x.to(ptr.dtype.element_ty),
             mask=(ck < K)[:, None] & (cv < V)[None, :])


@triton.jit
def chunk_span(chunk_indices, cu_seqlens, i_c):
    """(chunk i_t within its sequence, the sequence's first token bos, its end eos) of global chunk i_c."""
    i_n = tl.load(chunk_indices + 2 * i_c)
    return tl.load(chunk_indices + 2 * i_c + 1), tl.load(cu_seqlens + i_n), tl.load(cu_seqlens + i_n + 1)


@triton.jit
def load_state_blocks(ptr, cv, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """A row-major [K, V] state's columns cv as four fp32 [BK, BV] blocks (rows 0, BK, 2 BK, 3 BK; zeros past K)."""
    S1 = state_block(ptr, 0, cv, K, V, BK).to(tl.float32)
    S2 = tl.zeros([BK, BV], dtype=tl.float32)
    S3 = tl.zeros([BK, BV], dtype=tl.float32)
    S4 = tl.zeros([BK, BV], dtype=tl.float32)
    if K > BK:
        S2 = state_block(ptr, BK, cv, K, V, BK).to(tl.float32)
    if K > 2 * BK:
        S3 = state_block(ptr, 2 * BK, cv, K, V, BK).to(tl.float32)
    if K > 3 * BK:
        S4 = state_block(ptr, 3 * BK, cv, K, V, BK).to(tl.float32)
    return S1, S2, S3, S4


@triton.jit
def store_state_blocks(ptr, S1, S2, S3, S4, cv, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr):
    """The inverse of load_state_blocks: the blocks that lie inside K into a row-major [K, V] state at ptr."""
    store_state_block(ptr, S1, 0, cv, K, V, BK)
    if K > BK:
        store_state_block(ptr, S2, BK, cv, K, V, BK)
    if K > 2 * BK:
        store_state_block(ptr, S3, 2 * BK, cv, K, V, BK)
    if K > 3 * BK:
        store_state_block(ptr, S4, 3 * BK, cv, K, V, BK)


@triton.jit
def key_vector(ptr, k0, K: tl.constexpr, BK: tl.constexpr):
    ck = k0 + tl.arange(0, BK)
    return tl.load(ptr + ck, mask=ck < K, other=0.).to(tl.float32)


@triton.jit
def key_block_dot(X, S, t, eos, SK, k0, dt, K: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """One key block's share of X S in a walk step: X's tile [64, BK] (rows t, key columns k0 .. k0 + BK; stored
    dtype) times the state block S [BK, BV] cast to dt."""
    return tl.dot(tile(X, t, eos, SK, k0, K, BK), S.to(dt), input_precision=PREC)


@triton.jit
def key_block_dot_t(X, Z, t, eos, SK, k0, K: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """X^T Z for one key block: X's tile loaded transposed ([BK, 64]: key columns k0 .. k0 + BK, rows t) times
    Z [64, BV]."""
    return tl.dot(tile_t(X, t, eos, SK, k0, K, BK), Z, input_precision=PREC)


@triton.jit
def decayed_plus(S, pg, k0, X, Z, t, eos, SK, K: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """A state block [BK, BV] one chunk on: Diag(decay[k0 .. k0 + BK]) S + X^T Z (key_block_dot_t), with decay the
    chunk's exp(G_C) at pg."""
    return S * key_vector(pg, k0, K, BK)[:, None] + key_block_dot_t(X, Z, t, eos, SK, k0, K, BK, PREC)


@triton.jit
def chunk_cumsum(g, t, eos, SK, cols, K: tl.constexpr):
    """G [64, BK], the chunk-local inclusive cumsum of g on rows t and channels cols, its largest and smallest value
    per channel [BK], and g itself (0 on rows past eos and channels past K)."""
    gt = load_rows(g, t, eos, SK, cols, K)
    G = tl.cumsum(gt, 0)
    return G, tl.max(G, 0), tl.min(G, 0), gt


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
    columns) straight from the inputs, in K blocks of BK, for the merged kernel, and with COUNT_EXACT the number of
    channels off the midpoint form of the diagonal blocks (exact_channels) anywhere in the chunk. KEY_SIDE (the walk
    applies A, so the key side needs no A): in the same pass, stores Q = scale e^G q, Kt = e^(G_C - G) k, E = e^G b k
    (into Y) and exp(G_C) (gC at the chunk's row). Without it the kernel makes those after the solve, reloading the
    inputs (key_side_tiles): on the H100 that measured faster than storing Q, Kt here (B=8, T=4096, tenth session:
    1.29 against 1.43 ms), as it keeps this loop's registers for the products.
    T and Aqk: per K block one [64, BK] x [BK, 64] product each, e^(G_r - G_s) = e^(G_r - m) e^(m - G_s) with m halfway
    between the largest and the smallest G of the channel in the chunk, on the channels where those two are at most
    CHUNK_SPAN apart: every factor is then within e^(+-CHUNK_SPAN / 2), finite and normal in fp32 / tf32, so the
    entries s <= r carry the usual operand rounding; the masked ones (s > r, up to e^CHUNK_SPAN) may overflow and are
    dropped by the final mask. The other channels ("wide") take the exact form row by row (wide_channels_exact), in the
    K blocks that have any. The count bounds each sub-chunk's n_exact from above, which is all the backward's
    exact_diag kernel needs: it skips a sub-chunk where the count is 0 and finds the channels itself (counting per
    sub-chunk through tl.reshape cost the H100 ~0.25 ms at B=8, T=4096, ninth session)."""
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


@tuned(WY_CONFIGS, key=["K", "V", "HV", "USE_L2", "PREC", "MERGED", "COUNT_EXACT", "APPLY_A"],
       interpret_config=WY_INTERPRET, fits=wy_fits, dtype_arg="v")
@triton.jit
def gdn2_fwd_kernel_wy(q, k, v, g, b, w, rq, rk, A, Aqk, n_exact, Y, Qg, Kt, gC, U, cu_seqlens, chunk_indices, scale,
                       H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                       BV: tl.constexpr, USE_L2: tl.constexpr, PREC: tl.constexpr, MERGED: tl.constexpr,
                       PAIR_PREC: tl.constexpr, COUNT_EXACT: tl.constexpr, APPLY_A: tl.constexpr):
    """Y = A E, Q, Kt, exp(G_C) and U = A Z of one chunk and key head, with A from the intra / exact_diag / solve
    kernels; BK (the K block) is a launch config. MERGED (chunk_infer.use_merged_kernel): the kernel makes A itself,
    so it is the only chunk-parallel launch of the forward: T, Aqk and (COUNT_EXACT, for the backward) n_exact by
    chunk_pairs (PAIR_PREC: the intra kernel's dot_precision), Aqk and n_exact stored, T stored into A and inverted
    in place there (solve_chunk, the diagonal blocks included), then read back whole for the key and write sides.
    Each hand-over through A is fenced by a block barrier. APPLY_A (with MERGED; inference,
    chunk_infer.use_walk_applying_a): the walk applies A itself, R = A (Z - E S_0), so chunk_pairs stores E = e^G b k
    (where Y would go), Q, Kt and exp(G_C) in its pass over the inputs, and the kernel stops after the solve (no U, no
    product with A)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_t, bos, eos = chunk_span(chunk_indices, cu_seqlens, i_c)
    SK = H * K
    t = bos + i_t * 64 + tl.arange(0, 64)
    koff = i_h * K
    if MERGED:
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


def state_fits(config, dtype, K, fuse_output=False, store_states=True, apply_a=False) -> bool:
    """Whether the fwd state kernel's sm_90 build stays within 232,448 B of shared memory (measured with
    benchmarks/compile_check_sm90.py, 2026-11-27; fp32 operand tiles need about twice bf16's).
    Plain (per-chunk states out): 16-bit inputs every entry up to K = 256 (largest: BV=64, 3 stages, K=256:
    229,376 B); fp32: K <= 64 every entry (<= 163,840 B), K <= 128 num_stages=2 only (3 stages: 237,568 / 278,528 B),
    K <= 256 only the 2-warp entry (151,552 B; BV=16/32/64 at 4 warps: 286,720 / 311,296 / 360,448 B).
    fuse_output (Q and Aqk tiles too): 16-bit K <= 128 every entry (<= 221,184 B), K <= 256 BV=16 at 2 stages
    (227,328 B; 3 stages: 333,824 B) and 2 warps (116,736 B) only (BV=32: 237,568 B); fp32 K <= 64 all but BV=64
    at 3 stages (262,144 B), above that 2 warps only (131,072 B at K=128, 229,376 B at K=256). With the states
    stored as well (the training variant) fp32 needs ~4 KB more: at K <= 64 3 stages only at BV=16 (BV=32:
    237,568 B), above that 2 warps only up to K = 128 (135,168 B; K=256: 233,472 B).
    apply_a (fuse_output, no states; the A tile and v, w tiles too): 16-bit K <= 128 2 stages only (<= 196,608 B; 3
    stages 237,568 - 286,720 B), K = 256 2 warps only (139,264 B); fp32 K <= 128 2 warps only (155,648 B), K = 256
    none (walk_can_apply_a). Pruned further on the evidence of the H100 (ninth session): bf16 with BV=32 at 4 warps,
    2 stages failed with an illegal memory access (the GPU check's first config, and the autotuner at B=8), while
    BV=64 at 4 warps and BV=32 at 2 warps ran and agreed with the merged path (3.3e-3 on o at B=8, T=4096); BV=16 at
    4 warps was not run, so it is left out too."""
    if K is None:
        return True
    if apply_a:
        if dtype != torch.float32:
            return config.num_stages == 2 and (config.num_warps == 2 or (config.kwargs["BV"] == 64 and K <= 128))
        return K <= 128 and config.num_warps == 2
    if fuse_output:
        if dtype != torch.float32:
            return K <= 128 or config.num_warps == 2 or (config.kwargs["BV"] <= 16 and config.num_stages < 3)
        if K <= 64:
            if store_states:
                return config.num_stages < 3 or config.kwargs["BV"] <= 16
            return not (config.kwargs["BV"] >= 64 and config.num_stages >= 3)
        return config.num_warps == 2 and (K <= 128 or not store_states)
    if dtype != torch.float32 or K <= 64:
        return True
    if K <= 128:
        return config.num_stages < 3
    return config.num_warps == 2


def walk_can_apply_a(dtype, K: int) -> bool:
    """Whether some state-kernel config fits the APPLY_A walk (state_fits): all but fp32 at K > 128."""
    return dtype != torch.float32 or K <= 128


@tuned(STATE_CONFIGS, key=["K", "V", "HV", "NSH_LOG2", "HAS_H0", "STORE_FINAL", "FUSE_OUTPUT", "STORE_STATES",
                           "APPLY_A", "PREC"],
       interpret_config=STATE_INTERPRET, fits=state_fits, dtype_arg="U",
       fits_args=("FUSE_OUTPUT", "STORE_STATES", "APPLY_A"))
@triton.jit
def gdn2_fwd_kernel_state(Y, U, Kt, gC, h0, R, hs, ht, Qg, Aqk, o, A, w, cu_seqlens, chunk_offsets, NSH_LOG2,
                          H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                          BV: tl.constexpr, HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr,
                          FUSE_OUTPUT: tl.constexpr, STORE_STATES: tl.constexpr, APPLY_A: tl.constexpr,
                          PREC: tl.constexpr):
    """STORE_STATES: stores the per-chunk states hs and R (for the output kernel and the backward).
    FUSE_OUTPUT: computes O = Q S_0 + Aqk R in the walk (chunk_infer.py says when). The inference forward sets exactly
    one of the two; the training forward sets STORE_STATES, and FUSE_OUTPUT with GDN2_TRITON_TRAIN_FUSED=1.
    APPLY_A (inference, with the merged wy kernel's APPLY_A): Y holds E, U holds v, and the walk forms
    R = A (w * v - E S_0) itself, one more [64, 64] x [64, BV] product per chunk step (A fp32, as the solve left it)."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n = i_nh // HV
    i_hv = i_nh % HV
    i_h = i_hv // (HV // H)
    bos = tl.load(cu_seqlens + i_n)
    eos = tl.load(cu_seqlens + i_n + 1)
    n_chunks = (eos - bos + 63) // 64
    first_chunk = tl.load(chunk_offsets + i_n)
    SK = H * K
    SV = HV * V
    Y += i_h * K
    Kt += i_h * K
    U += i_hv * V
    w += i_hv * V
    R += i_hv * V
    v0 = i_v * BV
    cv = v0 + tl.arange(0, BV)
    c64 = tl.arange(0, 64)
    dt = U.dtype.element_ty
    # the state [K, BV] as up to four [BK, BV] fp32 blocks (rows 0, BK, 2 BK, 3 BK)
    S1 = tl.zeros([BK, BV], dtype=tl.float32)
    S2 = tl.zeros([BK, BV], dtype=tl.float32)
    S3 = tl.zeros([BK, BV], dtype=tl.float32)
    S4 = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        S1, S2, S3, S4 = load_state_blocks(h0 + i_nh * K * V, cv, K, V, BK, BV)
    for i_t in range(n_chunks):
        i_c = first_chunk + i_t
        t = bos + i_t * 64 + c64
        ph = hs + (i_c * HV + i_hv) * K * V
        pg = gC + (i_c * H + i_h) * K
        if STORE_STATES:
            store_state_block(ph, S1, 0, cv, K, V, BK)
        Rb = tile(U, t, eos, SV, v0, V, BV).to(tl.float32)
        if APPLY_A:
            Rb *= tile(w, t, eos, SV, v0, V, BV).to(tl.float32)
        Rb -= key_block_dot(Y, S1, t, eos, SK, 0, dt, K, BK, PREC)
        if K > BK:
            if STORE_STATES:
                store_state_block(ph, S2, BK, cv, K, V, BK)
            Rb -= key_block_dot(Y, S2, t, eos, SK, BK, dt, K, BK, PREC)
        if K > 2 * BK:
            if STORE_STATES:
                store_state_block(ph, S3, 2 * BK, cv, K, V, BK)
            Rb -= key_block_dot(Y, S3, t, eos, SK, 2 * BK, dt, K, BK, PREC)
        if K > 3 * BK:
            if STORE_STATES:
                store_state_block(ph, S4, 3 * BK, cv, K, V, BK)
            Rb -= key_block_dot(Y, S4, t, eos, SK, 3 * BK, dt, K, BK, PREC)
        if APPLY_A:
            Rb = tl.dot(tile(A + i_h * 64, t, eos, H * 64, 0, 64, 64), Rb, input_precision=PREC)
        Rd = Rb.to(dt)
        if STORE_STATES:
            store_tile(R, Rb, t, eos, SV, v0, V, BV)
        if FUSE_OUTPUT:
            out = tl.dot(tile(Aqk + i_h * 64, t, eos, H * 64, 0, 64, 64).to(dt), Rd, input_precision=PREC)
            out += key_block_dot(Qg + i_h * K, S1, t, eos, SK, 0, dt, K, BK, PREC)
            if K > BK:
                out += key_block_dot(Qg + i_h * K, S2, t, eos, SK, BK, dt, K, BK, PREC)
            if K > 2 * BK:
                out += key_block_dot(Qg + i_h * K, S3, t, eos, SK, 2 * BK, dt, K, BK, PREC)
            if K > 3 * BK:
                out += key_block_dot(Qg + i_h * K, S4, t, eos, SK, 3 * BK, dt, K, BK, PREC)
            store_tile(o + i_hv * V, out, t, eos, SV, v0, V, BV)
        S1 = decayed_plus(S1, pg, 0, Kt, Rd, t, eos, SK, K, BK, PREC)
        if K > BK:
            S2 = decayed_plus(S2, pg, BK, Kt, Rd, t, eos, SK, K, BK, PREC)
        if K > 2 * BK:
            S3 = decayed_plus(S3, pg, 2 * BK, Kt, Rd, t, eos, SK, K, BK, PREC)
        if K > 3 * BK:
            S4 = decayed_plus(S4, pg, 3 * BK, Kt, Rd, t, eos, SK, K, BK, PREC)
    if STORE_FINAL:
        store_state_blocks(ht + i_nh * K * V, S1, S2, S3, S4, cv, K, V, BK)


@tuned(OUTPUT_CONFIGS, key=["K", "V", "HV", "PREC"], interpret_config=OUTPUT_INTERPRET, dtype_arg="R")
@triton.jit
def gdn2_fwd_kernel_output(Qg, Aqk, hs, R, o, cu_seqlens, chunk_indices,
                           H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                           BV: tl.constexpr, PREC: tl.constexpr):
    i_v, i_c, i_hv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h = i_hv // (HV // H)
    i_t, bos, eos = chunk_span(chunk_indices, cu_seqlens, i_c)
    t = bos + i_t * 64 + tl.arange(0, 64)
    v0 = i_v * BV
    cv = v0 + tl.arange(0, BV)
    dt = R.dtype.element_ty
    ph = hs + (i_c * HV + i_hv) * K * V
    acc = tl.dot(tile(Aqk + i_h * 64, t, eos, H * 64, 0, 64, 64).to(dt), tile(R + i_hv * V, t, eos, HV * V, v0, V, BV),
                 input_precision=PREC)
    for k0 in range(0, K, BK):
        acc += tl.dot(tile(Qg + i_h * K, t, eos, H * K, k0, K, BK), state_block(ph, k0, cv, K, V, BK),
                      input_precision=PREC)
    store_tile(o + i_hv * V, acc, t, eos, HV * V, v0, V, BV)


def block_sizes(K: int, V: int) -> tuple[int, int]:
    """(BK, BV) cap for the key / value blocks: 64, or the (power-of-two padded) dimension if smaller."""
    return min(64, triton.next_power_of_2(K)), min(64, triton.next_power_of_2(V))


def chunk_matrices(q, n_chunks, with_n_exact: bool = True):
    """Empty A (fp32) and Aqk (q's dtype) per key head, [TT, H, 64] each, and n_exact [4 x chunks, H] int32 (None
    unless with_n_exact): what intra_forward, or the merged wy kernel, fills."""
    TT, H, _ = q.shape
    A = torch.empty(TT, H, CHUNK, device=q.device, dtype=torch.float32)
    Aqk = torch.empty(TT, H, CHUNK, device=q.device, dtype=torch.float32 if q.dtype == torch.float32 else q.dtype)
    n_exact = torch.empty(4 * n_chunks, H, device=q.device, dtype=torch.int32) if with_n_exact else None
    return A, Aqk, n_exact


def intra_forward(q, k, g, b, rq, rk, scale, cu, chunk_indices, n_chunks, use_l2):
    """A (fp32) and Aqk (q's dtype) per key head: [TT, H, 64] each; n_exact [4 x chunks, H] int32, the number of
    channels per sub-chunk off the midpoint form (the exact kernels skip the sub-chunks where it is 0)."""
    TT, H, K = q.shape
    A, Aqk, n_exact = chunk_matrices(q, n_chunks)
    gdn2_fwd_kernel_intra[(4 * n_chunks, H)](q, k, g, b, rq, rk, A, Aqk, n_exact, cu, chunk_indices, scale,
                                             H=H, K=K, USE_L2=use_l2, PREC=dot_precision(q.dtype))
    gdn2_fwd_kernel_exact_diag[(4 * n_chunks, H)](q, k, g, b, rq, rk, A, Aqk, n_exact, cu, chunk_indices, scale,
                                                  H=H, K=K, USE_L2=use_l2)
    gdn2_fwd_kernel_solve[(n_chunks, H)](A, cu, chunk_indices, H=H)
    return A, Aqk, n_exact


def state_walk(Y, U, Kt, gC, h0, Qg, Aqk, layout, output_final_state: bool, fuse_output: bool, store_states: bool,
               A=None, w=None):
    """The sequential state kernel over every sequence (grid: V blocks x sequences * value heads). Returns (o, ht, hs,
    R): o [TT, Hv, V] if fuse_output (O = Q S_0 + Aqk R inside the walk), the final state [N, Hv, K, V] fp32 if
    output_final_state, the per-chunk states hs [NC, Hv, K, V] and R [TT, Hv, V] if store_states; None otherwise.
    With A [TT, H, 64] fp32 and w [TT, Hv, V] given, the walk applies A itself (APPLY_A): Y then holds E and U holds
    v."""
    cu, _, chunk_offsets, n_chunks = layout
    n_seqs = cu.numel() - 1
    TT, H, K = Y.shape
    HV, V = U.shape[1], U.shape[2]
    BK, _ = block_sizes(K, V)
    dev = Y.device
    hs = torch.empty(n_chunks, HV, K, V, device=dev, dtype=U.dtype) if store_states else None
    R = torch.empty_like(U) if store_states else None
    o = torch.empty_like(U) if fuse_output else None
    ht = torch.empty(n_seqs, HV, K, V, device=dev, dtype=torch.float32) if output_final_state else None
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), n_seqs * HV)
    apply_a = A is not None
    if apply_a != (w is not None):
        raise ValueError("state_walk: give both A and w (the walk applies A) or neither")
    # the tensors a variant does not touch (constexpr-guarded) have U stand in for their pointers
    gdn2_fwd_kernel_state[grid](Y, U, Kt, gC, h0, U if R is None else R, U if hs is None else hs, ht, Qg, Aqk,
                                U if o is None else o, A if apply_a else U, w if apply_a else U, cu, chunk_offsets,
                                (n_seqs * HV).bit_length(), H=H, HV=HV, K=K, V=V, BK=BK, HAS_H0=h0 is not None,
                                STORE_FINAL=output_final_state, FUSE_OUTPUT=fuse_output, STORE_STATES=store_states,
                                APPLY_A=apply_a, PREC=SERIAL_PRECISION)
    return o, ht, hs, R


def chunk_forward(q, k, v, g, b, w, rq, rk, h0, scale, layout, use_l2, output_final_state, fuse_output: bool,
                  for_backward: bool, recompute_states: bool = False, merged: bool = False, apply_a: bool = False):
    """The forward launches. Returns o [TT, Hv, V], the final state [N, Hv, K, V] fp32 or None, and the
    intermediates the backward reads: dict(A, Aqk, n_exact, Y, Qg, Kt, gC, hs, R, U). fuse_output: O is computed
    inside the sequential walk (no output kernel). The per-chunk states hs and R are stored when the output kernel
    needs them (not fuse_output) or the backward does (for_backward), unless recompute_states: then the walk stores
    nothing, U is kept instead, and chunk_bwd.chunk_backward recomputes hs and R with one more walk. merged: the wy
    kernel makes A, Aqk and n_exact itself (no intra, exact_diag or solve launch). apply_a (inference, with merged and
    fuse_output): the walk applies A, R = A (Z - E S_0), and the wy kernel stores E for it instead of forming
    Y = A E and U = A Z. Entries not kept are None."""
    if recompute_states and not fuse_output:
        raise ValueError("recompute_states needs fuse_output=True: the output kernel reads the per-chunk states")
    if apply_a and (for_backward or not merged or not fuse_output):
        raise ValueError("apply_a (GDN2_TRITON_WALK_APPLIES_A=1) is an inference variant of the merged kernel with the "
                         "output inside the walk: it needs merged=True (GDN2_TRITON_MERGED=1), fuse_output=True "
                         "(GDN2_TRITON_INFER_FUSED) and for_backward=False (the backward reads Y = A E)")
    if apply_a and not walk_can_apply_a(q.dtype, q.shape[-1]):
        raise ValueError(f"apply_a: no state-kernel config fits {q.dtype} at K = {q.shape[-1]} in shared memory "
                         f"(state_fits); use apply_a=False (GDN2_TRITON_WALK_APPLIES_A=0)")
    cu, chunk_indices, _, n_chunks = layout
    TT, H, K = q.shape
    HV, V = v.shape[1], v.shape[2]
    BK, BV = block_sizes(K, V)
    prec = SERIAL_PRECISION
    dev = q.device
    if merged:
        A, Aqk, n_exact = chunk_matrices(q, n_chunks, with_n_exact=for_backward)
    else:
        A, Aqk, n_exact = intra_forward(q, k, g, b, rq, rk, scale, cu, chunk_indices, n_chunks, use_l2)
    Y, Qg, Kt = (torch.empty(TT, H, K, device=dev, dtype=v.dtype) for _ in range(3))     # Y holds E with apply_a
    gC = torch.empty(n_chunks, H, K, device=dev, dtype=torch.float32)
    U = v if apply_a else torch.empty_like(v)                 # not written with apply_a: the walk reads v there
    # without n_exact (merged inference) A stands in for its pointer, never touched (COUNT_EXACT=False)
    gdn2_fwd_kernel_wy[(n_chunks, H)](q, k, v, g, b, w, rq, rk, A, Aqk, A if n_exact is None else n_exact, Y, Qg, Kt,
                                      gC, U, cu, chunk_indices, scale, H=H, HV=HV, K=K, V=V, BV=BV,
                                      USE_L2=use_l2, PREC=prec, MERGED=merged, PAIR_PREC=dot_precision(q.dtype),
                                      COUNT_EXACT=merged and for_backward, APPLY_A=apply_a)
    store_states = not fuse_output or (for_backward and not recompute_states)
    o, ht, hs, R = state_walk(Y, U, Kt, gC, h0, Qg, Aqk, layout, output_final_state, fuse_output, store_states,
                              *((A, w) if apply_a else ()))
    if not fuse_output:
        o = torch.empty_like(v)
        grid = lambda meta: (triton.cdiv(V, meta["BV"]), n_chunks, HV)
        gdn2_fwd_kernel_output[grid](Qg, Aqk, hs, R, o, cu, chunk_indices, H=H, HV=HV, K=K, V=V, BK=BK, PREC=prec)
    return o, ht, dict(A=A, Aqk=Aqk, n_exact=n_exact, Y=Y, Qg=Qg, Kt=Kt, gC=gC, hs=hs, R=R,
                       U=U if for_backward and recompute_states else None)
