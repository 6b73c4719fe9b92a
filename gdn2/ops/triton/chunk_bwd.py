r"""GDN-2 chunkwise backward kernels (gate-aware: the gates sit inside the products that accumulate dA).

Forward per chunk (see chunk_fwd.py): Y = A E, U = A Z, R = U - Y S_0, O = Q S_0 + Aqk R,
S_C = Diag(e^{G_C}) S_0 + Kt^T R, A = (I + T)^-1, T_rs = sum_d (b k)_rd k_sd e^{G_rd - G_sd} (s < r),
Aqk_rs = sum_d (scale q)_rd k_sd e^{G_rd - G_sd}.

Backward, with dS_C the gradient of the state leaving the chunk:
    dR  = Aqk^T dO + Kt dS_C
    dS_0 = Q^T dO + Diag(e^{G_C}) dS_C - Y^T dR                 (the reverse state recurrence)
    dU = dR,  dY = -dR S_0^T,  dZ = A^T dU (dv = dZ w, dw = dZ v),  dE = A^T dY
    dA  = dU Z^T + dY E^T,  dAqk = tril(dO R^T),  dT = -tril(A^T dA A^T, -1)
    dQ  = dO S_0^T,  dKt = R dS_C^T,  d e^{G_C} = rowsum(dS_C * S_0)
    For M_rs = sum_d L_rd R_sd e^{G_rd - G_sd}:  dL_r = sum_s dM_rs R_s e_rs,  dR_s = sum_r dM_rs L_r e_rs,
                                                 dG += L dL - R dR     (per channel)
    dG from the elementwise factors: dQ*Q + dE*E - dKt*Kt, and at the chunk's last token sum_r dKt*Kt + dS-term;
    dg = reverse cumsum of dG inside the chunk.

Kernels (in launch order; only dstate is sequential)
  gdn2_bwd_kernel_dlocal  grid (V blocks, chunks, value heads): dR_local = Aqk^T dO.
  gdn2_bwd_kernel_dstate  grid (V blocks, sequences * value heads): the reverse walk, state as up to four [BK, BV]
                          fp32 blocks. Per chunk: stores dS_C, dR = dR_local + Kt dS_C (stored), then
                          dS <- Diag(e^{G_C}) dS + Q^T dO - Y^T dR; writes dS_0 of the sequence (initial-state grad).
  gdn2_bwd_kernel_dqk     grid (chunks x K blocks of BK, key heads): sums over the group's value heads and V blocks
                          dQ, dY, dKt, d e^{G_C}; dE = A^T dY; writes the elementwise parts of dq, dk, db, dG (fp32)
                          and this K block's share of dA, dY E^T ([NK, TT, H, 64] fp32).
  gdn2_bwd_kernel_dav     grid (chunks, key heads): dZ = A^T dR -> dv, dw; dA = sum of the K-block shares + dR Z^T;
                          dAqk = tril(dO R^T); dT = -A^T dA A^T (fp32: IEEE products for fp32 inputs, tf32x3
                          - three tf32 passes, about fp32 accuracy on tensor cores - for 16-bit inputs).
  gdn2_bwd_kernel_exact_diag  grid (4 x chunks, key heads, K slices of BKD): the diagonal blocks' backward on the
                          channels off the midpoint form (gates.py), row by row, added to the partials dq, dk, db,
                          dG; a sub-chunk without such channels (the forward's count n_exact) returns at once.
  gdn2_bwd_kernel_dqkg    grid (chunks x K slices of BKS, key heads): the backward of T and Aqk (every product reduces
                          over rows, so K splits over the grid), all 64 rows of the chunk: per sub-chunk j and side one
                          [64, 16] x [16, BKS] product (the columns of dM in j times k e^(ce_j - G), the rows of dM in j
                          transposed times X e^(G - cb_j)), whose rows of sub-chunk j are the diagonal block (midpoint
                          channels only, scaled through the midpoint); the products are summed as Horner recurrences
                          over the sub-chunks (ascending for the row side, descending for the column side) with
                          per-channel weights only, and each sub-chunk's loads are issued one step ahead; adds the
                          elementwise parts and writes dq, dk, db (and dg = reverse cumsum over the chunk) in their
                          final dtypes.
With fp32 inputs the fp32 products of dqk, dav, dqkg (the dA / dT path) use IEEE precision (utils.dot_precision),
the others tf32 (utils.SERIAL_PRECISION); with 16-bit inputs tf32 throughout.
The q/k L2-norm VJP (if fused) is applied on the [TT, H, K] results in PyTorch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gdn2.ops.triton.fwd_state import STATE_CONFIGS
from gdn2.ops.triton.gates import chunk_key_side, diag_row, exact_channels, load_sub_chunk, midpoint_channels
from gdn2.ops.triton.tiles import (
    chunk_span,
    decayed_plus,
    key_block_dot,
    key_block_dot_t,
    key_head_inputs,
    l2_rows,
    load_rows,
    load_state_blocks,
    state_block_t,
    store_rows,
    store_state_block,
    store_state_blocks,
    store_tile,
    sub_chunk_span,
    tile,
    tile_t,
)
from gdn2.ops.triton.utils import (
    CHUNK,
    SERIAL_PRECISION,
    SUBS_PER_CHUNK,
    block_sizes,
    dot_precision,
    solve_precision,
    tuned,
)

DLOCAL_CONFIGS = [triton.Config({"BV": 64}, num_warps=4, num_stages=2), triton.Config({"BV": 32}, num_warps=4,
                                                                                       num_stages=2)]
DLOCAL_INTERPRET = triton.Config({"BV": 16}, num_warps=4, num_stages=1)
# The forward state kernel's list (fwd_state.STATE_CONFIGS, fresh Config objects) and key; dstate_fits from the sm_90
# compile report.
DSTATE_CONFIGS = [triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=c.num_stages) for c in STATE_CONFIGS]


def dstate_fits(config, dtype, K, *flags) -> bool:
    """Whether the bwd dstate kernel's sm_90 build stays within 232,448 B of shared memory (compile_check_sm90.py):
    16-bit inputs: every entry up to K = 128 (<= 188,416 B); K <= 256 num_stages=2 only (3 stages:
    315,392 / 335,872 B; BV=64 at 2 stages: 229,376 B). fp32: K <= 64 every entry (<= 229,376 B); K <= 128 the
    BV=16 and 2-warp entries (217,088 / 118,784 B; BV=32/64 at 4 warps: 237,568 / 278,528 B); K <= 256 the 2-warp
    entry only (217,088 B)."""
    if K is None:
        return True
    if dtype != torch.float32:
        return K <= 128 or config.num_stages < 3
    if K <= 64:
        return True
    if K <= 128:
        return config.num_stages < 3 and (config.num_warps == 2 or config.kwargs["BV"] <= 16)
    return config.num_warps == 2


DSTATE_INTERPRET = triton.Config({"BV": 16}, num_warps=4, num_stages=1)
# The entries within 1.15x of the best at B=8, T=4096 (docs/kernels.md#launch-configs). The first entry is the default
# without autotuning.
DQK_CONFIGS = [triton.Config({"BV": 64}, num_warps=8, num_stages=3),
               triton.Config({"BV": 64}, num_warps=8, num_stages=2),
               triton.Config({"BV": 64}, num_warps=4, num_stages=2)]
DQK_INTERPRET = triton.Config({"BV": 16}, num_warps=4, num_stages=1)
# dav at 4 warps holds A^T, dA, dAqk ([64, 64] fp32 each) and spills ~3.2 KB per thread (sm_90 compile, bf16);
# the 8-warp entries halve the per-thread share (the spec's Hopper warning about 8 warps on a 64x64 accumulator is
# why the GPU check runs every entry).
DAV_CONFIGS = [triton.Config({"BV": 64}, num_warps=4, num_stages=2),
               triton.Config({"BV": 32}, num_warps=4, num_stages=2),
               triton.Config({"BV": 64}, num_warps=8, num_stages=2),
               triton.Config({"BV": 32}, num_warps=8, num_stages=1),
               triton.Config({"BV": 64}, num_warps=4, num_stages=1)]
DAV_INTERPRET = triton.Config({"BV": 16}, num_warps=4, num_stages=1)


def dav_fits(config, dtype, K, V=None) -> bool:
    """dav's value blocks no wider than the (power-of-two padded) value width V: a wider block only computes on
    masked columns (V = 32 at heads of 32, where the BV=64 entries are dropped); every entry when V is not given."""
    return V is None or config.kwargs["BV"] <= max(16, triton.next_power_of_2(V))
# dqkg: BKS key channels per program (every product here reduces over rows, never over K, so K splits over the grid).
# The entries within 1.15x of the best at B=8, T=4096; 8 warps took twice as long (docs/kernels.md#launch-configs).
DQKG_CONFIGS = [triton.Config({"BKS": bks}, num_warps=4, num_stages=st, maxnreg=reg)
                for bks, st, reg in ((32, 1, None), (32, 2, None), (16, 1, 128), (32, 1, 168))]
DQKG_INTERPRET = triton.Config({"BKS": 16}, num_warps=4, num_stages=1)
# exact_diag: BKD channels per program (per-channel outputs); one or two warps keep the reductions over the 16 rows
# inside a warp (a full-K form at 2 warps reduced across warps and was several times slower).
EXACT_BWD_CONFIGS = [triton.Config({"BKD": bkd}, num_warps=w, num_stages=1) for bkd, w in ((32, 1), (64, 2))]
EXACT_BWD_INTERPRET = triton.Config({"BKD": 32}, num_warps=1, num_stages=1)


@tuned(DLOCAL_CONFIGS, key=["V", "HV", "PREC"], interpret_config=DLOCAL_INTERPRET, dtype_arg="do")
@triton.jit
def gdn2_bwd_kernel_dlocal(Aqk, do, dRl, cu_seqlens, chunk_indices, H: tl.constexpr, HV: tl.constexpr,
                           V: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    i_v, i_c, i_hv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h = i_hv // (HV // H)
    i_t, bos, eos = chunk_span(chunk_indices, cu_seqlens, i_c)
    t = bos + i_t * 64 + tl.arange(0, 64)
    dt = do.dtype.element_ty
    AqT = tile_t(Aqk + i_h * 64, t, eos, H * 64, 0, 64, 64).to(dt)
    x = tl.dot(AqT, tile(do + i_hv * V, t, eos, HV * V, i_v * BV, V, BV), input_precision=PREC)
    store_tile(dRl + i_hv * V, x, t, eos, HV * V, i_v * BV, V, BV)


@tuned(DSTATE_CONFIGS, key=["K", "V", "HV", "NSH_LOG2", "HAS_DHT", "STORE_DH0", "PREC"],
       interpret_config=DSTATE_INTERPRET, fits=dstate_fits, dtype_arg="do")
@triton.jit
def gdn2_bwd_kernel_dstate(Y, Qg, Kt, gC, dRl, do, dht, dh0, dhs, dR, cu_seqlens, chunk_offsets, NSH_LOG2,
                           H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                           BV: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, PREC: tl.constexpr):
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
    Qg += i_h * K
    Kt += i_h * K
    dRl += i_hv * V
    dR += i_hv * V
    do += i_hv * V
    v0 = i_v * BV
    cv = v0 + tl.arange(0, BV)
    c64 = tl.arange(0, 64)
    dt = do.dtype.element_ty
    D1 = tl.zeros([BK, BV], dtype=tl.float32)
    D2 = tl.zeros([BK, BV], dtype=tl.float32)
    D3 = tl.zeros([BK, BV], dtype=tl.float32)
    D4 = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        D1, D2, D3, D4 = load_state_blocks(dht + i_nh * K * V, cv, K, V, BK, BV)
    for j in range(n_chunks):
        i_t = n_chunks - 1 - j
        i_c = first_chunk + i_t
        t = bos + i_t * 64 + c64
        ph = dhs + (i_c * HV + i_hv) * K * V
        pg = gC + (i_c * H + i_h) * K
        dOt = tile(do, t, eos, SV, v0, V, BV)
        store_state_block(ph, D1, 0, cv, K, V, BK)
        dRb = tile(dRl, t, eos, SV, v0, V, BV).to(tl.float32)
        dRb += key_block_dot(Kt, D1, t, eos, SK, 0, dt, K, BK, PREC)
        if K > BK:
            store_state_block(ph, D2, BK, cv, K, V, BK)
            dRb += key_block_dot(Kt, D2, t, eos, SK, BK, dt, K, BK, PREC)
        if K > 2 * BK:
            store_state_block(ph, D3, 2 * BK, cv, K, V, BK)
            dRb += key_block_dot(Kt, D3, t, eos, SK, 2 * BK, dt, K, BK, PREC)
        if K > 3 * BK:
            store_state_block(ph, D4, 3 * BK, cv, K, V, BK)
            dRb += key_block_dot(Kt, D4, t, eos, SK, 3 * BK, dt, K, BK, PREC)
        store_tile(dR, dRb, t, eos, SV, v0, V, BV)
        dRd = dRb.to(dt)
        # dS <- Diag(exp G_C) dS + Q^T dO - Y^T dR, one key block at a time
        D1 = (decayed_plus(D1, pg, 0, Qg, dOt, t, eos, SK, K, BK, PREC)
              - key_block_dot_t(Y, dRd, t, eos, SK, 0, K, BK, PREC))
        if K > BK:
            D2 = (decayed_plus(D2, pg, BK, Qg, dOt, t, eos, SK, K, BK, PREC)
                  - key_block_dot_t(Y, dRd, t, eos, SK, BK, K, BK, PREC))
        if K > 2 * BK:
            D3 = (decayed_plus(D3, pg, 2 * BK, Qg, dOt, t, eos, SK, K, BK, PREC)
                  - key_block_dot_t(Y, dRd, t, eos, SK, 2 * BK, K, BK, PREC))
        if K > 3 * BK:
            D4 = (decayed_plus(D4, pg, 3 * BK, Qg, dOt, t, eos, SK, K, BK, PREC)
                  - key_block_dot_t(Y, dRd, t, eos, SK, 3 * BK, K, BK, PREC))
    if STORE_DH0:
        store_state_blocks(dh0 + i_nh * K * V, D1, D2, D3, D4, cv, K, V, BK)


@tuned(DQK_CONFIGS, key=["K", "V", "HV", "USE_L2", "PREC"], interpret_config=DQK_INTERPRET, dtype_arg="do")
@triton.jit
def gdn2_bwd_kernel_dqk(q, k, g, b, rq, rk, A, hs, dhs, do, dR, R, dq, dk, db, dG, dAE, cu_seqlens, chunk_indices,
                        scale, TT, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                        BK: tl.constexpr, BV: tl.constexpr, USE_L2: tl.constexpr, PREC: tl.constexpr):
    # the K blocks of a chunk are neighbours in the launch order, so they read its dO, dR, R tiles from L2
    i_c, i_k, i_h = tl.program_id(0) // tl.cdiv(K, BK), tl.program_id(0) % tl.cdiv(K, BK), tl.program_id(1)
    i_t, bos, eos = chunk_span(chunk_indices, cu_seqlens, i_c)
    t0 = bos + i_t * 64
    last = tl.minimum(eos - t0, 64) - 1
    SK = H * K
    SV = HV * V
    S64 = H * 64
    k0 = i_k * BK
    ck = k0 + tl.arange(0, BK)
    c64 = tl.arange(0, 64)
    t = t0 + c64
    mt = t < eos
    dQ = tl.zeros([64, BK], dtype=tl.float32)
    dY = tl.zeros([64, BK], dtype=tl.float32)
    dKt = tl.zeros([64, BK], dtype=tl.float32)
    dgl = tl.zeros([BK], dtype=tl.float32)
    for j in range(HV // H):
        i_hv = i_h * (HV // H) + j
        voff = i_hv * V
        soff = (i_c * HV + i_hv) * K * V
        for v0 in range(0, V, BV):
            cv = v0 + tl.arange(0, BV)
            S0T = state_block_t(hs + soff, k0, cv, K, V, BK)                    # [BV, BK]
            dSCT = state_block_t(dhs + soff, k0, cv, K, V, BK)
            dQ += tl.dot(tile(do + voff, t, eos, SV, v0, V, BV), S0T, input_precision=PREC)
            dY -= tl.dot(tile(dR + voff, t, eos, SV, v0, V, BV), S0T, input_precision=PREC)
            dKt += tl.dot(tile(R + voff, t, eos, SV, v0, V, BV), dSCT, input_precision=PREC)
            dgl += tl.sum(dSCT.to(tl.float32) * S0T.to(tl.float32), 0)
    koff = i_h * K
    G, G_last, E, Q, Kt, qt, kt, bt = chunk_key_side(q + koff, k + koff, g + koff, b + koff, rq + i_h, rk + i_h,
                                                     t, eos, ck, scale, SK, H, K, USE_L2)
    AT = tile_t(A + i_h * 64, t, eos, S64, 0, 64, 64).to(tl.float32)
    dE = tl.dot(AT, dY, input_precision=PREC)
    # this K block's share of dA = dY E^T (E^T loaded transposed is not needed: E is an elementwise tile)
    dAE_blk = tl.dot(dY, tl.trans(E), input_precision=PREC)
    tl.store(dAE + (i_k * TT + t[:, None]) * S64 + i_h * 64 + c64[None, :], dAE_blk, mask=mt[:, None])
    gamma = tl.exp(G)
    tail = tl.exp(G_last[None, :] - G)
    dGp = dQ * Q + dE * E - dKt * Kt
    dGp += tl.where((c64 == last)[:, None], (tl.sum(dKt * Kt, 0) + dgl * tl.exp(G_last))[None, :], 0.)
    mk = mt[:, None] & (ck < K)[None, :]
    kptr = t[:, None] * SK + koff + ck[None, :]
    tl.store(dq + kptr, dQ * scale * gamma, mask=mk)
    tl.store(dk + kptr, dE * gamma * bt + dKt * tail, mask=mk)
    tl.store(db + kptr, dE * gamma * kt, mask=mk)
    tl.store(dG + kptr, dGp, mask=mk)


@tuned(DAV_CONFIGS, key=["V", "HV", "NK", "PREC", "PREC_T"], interpret_config=DAV_INTERPRET, fits=dav_fits,
       dtype_arg="do", fits_args=("V",))
@triton.jit
def gdn2_bwd_kernel_dav(v, w, A, do, dR, R, dAE, dv, dw, dT, dAqk, cu_seqlens, chunk_indices, TT,
                        H: tl.constexpr, HV: tl.constexpr, V: tl.constexpr, NK: tl.constexpr, BV: tl.constexpr,
                        PREC: tl.constexpr, PREC_T: tl.constexpr):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_t, bos, eos = chunk_span(chunk_indices, cu_seqlens, i_c)
    SV = HV * V
    S64 = H * 64
    c64 = tl.arange(0, 64)
    t = bos + i_t * 64 + c64
    mt = t < eos
    dt = do.dtype.element_ty
    AT = tile_t(A + i_h * 64, t, eos, S64, 0, 64, 64).to(tl.float32)
    dA = tl.zeros([64, 64], dtype=tl.float32)
    for i_k in range(NK):
        dA += tile(dAE + i_k * TT * S64 + i_h * 64, t, eos, S64, 0, 64, 64)
    dAq = tl.zeros([64, 64], dtype=tl.float32)
    for j in range(HV // H):
        voff = (i_h * (HV // H) + j) * V
        for v0 in range(0, V, BV):
            dRt = tile(dR + voff, t, eos, SV, v0, V, BV)
            dZ = tl.dot(AT, dRt.to(tl.float32), input_precision=PREC)
            wt = tile(w + voff, t, eos, SV, v0, V, BV).to(tl.float32)
            vt = tile(v + voff, t, eos, SV, v0, V, BV).to(tl.float32)
            store_tile(dv + voff, dZ * wt, t, eos, SV, v0, V, BV)
            store_tile(dw + voff, dZ * vt, t, eos, SV, v0, V, BV)
            ZT = tile_t(w + voff, t, eos, SV, v0, V, BV).to(tl.float32) * \
                tile_t(v + voff, t, eos, SV, v0, V, BV).to(tl.float32)
            dA += tl.dot(dRt, ZT.to(dt), input_precision=PREC)
            dAq += tl.dot(tile(do + voff, t, eos, SV, v0, V, BV), tile_t(R + voff, t, eos, SV, v0, V, BV),
                          input_precision=PREC)
    incl = c64[:, None] >= c64[None, :]
    strict = c64[:, None] > c64[None, :]
    dTm = -tl.dot(AT, tl.dot(dA, AT, input_precision=PREC_T), input_precision=PREC_T)
    tl.store(dT + t[:, None] * S64 + i_h * 64 + c64[None, :], tl.where(strict, dTm, 0.), mask=mt[:, None])
    tl.store(dAqk + t[:, None] * S64 + i_h * 64 + c64[None, :], tl.where(incl, dAq, 0.), mask=mt[:, None])


@triton.jit
def diag_exact_bwd(q, k, g, b, rq, rk, dT, dAqk, t0, eos, cols, kt, exact, scale, SK, S64, H, K: tl.constexpr,
                   BKS: tl.constexpr, USE_L2: tl.constexpr):
    """Backward of the diagonal [16, 16] blocks over the `exact` channels [BKS] only, row by row with exact
    exponentials (dT, dAqk point at the block's first column). Returns the [16, BKS] gradients of the sub-chunk's
    (b k), (scale q) and k rows."""
    r16 = tl.arange(0, 16)
    unsafe = exact[None, :]
    G_r = tl.zeros([BKS], dtype=tl.float32)
    Gs = tl.zeros([16, BKS], dtype=tl.float32)
    d_bk = tl.zeros([16, BKS], dtype=tl.float32)
    d_qs = tl.zeros([16, BKS], dtype=tl.float32)
    d_k = tl.zeros([16, BKS], dtype=tl.float32)
    for r in range(16):
        tr = t0 + r
        ok = tr < eos
        G_r, Gs, e, qr, bkr = diag_row(q, k, g, b, rq, rk, tr, ok, r, cols, G_r, Gs, scale, SK, H, K, USE_L2)
        e = tl.where(unsafe, e, 0.)
        dTr = tl.load(dT + tr * S64 + r16, mask=ok & (r16 < r), other=0.)[:, None]
        dQr = tl.load(dAqk + tr * S64 + r16, mask=ok & (r16 <= r), other=0.)[:, None]
        ke = kt * e
        row = (r16 == r)[:, None]
        d_bk = tl.where(row, tl.sum(dTr * ke, 0)[None, :], d_bk)
        d_qs = tl.where(row, tl.sum(dQr * ke, 0)[None, :], d_qs)
        d_k += (dTr * bkr[None, :] + dQr * qr[None, :]) * e
    return d_bk, d_qs, d_k


@triton.jit
def _add_row_side(dq, dk, db, dG, t, eos, cols, SK, K: tl.constexpr, d_bk, d_qs, bk, qs, kb, bb, scale):
    """Add the gradients d(b k), d(scale q) of the pairwise products to the elementwise partials: dq and db are then
    final, dk and dG still lack the column side's d_k (_add_col_side). Returns (dq, dk, db, dG) tiles."""
    pq = load_rows(dq, t, eos, SK, cols, K) + d_qs * scale
    pk = load_rows(dk, t, eos, SK, cols, K) + d_bk * bb
    pb = load_rows(db, t, eos, SK, cols, K) + d_bk * kb
    pG = load_rows(dG, t, eos, SK, cols, K) + bk * d_bk + qs * d_qs
    return pq, pk, pb, pG


@triton.jit
def _add_col_side(pk, pG, d_k, kb):
    """Add the pairwise products' dk (column side) to the dk and dG tiles of _add_row_side."""
    return pk + d_k, pG - kb * d_k


@tuned(EXACT_BWD_CONFIGS, key=["K", "USE_L2"], interpret_config=EXACT_BWD_INTERPRET, dtype_arg="q",
       restore_value=("dq", "dk", "db", "dG"))
@triton.jit
def gdn2_bwd_kernel_exact_diag(q, k, g, b, rq, rk, dT, dAqk, dq, dk, db, dG, n_exact, cu_seqlens, chunk_indices,
                               scale, H: tl.constexpr, K: tl.constexpr, BKD: tl.constexpr, USE_L2: tl.constexpr):
    """The backward of gdn2_fwd_kernel_exact_diag: for the channels off the midpoint form (gates.exact_channels),
    the diagonal blocks' gradients, added to the elementwise partials dq, dk, db, dG in place before
    gdn2_bwd_kernel_dqkg reads them. One sub-chunk and BKD channels per program; a sub-chunk without such channels
    (the forward's count n_exact is 0) only reads that count."""
    i_s, i_h, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if tl.load(n_exact + i_s * H + i_h) == 0:
        return
    r0, i_t, bos, eos = sub_chunk_span(chunk_indices, cu_seqlens, i_s)
    SK = H * K
    S64 = H * 64
    koff = i_h * K
    q, k, g, b, rq, rk = key_head_inputs(q, k, g, b, rq, rk, i_h, K)
    t0 = bos + i_t * 64 + r0
    ti = t0 + tl.arange(0, 16)
    cols = i_k * BKD + tl.arange(0, BKD)
    exact = exact_channels(load_rows(g, ti, eos, SK, cols, K))
    if tl.sum(exact.to(tl.int32), 0) > 0:
        _, _, qs, kt, bk, _ = load_sub_chunk(q, k, g, b, rq, rk, ti, eos, tl.zeros([BKD], dtype=tl.float32), cols,
                                             scale, SK, H, K, USE_L2)
        d_bk, d_qs, d_k = diag_exact_bwd(q, k, g, b, rq, rk, dT + i_h * 64 + r0, dAqk + i_h * 64 + r0, t0, eos, cols,
                                         kt, exact, scale, SK, S64, H, K, BKD, USE_L2)
        pq, pk, pb, pG = _add_row_side(dq + koff, dk + koff, db + koff, dG + koff, ti, eos, cols, SK, K, d_bk, d_qs,
                                       bk, qs, kt, load_rows(b, ti, eos, SK, cols, K), scale)
        pk, pG = _add_col_side(pk, pG, d_k, kt)
        store_rows(dq + koff, pq, ti, eos, SK, cols, K)
        store_rows(dk + koff, pk, ti, eos, SK, cols, K)
        store_rows(db + koff, pb, ti, eos, SK, cols, K)
        store_rows(dG + koff, pG, ti, eos, SK, cols, K)


@triton.jit
def sub_chunk_cumsum(x):
    """[64, BK] -> the inclusive cumsum of x inside each 16-row sub-chunk (G - G before the sub-chunk, for g)."""
    BK: tl.constexpr = x.shape[1]
    return tl.reshape(tl.cumsum(tl.reshape(x, (4, 16, BK)), 1), (64, BK))


@triton.jit
def midpoint_weights(tot, on):
    """For a sub-chunk with total tot [BK] (G at its last row minus G before it) and midpoint channels `on` [BK]:
    half = m - cb (tot / 2 on the midpoint channels, else 0), e^half, and the diagonal block's weight e^-half (0 off
    the midpoint channels: their diagonal blocks come from the exact kernels). Each <= e^40 (MIDPOINT_G_MIN)."""
    half = tl.where(on, 0.5 * tot, 0.)
    return half, tl.exp(half), tl.where(on, tl.exp(-half), 0.)


@triton.jit
def _row_side_loads(k, g, dT, dAqk, t0, t, eos, j, c0, SK, S64, K: tl.constexpr, BKS: tl.constexpr):
    """dqkg's row-side inputs for sub-chunk j, in their stored dtypes: its k, g rows [16, BKS] (channels c0 ..) and the
    columns of dT, dAqk in it [64, 16] (the chunk's rows t)."""
    tj = t0 + 16 * j + tl.arange(0, 16)
    return (tile(k, tj, eos, SK, c0, K, BKS), tile(g, tj, eos, SK, c0, K, BKS), tile(dT, t, eos, S64, 16 * j, 64, 16),
            tile(dAqk, t, eos, S64, 16 * j, 64, 16))


@triton.jit
def _col_side_loads(q, k, b, g, dT, dAqk, t0, eos, j, c0, SK, S64, K: tl.constexpr, BKS: tl.constexpr):
    """dqkg's column-side inputs for sub-chunk j, in their stored dtypes: its q, k, b, g rows [16, BKS] and the rows
    of dT, dAqk in it, transposed [64, 16]."""
    tj = t0 + 16 * j + tl.arange(0, 16)
    return (tile(q, tj, eos, SK, c0, K, BKS), tile(k, tj, eos, SK, c0, K, BKS), tile(b, tj, eos, SK, c0, K, BKS),
            tile(g, tj, eos, SK, c0, K, BKS), tile_t(dT, tj, eos, S64, 0, 64, 64),
            tile_t(dAqk, tj, eos, S64, 0, 64, 64))


# The partials dq, dk, db, dG are read only and the totals go to separate outputs, so no autotuned config sees
# another's result (updated in place, the autotuner's first call per shape would add the pairwise part once per timed
# config).
@tuned(DQKG_CONFIGS, key=["K", "USE_L2", "PREC"], interpret_config=DQKG_INTERPRET, dtype_arg="q")
@triton.jit
def gdn2_bwd_kernel_dqkg(q, k, g, b, rq, rk, dT, dAqk, dq, dk, db, dG, dq_out, dk_out, db_out, dg, cu_seqlens,
                         chunk_indices, scale, H: tl.constexpr, K: tl.constexpr, BKS: tl.constexpr,
                         USE_L2: tl.constexpr, PREC: tl.constexpr):
    """The backward of T and Aqk for BKS key channels of one chunk (all 64 rows). With X = b k (for T) or scale q
    (for Aqk), dM = dT or dAqk (0 above the diagonal), sub-chunks i (of the row r or column s) and j, cb_j / ce_j =
    G before sub-chunk j / at its last row, tot_j = ce_j - cb_j <= 0, lc = G - cb of the row's own sub-chunk:
      dX_r = sum_{j<i} e^(G_r - ce_j) P_j[r],   P_j = dM[:, j] (k e^(ce_j - G))_j   ([64, 16] x [16, BKS])
      dk_s = sum_{j>i} e^(cb_j - G_s) C_j[s],   C_j = dM[j, :]^T (X e^(G - cb_j))_j
    plus the diagonal block j = i. Every factor is <= 1, and the sums run as Horner recurrences over the sub-chunks
    with per-channel weights only: ascending, acc <- e^(tot_j) acc + P_j holds sum_{j<i} e^(cb_i - ce_j) P_j when
    sub-chunk i is reached, and its rows are captured then (rows of later sub-chunks keep accumulating, earlier ones
    are 0 in P_j); descending, the same with C_j for the column side. So the [64, BKS] tiles see one multiply-add
    per product and one select per capture, and one exponential at the end: e^(lc - half) (row side) or
    e^(tot - half - lc) (column side), where half = (m - cb) is tot / 2 on the midpoint channels (midpoint_channels:
    the diagonal block e^(G_r - G_s) = e^(G_r - m) e^(m - G_s), each factor <= e^40) and 0 elsewhere (those
    channels' diagonal blocks are 0 here and come from gdn2_bwd_kernel_exact_diag, which added them to the
    partials). The partials dq, dk, db, dG (fp32) in; the totals dq_out, dk_out, db_out and dg (the reverse cumsum
    of dG over the chunk) out, in their own dtypes."""
    # the K slices of a chunk are neighbours in the launch order, so they read its dT, dAqk from L2
    i_c, i_k, i_h = tl.program_id(0) // tl.cdiv(K, BKS), tl.program_id(0) % tl.cdiv(K, BKS), tl.program_id(1)
    i_t, bos, eos = chunk_span(chunk_indices, cu_seqlens, i_c)
    SK = H * K
    S64 = H * 64
    koff = i_h * K
    q, k, g, b, rq, rk = key_head_inputs(q, k, g, b, rq, rk, i_h, K)
    dT += i_h * 64
    dAqk += i_h * 64
    r64 = tl.arange(0, 64)
    r16 = tl.arange(0, 16)
    rows = (r64 // 16)[:, None]                       # sub-chunk of each row
    t0 = bos + i_t * 64
    t = t0 + r64
    c0 = i_k * BKS
    cols = c0 + tl.arange(0, BKS)
    # row side, sub-chunks ascending: d(b k) from dT, d(scale q) from dAqk
    acc_T = tl.zeros([64, BKS], dtype=tl.float32)
    acc_Q = tl.zeros([64, BKS], dtype=tl.float32)
    d_bk = tl.zeros([64, BKS], dtype=tl.float32)
    d_qs = tl.zeros([64, BKS], dtype=tl.float32)
    ref_r = tl.zeros([64, BKS], dtype=tl.float32)     # half of each row's sub-chunk
    k_n, g_n, dT_n, dQ_n = _row_side_loads(k, g, dT, dAqk, t0, t, eos, 0, c0, SK, S64, K, BKS)
    for j in range(4):
        # the next sub-chunk's loads are issued before this one's work (their latency bounds this kernel); the last
        # step loads sub-chunk 3 again (in bounds, unused), as the column side's last step loads sub-chunk 0
        k_j, g_j, dT_j, dQ_j = k_n, g_n, dT_n, dQ_n
        k_n, g_n, dT_n, dQ_n = _row_side_loads(k, g, dT, dAqk, t0, t, eos, tl.minimum(j + 1, 3), c0, SK, S64, K,
                                               BKS)
        k_j = l2_rows(k_j.to(tl.float32), rk, t0 + 16 * j + r16, eos, H, USE_L2)
        g_j = g_j.to(tl.float32)
        lc = tl.cumsum(g_j, 0)
        tot = tl.sum(g_j, 0)
        half, up, diag = midpoint_weights(tot, midpoint_channels(g_j))
        kR = k_j * tl.exp(tot[None, :] - lc)
        P_T = tl.dot(dT_j, kR, input_precision=PREC)                  # dM's columns in j
        P_Q = tl.dot(dQ_j, kR, input_precision=PREC)
        here = rows == j
        d_bk = tl.where(here, acc_T * up[None, :] + P_T * diag[None, :], d_bk)
        d_qs = tl.where(here, acc_Q * up[None, :] + P_Q * diag[None, :], d_qs)
        ref_r = tl.where(here, half[None, :], ref_r)
        decay = tl.exp(tot)[None, :]
        acc_T = acc_T * decay + P_T
        acc_Q = acc_Q * decay + P_Q
    # the row side is done: dq and db are final, dk and dG wait for the column side
    lc64 = sub_chunk_cumsum(load_rows(g, t, eos, SK, cols, K))
    d_bk *= tl.exp(lc64 - ref_r)
    d_qs *= tl.exp(lc64 - ref_r)
    kt = load_rows(k, t, eos, SK, cols, K)
    qs = load_rows(q, t, eos, SK, cols, K) * scale
    kt = l2_rows(kt, rk, t, eos, H, USE_L2)
    qs = l2_rows(qs, rq, t, eos, H, USE_L2)
    bt = load_rows(b, t, eos, SK, cols, K)
    pq, pk, pb, pG = _add_row_side(dq + koff, dk + koff, db + koff, dG + koff, t, eos, cols, SK, K, d_bk, d_qs,
                                   bt * kt, qs, kt, bt, scale)
    store_rows(dq_out + koff, pq, t, eos, SK, cols, K)
    store_rows(db_out + koff, pb, t, eos, SK, cols, K)
    # column side, sub-chunks descending: dk from both
    acc_C = tl.zeros([64, BKS], dtype=tl.float32)
    d_k = tl.zeros([64, BKS], dtype=tl.float32)
    ref_c = tl.zeros([64, BKS], dtype=tl.float32)     # tot - half of each row's sub-chunk
    q_n, k_n, b_n, g_n, dT_n, dQ_n = _col_side_loads(q, k, b, g, dT, dAqk, t0, eos, 3, c0, SK, S64, K, BKS)
    for jj in range(4):
        j = 3 - jj
        q_j, k_j, b_j, g_j, dT_j, dQ_j = q_n, k_n, b_n, g_n, dT_n, dQ_n
        q_n, k_n, b_n, g_n, dT_n, dQ_n = _col_side_loads(q, k, b, g, dT, dAqk, t0, eos, tl.maximum(j - 1, 0), c0,
                                                         SK, S64, K, BKS)
        tj = t0 + 16 * j + r16
        qs_j = q_j.to(tl.float32) * scale
        k_j = l2_rows(k_j.to(tl.float32), rk, tj, eos, H, USE_L2)
        qs_j = l2_rows(qs_j, rq, tj, eos, H, USE_L2)
        g_j = g_j.to(tl.float32)
        lc = tl.cumsum(g_j, 0)
        tot = tl.sum(g_j, 0)
        half, up, diag = midpoint_weights(tot, midpoint_channels(g_j))
        lo = tl.exp(lc)
        C = tl.dot(dT_j, b_j.to(tl.float32) * k_j * lo, input_precision=PREC)
        C += tl.dot(dQ_j, qs_j * lo, input_precision=PREC)
        here = rows == j
        d_k = tl.where(here, acc_C * up[None, :] + C * diag[None, :], d_k)
        ref_c = tl.where(here, (tot - half)[None, :], ref_c)
        acc_C = acc_C * tl.exp(tot)[None, :] + C
    d_k *= tl.exp(ref_c - lc64)
    pk, pG = _add_col_side(pk, pG, d_k, kt)
    store_rows(dk_out + koff, pk, t, eos, SK, cols, K)
    store_rows(dg + koff, tl.cumsum(pG, 0, reverse=True), t, eos, SK, cols, K)


def chunk_backward(q, k, v, g, b, w, rq, rk, h0, saved, do, dht, scale, layout, use_l2):
    """saved: the intermediates of chunk_fwd.chunk_forward. Returns dq, dk, db, dg ([TT, H, K]; dq, dk before the
    L2-norm VJP: fp32 with use_l2, else in q's / k's dtype; db, dg in b's / g's dtype), dv, dw ([TT, Hv, V]), dh0
    or None."""
    cu, chunk_indices, chunk_offsets, n_chunks = layout
    n_seqs = cu.numel() - 1
    TT, H, K = q.shape
    HV, V = v.shape[1], v.shape[2]
    BK, _ = block_sizes(K, V)
    NK = triton.cdiv(K, BK)
    prec = dot_precision(v.dtype)
    dev = q.device
    do = do.to(v.dtype)
    A, Aqk, R, hs = saved["A"], saved["Aqk"], saved["R"], saved["hs"]
    dRl = torch.empty_like(v)
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), n_chunks, HV)
    gdn2_bwd_kernel_dlocal[grid](Aqk, do, dRl, cu, chunk_indices, H=H, HV=HV, V=V, PREC=SERIAL_PRECISION)
    dhs = torch.empty(n_chunks, HV, K, V, device=dev, dtype=v.dtype)
    dR = torch.empty_like(v)
    dh0 = torch.empty(n_seqs, HV, K, V, device=dev, dtype=torch.float32) if h0 is not None else None
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), n_seqs * HV)
    gdn2_bwd_kernel_dstate[grid](saved["Y"], saved["Qg"], saved["Kt"], saved["gC"], dRl, do, dht, dh0, dhs, dR,
                                 cu, chunk_offsets, (n_seqs * HV).bit_length(), H=H, HV=HV, K=K, V=V, BK=BK,
                                 HAS_DHT=dht is not None,
                                 STORE_DH0=h0 is not None, PREC=SERIAL_PRECISION)
    del dRl
    dq, dk, db, dG = (torch.empty(TT, H, K, device=dev, dtype=torch.float32) for _ in range(4))
    dAE = torch.empty(NK, TT, H, CHUNK, device=dev, dtype=torch.float32)
    gdn2_bwd_kernel_dqk[(n_chunks * NK, H)](q, k, g, b, rq, rk, A, hs, dhs, do, dR, R, dq, dk, db, dG, dAE, cu,
                                           chunk_indices, scale, TT, H=H, HV=HV, K=K, V=V, BK=BK, USE_L2=use_l2,
                                           PREC=prec)
    del dhs
    dv = torch.empty_like(v)
    dw = torch.empty_like(w)
    dT = torch.empty(TT, H, CHUNK, device=dev, dtype=torch.float32)
    dAqk = torch.empty_like(dT)
    gdn2_bwd_kernel_dav[(n_chunks, H)](v, w, A, do, dR, R, dAE, dv, dw, dT, dAqk, cu, chunk_indices, TT,
                                       H=H, HV=HV, V=V, NK=NK, PREC=prec, PREC_T=solve_precision(v.dtype))
    del dAE
    grid = lambda meta: (SUBS_PER_CHUNK * n_chunks, H, triton.cdiv(K, meta["BKD"]))
    gdn2_bwd_kernel_exact_diag[grid](q, k, g, b, rq, rk, dT, dAqk, dq, dk, db, dG, saved["n_exact"], cu,
                                     chunk_indices, scale, H=H, K=K, USE_L2=use_l2)
    # the totals in the inputs' dtypes (no casts after the kernel); q and k stay fp32 for the L2-norm VJP
    dq_out = torch.empty(TT, H, K, device=dev, dtype=torch.float32 if use_l2 else q.dtype)
    dk_out = torch.empty(TT, H, K, device=dev, dtype=torch.float32 if use_l2 else k.dtype)
    db_out = torch.empty_like(b)
    dg_out = torch.empty_like(g)
    grid = lambda meta: (n_chunks * triton.cdiv(K, meta["BKS"]), H)
    gdn2_bwd_kernel_dqkg[grid](q, k, g, b, rq, rk, dT, dAqk, dq, dk, db, dG, dq_out, dk_out, db_out, dg_out, cu,
                               chunk_indices, scale, H=H, K=K, USE_L2=use_l2, PREC=prec)
    return dq_out, dk_out, db_out, dg_out, dv, dw, dh0
