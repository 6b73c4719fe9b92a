r"""GDN-2 chunkwise backward kernels (gate-aware: the gates sit inside the products that accumulate dA).

Forward per chunk (see chunk_fwd.py): W = Z - E S_0, R = A W, O = Q S_0 + Aqk R, S_C = Diag(e^{G_C}) S_0 + Kt^T R,
A = (I + T)^-1, T_rs = sum_d (b k)_rd k_sd e^{G_rd - G_sd} (s < r), Aqk_rs = sum_d (scale q)_rd k_sd e^{G_rd - G_sd}.

Backward, with dS_C the gradient of the state leaving the chunk:
    dR  = Aqk^T dO + Kt dS_C,           dW = A^T dR            (dZ = dW: dv = dW w, dw = dW v)
    dS_0 = Q^T dO + Diag(e^{G_C}) dS_C - E^T dW                 (the reverse state recurrence)
    dA  = dR W^T,  dAqk = tril(dO R^T),  dT = -tril(A^T dA A^T, -1)
    dQ  = dO S_0^T,  dE = -dW S_0^T,  dKt = R dS_C^T,  d e^{G_C} = rowsum(dS_C * S_0)
    For M_rs = sum_d L_rd R_sd e^{G_rd - G_sd}:  dL_r = sum_s dM_rs R_s e_rs,  dR_s = sum_r dM_rs L_r e_rs,
                                                 dG += L dL - R dR     (per channel)
    dG from the elementwise factors: dQ*Q + dE*E - dKt*Kt, and at the chunk's last token sum_r dKt*Kt + dS-term;
    dg = reverse cumsum of dG inside the chunk.

Kernels
  gdn2_bwd_kernel_dstate  grid (V blocks, sequences * value heads): the reverse walk; writes dS_C of every chunk and
                          dS_0 of the sequence (the initial-state gradient).
  gdn2_bwd_kernel_dav     grid (chunks, key heads): loops over the value heads of the group and V blocks; writes
                          dv, dw, dT, dAqk and the elementwise parts of dq, dk, db, dG (fp32).
  gdn2_bwd_kernel_dqkg    grid (chunks, key heads, K slices): the pairwise-decay products' backward in 16-row
                          sub-chunks (same boundary trick as the forward), adds them, and the reverse cumsum for dg.
The q/k L2-norm VJP (if fused) is applied on the [TT, H, K] results in PyTorch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gdn2.ops.triton.chunk_fwd import _load_sub, chunk_key_side
from gdn2.ops.triton.utils import CHUNK, half_pipelined, load_rows, tuned

DSTATE_CONFIGS = [
    triton.Config({"BV": 32}, num_warps=4, num_stages=2),
    triton.Config({"BV": 64}, num_warps=4, num_stages=2),
    triton.Config({"BV": 32}, num_warps=4, num_stages=1),
]
DSTATE_INTERPRET = triton.Config({"BV": 32}, num_warps=4, num_stages=1)
DAV_CONFIGS = [triton.Config({"BV": 32}, num_warps=4, num_stages=1), triton.Config({"BV": 64}, num_warps=8, num_stages=1)]


def _dav_fits(config, dtype):
    """fp32 inputs with BV=64 need 311296 B of shared memory (compiled for sm_90, 2026-11-27), over the limit."""
    return dtype != torch.float32 or config.kwargs["BV"] <= 32
DAV_INTERPRET = triton.Config({"BV": 16}, num_warps=4, num_stages=1)
DQKG_CONFIGS = [triton.Config({"BKS": bks}, num_warps=4, num_stages=1) for bks in (16, 32)]
DQKG_INTERPRET = triton.Config({"BKS": 16}, num_warps=4, num_stages=1)


@triton.jit
def _load_T64(ptr, t, eos, stride_t):
    """[64, 64] tile M^T of a per-chunk matrix M stored by rows t: out[i, j] = M[t_j, i]."""
    c64 = tl.arange(0, 64)
    return tl.load(ptr + t[None, :] * stride_t + c64[:, None], mask=(t < eos)[None, :], other=0.).to(tl.float32)


@tuned(DSTATE_CONFIGS, key=["K", "V", "HV", "USE_L2"], interpret_config=DSTATE_INTERPRET, fits=half_pipelined,
       dtype_arg="do")
@triton.jit
def gdn2_bwd_kernel_dstate(q, k, g, b, rq, rk, A, Aqk, do, dht, dh0, dhs, cu_seqlens, chunk_offsets, scale,
                           H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                           BV: tl.constexpr, USE_L2: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr):
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
    q += i_h * K
    k += i_h * K
    g += i_h * K
    b += i_h * K
    rq += i_h
    rk += i_h
    do += i_hv * V
    A += i_h * 64
    Aqk += i_h * 64
    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    c64 = tl.arange(0, 64)
    mkv = (ck < K)[:, None] & (cv < V)[None, :]
    state_off = ck[:, None] * V + cv[None, :]
    dt = do.dtype.element_ty
    if HAS_DHT:
        dS = tl.load(dht + i_nh * K * V + state_off, mask=mkv, other=0.).to(tl.float32)
    else:
        dS = tl.zeros([BK, BV], dtype=tl.float32)
    for j in range(n_chunks):
        i_t = n_chunks - 1 - j
        t = bos + i_t * 64 + c64
        tl.store(dhs + ((first_chunk + i_t) * HV + i_hv) * K * V + state_off, dS.to(dhs.dtype.element_ty), mask=mkv)
        G, G_last, E, Q, Kt, _, _, _ = chunk_key_side(q, k, g, b, rq, rk, t, eos, ck, scale, SK, H, K, USE_L2)
        dOt = load_rows(do, t, eos, SV, cv, V).to(dt)
        At = _load_T64(A, t, eos, H * 64)
        Aqt = _load_T64(Aqk, t, eos, H * 64)
        dR = tl.dot(Aqt.to(dt), dOt) + tl.dot(Kt.to(dt), dS.to(dt))
        dW = tl.dot(At, dR)
        dS = dS * tl.exp(G_last)[:, None] + tl.dot(tl.trans(Q.to(dt)), dOt) - tl.dot(tl.trans(E.to(dt)), dW.to(dt))
    if STORE_DH0:
        tl.store(dh0 + i_nh * K * V + state_off, dS, mask=mkv)


@tuned(DAV_CONFIGS, key=["K", "V", "HV", "USE_L2"], interpret_config=DAV_INTERPRET, fits=_dav_fits)
@triton.jit
def gdn2_bwd_kernel_dav(q, k, v, g, b, w, rq, rk, A, Aqk, hs, dhs, do, dv, dw, dT, dAqk, dq, dk, db, dG,
                        cu_seqlens, chunk_indices, scale,
                        H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                        BV: tl.constexpr, USE_L2: tl.constexpr):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_n = tl.load(chunk_indices + 2 * i_c)
    i_t = tl.load(chunk_indices + 2 * i_c + 1)
    bos = tl.load(cu_seqlens + i_n)
    eos = tl.load(cu_seqlens + i_n + 1)
    t0 = bos + i_t * 64
    last = tl.minimum(eos - t0, 64) - 1
    SK = H * K
    SV = HV * V
    S64 = H * 64
    ck = tl.arange(0, BK)
    c64 = tl.arange(0, 64)
    t = t0 + c64
    mt = t < eos
    koff = i_h * K
    G, G_last, E, Q, Kt, qt, kt, bt = chunk_key_side(q + koff, k + koff, g + koff, b + koff, rq + i_h, rk + i_h,
                                                     t, eos, ck, scale, SK, H, K, USE_L2)
    dt = v.dtype.element_ty
    Am = load_rows(A + i_h * 64, t, eos, S64, c64, 64)
    Aq = load_rows(Aqk + i_h * 64, t, eos, S64, c64, 64)
    Aqt = tl.trans(Aq).to(dt)
    Amt = tl.trans(Am)
    Ed = E.to(dt)
    Ktd = Kt.to(dt)
    dA = tl.zeros([64, 64], dtype=tl.float32)
    dAq = tl.zeros([64, 64], dtype=tl.float32)
    dQ = tl.zeros([64, BK], dtype=tl.float32)
    dE = tl.zeros([64, BK], dtype=tl.float32)
    dKt = tl.zeros([64, BK], dtype=tl.float32)
    dgl = tl.zeros([BK], dtype=tl.float32)
    for j in range(HV // H):
        i_hv = i_h * (HV // H) + j
        for v0 in range(0, V, BV):
            cv = v0 + tl.arange(0, BV)
            mkv = (ck < K)[:, None] & (cv < V)[None, :]
            soff = (i_c * HV + i_hv) * K * V + ck[:, None] * V + cv[None, :]
            S0 = tl.load(hs + soff, mask=mkv, other=0.).to(dt)
            dSC = tl.load(dhs + soff, mask=mkv, other=0.).to(tl.float32)
            voff = i_hv * V
            vt = load_rows(v + voff, t, eos, SV, cv, V)
            wt = load_rows(w + voff, t, eos, SV, cv, V)
            dOt = load_rows(do + voff, t, eos, SV, cv, V).to(dt)
            Wp = wt * vt - tl.dot(Ed, S0)
            R = tl.dot(Am, Wp)
            dR = tl.dot(Aqt, dOt) + tl.dot(Ktd, dSC.to(dt))
            dW = tl.dot(Amt, dR)
            mvo = mt[:, None] & (cv < V)[None, :]
            optr = t[:, None] * SV + voff + cv[None, :]
            tl.store(dv + optr, (dW * wt).to(dv.dtype.element_ty), mask=mvo)
            tl.store(dw + optr, (dW * vt).to(dw.dtype.element_ty), mask=mvo)
            Rd = R.to(dt)
            dA += tl.dot(dR.to(dt), tl.trans(Wp.to(dt)))
            dAq += tl.dot(dOt, tl.trans(Rd))
            S0t = tl.trans(S0)
            dQ += tl.dot(dOt, S0t)
            dE -= tl.dot(dW.to(dt), S0t)
            dKt += tl.dot(Rd, tl.trans(dSC.to(dt)))
            dgl += tl.sum(dSC * S0.to(tl.float32), 1)
    incl = c64[:, None] >= c64[None, :]
    strict = c64[:, None] > c64[None, :]
    dTm = -tl.dot(Amt, tl.dot(dA, Amt, input_precision="ieee"), input_precision="ieee")
    tl.store(dT + t[:, None] * S64 + i_h * 64 + c64[None, :], tl.where(strict, dTm, 0.), mask=mt[:, None])
    tl.store(dAqk + t[:, None] * S64 + i_h * 64 + c64[None, :], tl.where(incl, dAq, 0.), mask=mt[:, None])
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


@triton.jit
def _diag_backward(dTd, dQd, bk, qs, kb, G):
    """Inside one sub-chunk: grads of (b k), (scale q) and k through T_ii and Aqk_ii (dTd, dQd already masked)."""
    r16 = tl.arange(0, 16)
    incl = (r16[:, None] >= r16[None, :])[:, :, None]
    decay = tl.exp(tl.where(incl, G[:, None, :] - G[None, :, :], float("-inf")))
    right = kb[None, :, :] * decay
    d_bk = tl.sum(dTd[:, :, None] * right, 1)
    d_qs = tl.sum(dQd[:, :, None] * right, 1)
    d_k = tl.sum((dTd[:, :, None] * bk[:, None, :] + dQd[:, :, None] * qs[:, None, :]) * decay, 0)
    return d_bk, d_qs, d_k


@triton.jit
def _load16(ptr, t, eos, col0, stride_t):
    c16 = tl.arange(0, 16)
    return tl.load(ptr + t[:, None] * stride_t + col0 + c16[None, :], mask=(t < eos)[:, None], other=0.)


@triton.jit
def _off_backward(dTm, dQm, bk_t, qs_t, lt, ref, kb_j, G_j):
    """Sub-chunk i (rows, bk_t/qs_t already times lt = exp(G_i - ref)) against earlier sub-chunk j (columns).
    Returns (grad of bk_i, grad of qs_i, grad of k_j)."""
    rt = tl.exp(ref[None, :] - G_j)
    right = kb_j * rt
    d_bk = tl.dot(dTm, right) * lt
    d_qs = tl.dot(dQm, right) * lt
    d_k = (tl.dot(tl.trans(dTm), bk_t) + tl.dot(tl.trans(dQm), qs_t)) * rt
    return d_bk, d_qs, d_k


@triton.jit
def _finish_sub(dq, dk, db, dG, t, eos, cols, SK, K: tl.constexpr, d_bk, d_qs, d_k, bk, qs, kb, bb, scale):
    """Add the pairwise-product grads to the elementwise partials; returns (dq, dk, db, dG) tiles."""
    pq = load_rows(dq, t, eos, SK, cols, K) + d_qs * scale
    pk = load_rows(dk, t, eos, SK, cols, K) + d_bk * bb + d_k
    pb = load_rows(db, t, eos, SK, cols, K) + d_bk * kb
    pG = load_rows(dG, t, eos, SK, cols, K) + bk * d_bk + qs * d_qs - kb * d_k
    return pq, pk, pb, pG


@triton.jit
def _store_rows(ptr, x, t, eos, stride_t, cols, n_cols):
    tl.store(ptr + t[:, None] * stride_t + cols[None, :], x, mask=(t < eos)[:, None] & (cols < n_cols)[None, :])


@tuned(DQKG_CONFIGS, key=["K", "USE_L2"], interpret_config=DQKG_INTERPRET, dtype_arg="q")
@triton.jit
def gdn2_bwd_kernel_dqkg(q, k, g, b, rq, rk, dT, dAqk, dq, dk, db, dG, dg, cu_seqlens, chunk_indices, scale,
                         H: tl.constexpr, K: tl.constexpr, BKS: tl.constexpr, USE_L2: tl.constexpr):
    """dq, dk, db are updated in place (elementwise partials in, totals out); dG partials in, dg out."""
    i_c, i_h, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n = tl.load(chunk_indices + 2 * i_c)
    i_t = tl.load(chunk_indices + 2 * i_c + 1)
    bos = tl.load(cu_seqlens + i_n)
    eos = tl.load(cu_seqlens + i_n + 1)
    SK = H * K
    S64 = H * 64
    koff = i_h * K
    q += koff
    k += koff
    g += koff
    b += koff
    dq += koff
    dk += koff
    db += koff
    dG += koff
    dg += koff
    rq += i_h
    rk += i_h
    dT += i_h * 64
    dAqk += i_h * 64
    r16 = tl.arange(0, 16)
    ta = bos + i_t * 64 + r16
    tb = ta + 16
    tc = ta + 32
    td = ta + 48
    cols = i_k * BKS + tl.arange(0, BKS)
    c0 = tl.zeros([BKS], dtype=tl.float32)
    Ga, cb, qa, ka, bka = _load_sub(q, k, g, b, rq, rk, ta, eos, c0, cols, scale, SK, H, K, USE_L2)
    Gb, cc, qb, kb, bkb = _load_sub(q, k, g, b, rq, rk, tb, eos, cb, cols, scale, SK, H, K, USE_L2)
    Gc, cd, qc, kc, bkc = _load_sub(q, k, g, b, rq, rk, tc, eos, cc, cols, scale, SK, H, K, USE_L2)
    Gd, _, qd, kd, bkd = _load_sub(q, k, g, b, rq, rk, td, eos, cd, cols, scale, SK, H, K, USE_L2)
    # diagonal sub-chunks
    dbk_a, dqs_a, dk_a = _diag_backward(_load16(dT, ta, eos, 0, S64), _load16(dAqk, ta, eos, 0, S64), bka, qa, ka, Ga)
    dbk_b, dqs_b, dk_b = _diag_backward(_load16(dT, tb, eos, 16, S64), _load16(dAqk, tb, eos, 16, S64), bkb, qb, kb, Gb)
    dbk_c, dqs_c, dk_c = _diag_backward(_load16(dT, tc, eos, 32, S64), _load16(dAqk, tc, eos, 32, S64), bkc, qc, kc, Gc)
    dbk_d, dqs_d, dk_d = _diag_backward(_load16(dT, td, eos, 48, S64), _load16(dAqk, td, eos, 48, S64), bkd, qd, kd, Gd)
    # off-diagonal sub-chunks (boundary reference = carry before the row sub-chunk)
    lb = tl.exp(Gb - cb[None, :])
    x, y, z = _off_backward(_load16(dT, tb, eos, 0, S64), _load16(dAqk, tb, eos, 0, S64), bkb * lb, qb * lb, lb, cb,
                            ka, Ga)
    dbk_b += x
    dqs_b += y
    dk_a += z
    lc = tl.exp(Gc - cc[None, :])
    x, y, z = _off_backward(_load16(dT, tc, eos, 0, S64), _load16(dAqk, tc, eos, 0, S64), bkc * lc, qc * lc, lc, cc,
                            ka, Ga)
    dbk_c += x
    dqs_c += y
    dk_a += z
    x, y, z = _off_backward(_load16(dT, tc, eos, 16, S64), _load16(dAqk, tc, eos, 16, S64), bkc * lc, qc * lc, lc,
                            cc, kb, Gb)
    dbk_c += x
    dqs_c += y
    dk_b += z
    ld = tl.exp(Gd - cd[None, :])
    x, y, z = _off_backward(_load16(dT, td, eos, 0, S64), _load16(dAqk, td, eos, 0, S64), bkd * ld, qd * ld, ld, cd,
                            ka, Ga)
    dbk_d += x
    dqs_d += y
    dk_a += z
    x, y, z = _off_backward(_load16(dT, td, eos, 16, S64), _load16(dAqk, td, eos, 16, S64), bkd * ld, qd * ld, ld,
                            cd, kb, Gb)
    dbk_d += x
    dqs_d += y
    dk_b += z
    x, y, z = _off_backward(_load16(dT, td, eos, 32, S64), _load16(dAqk, td, eos, 32, S64), bkd * ld, qd * ld, ld,
                            cd, kc, Gc)
    dbk_d += x
    dqs_d += y
    dk_c += z
    ba = load_rows(b, ta, eos, SK, cols, K)
    bb = load_rows(b, tb, eos, SK, cols, K)
    bc = load_rows(b, tc, eos, SK, cols, K)
    bd = load_rows(b, td, eos, SK, cols, K)
    qa_, ka_, ba_, Ga_ = _finish_sub(dq, dk, db, dG, ta, eos, cols, SK, K, dbk_a, dqs_a, dk_a, bka, qa, ka, ba, scale)
    qb_, kb_, bb_, Gb_ = _finish_sub(dq, dk, db, dG, tb, eos, cols, SK, K, dbk_b, dqs_b, dk_b, bkb, qb, kb, bb, scale)
    qc_, kc_, bc_, Gc_ = _finish_sub(dq, dk, db, dG, tc, eos, cols, SK, K, dbk_c, dqs_c, dk_c, bkc, qc, kc, bc, scale)
    qd_, kd_, bd_, Gd_ = _finish_sub(dq, dk, db, dG, td, eos, cols, SK, K, dbk_d, dqs_d, dk_d, bkd, qd, kd, bd, scale)
    # dg_i = sum_{r >= i} dG_r inside the chunk
    sd = tl.sum(Gd_, 0)
    sc = sd + tl.sum(Gc_, 0)
    sb = sc + tl.sum(Gb_, 0)
    _store_rows(dg, tl.cumsum(Gd_, 0, reverse=True), td, eos, SK, cols, K)
    _store_rows(dg, tl.cumsum(Gc_, 0, reverse=True) + sd[None, :], tc, eos, SK, cols, K)
    _store_rows(dg, tl.cumsum(Gb_, 0, reverse=True) + sc[None, :], tb, eos, SK, cols, K)
    _store_rows(dg, tl.cumsum(Ga_, 0, reverse=True) + sb[None, :], ta, eos, SK, cols, K)
    _store_rows(dq, qa_, ta, eos, SK, cols, K)
    _store_rows(dq, qb_, tb, eos, SK, cols, K)
    _store_rows(dq, qc_, tc, eos, SK, cols, K)
    _store_rows(dq, qd_, td, eos, SK, cols, K)
    _store_rows(dk, ka_, ta, eos, SK, cols, K)
    _store_rows(dk, kb_, tb, eos, SK, cols, K)
    _store_rows(dk, kc_, tc, eos, SK, cols, K)
    _store_rows(dk, kd_, td, eos, SK, cols, K)
    _store_rows(db, ba_, ta, eos, SK, cols, K)
    _store_rows(db, bb_, tb, eos, SK, cols, K)
    _store_rows(db, bc_, tc, eos, SK, cols, K)
    _store_rows(db, bd_, td, eos, SK, cols, K)


def chunk_backward(q, k, v, g, b, w, rq, rk, A, Aqk, hs, h0, do, dht, scale, layout, use_l2):
    """Returns dq, dk, db, dg ([TT, H, K] fp32, before the L2-norm VJP), dv, dw ([TT, Hv, V]), dh0 or None."""
    cu, chunk_indices, chunk_offsets, n_chunks = layout
    n_seqs = cu.numel() - 1
    TT, H, K = q.shape
    HV, V = v.shape[1], v.shape[2]
    BK = triton.next_power_of_2(K)
    dev = q.device
    dhs = torch.empty(n_chunks, HV, K, V, device=dev, dtype=hs.dtype)
    dh0 = torch.empty(n_seqs, HV, K, V, device=dev, dtype=torch.float32) if h0 is not None else None
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), n_seqs * HV)
    gdn2_bwd_kernel_dstate[grid](q, k, g, b, rq, rk, A, Aqk, do, dht, dh0, dhs, cu, chunk_offsets, scale,
                                 H=H, HV=HV, K=K, V=V, BK=BK, USE_L2=use_l2, HAS_DHT=dht is not None,
                                 STORE_DH0=h0 is not None)
    dv = torch.empty_like(v)
    dw = torch.empty_like(w)
    dT = torch.empty(TT, H, CHUNK, device=dev, dtype=torch.float32)
    dAqk = torch.empty_like(dT)
    dq, dk, db, dG, dg = (torch.empty(TT, H, K, device=dev, dtype=torch.float32) for _ in range(5))
    gdn2_bwd_kernel_dav[(n_chunks, H)](q, k, v, g, b, w, rq, rk, A, Aqk, hs, dhs, do, dv, dw, dT, dAqk,
                                       dq, dk, db, dG, cu, chunk_indices, scale,
                                       H=H, HV=HV, K=K, V=V, BK=BK, USE_L2=use_l2)
    grid = lambda meta: (n_chunks, H, triton.cdiv(K, meta["BKS"]))
    gdn2_bwd_kernel_dqkg[grid](q, k, g, b, rq, rk, dT, dAqk, dq, dk, db, dG, dg, cu, chunk_indices, scale,
                               H=H, K=K, USE_L2=use_l2)
    return dq, dk, db, dg, dv, dw, dh0
