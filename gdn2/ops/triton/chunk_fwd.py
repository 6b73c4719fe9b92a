r"""GDN-2 chunkwise forward kernels (WY form, decay absorbed into asymmetric erase factors).

Per chunk of C = 64 tokens (rows r, s = 0..63), per head, elementwise over the K key channels:

    G_r = sum_{i<=r} g_i                     (chunk-local inclusive cumsum, fp32)
    T_rs   = sum_d b_rd k_rd k_sd exp(G_rd - G_sd)            s <  r      A = (I + T)^-1  (fp32)
    Aqk_rs = scale sum_d q_rd k_sd exp(G_rd - G_sd)           s <= r
    E_r = exp(G_r) b_r k_r,  Z_r = w_r v_r,  Q_r = scale exp(G_r) q_r,  Kt_r = exp(G_C - G_r) k_r
    R   = A (Z - E S_0)              (= U - Y S_0 with U = A Z, Y = A E: one inverse serves both)
    O   = Q S_0 + Aqk R
    S_C = Diag(exp G_C) S_0 + Kt^T R

Exponents are differences. Inside a 16-row sub-chunk the pairs (r, s) are formed explicitly, exp(G_r - G_s) with
s > r masked to -inf. Between sub-chunks i > j the product is split at the boundary G_ref = G at the last row of
sub-chunk i-1: exp(G_r - G_ref) * exp(G_ref - G_s), both factors <= 1 because G never increases (g <= 0), so
nothing can overflow; it is the same number as exp(G_r - G_s) up to rounding (never gamma_r * (1 / gamma_s)).

Kernels
  gdn2_fwd_kernel_intra       grid (chunks, key heads): T and Aqk, the fp32 solve; writes A [TT, H, 64] fp32 and
                              Aqk [TT, H, 64]. Both depend on key-head inputs only, so grouped value heads share them.
  gdn2_fwd_kernel_recurrence  grid (V blocks, sequences * value heads): walks the chunks of one sequence carrying
                              S [K, BV] in fp32 registers; writes O, optionally every chunk's entering state
                              (training: the backward needs them) and the final state.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gdn2.ops.triton.utils import CHUNK, half_pipelined, load_rows, load_scale, tuned, unit_lower_inverse16

# Intra kernel: BKS is the K slice held at once (the [16, 16, BKS] pairwise tile sets register pressure).
# (num_warps=2 variants compiled 2-3x slower for no expected gain; dropped to keep the autotuner's compile time short.)
INTRA_CONFIGS = [triton.Config({"BKS": bks}, num_warps=4, num_stages=1) for bks in (16, 32)]
INTRA_INTERPRET = triton.Config({"BKS": 16}, num_warps=4, num_stages=1)

# 16-bit inputs: the num_stages=2 entries; fp32 inputs: the num_stages=1 entry (see utils.half_pipelined).
RECURRENCE_CONFIGS = [
    triton.Config({"BV": 32}, num_warps=4, num_stages=2),
    triton.Config({"BV": 64}, num_warps=4, num_stages=2),
    triton.Config({"BV": 32}, num_warps=4, num_stages=1),
]
RECURRENCE_INTERPRET = triton.Config({"BV": 32}, num_warps=4, num_stages=1)


@triton.jit
def _load_sub(q, k, g, b, rq, rk, t, eos, carry, cols, scale, SK, SH, K: tl.constexpr, USE_L2: tl.constexpr):
    """One 16-row sub-chunk, one K slice: G (cumsum continued from `carry`), scale*q, k, b*k, and the new carry."""
    gb = load_rows(g, t, eos, SK, cols, K)
    G = tl.cumsum(gb, 0) + carry[None, :]
    kb = load_rows(k, t, eos, SK, cols, K)
    qb = load_rows(q, t, eos, SK, cols, K)
    if USE_L2:
        kb = kb * load_scale(rk, t, eos, SH)[:, None]
        qb = qb * load_scale(rq, t, eos, SH)[:, None]
    bk = load_rows(b, t, eos, SK, cols, K) * kb
    return G, carry + tl.sum(gb, 0), qb * scale, kb, bk


@triton.jit
def _diag_products(bk, qs, kb, G):
    """Inside one sub-chunk: (sum_d bk_r k_s e_rs, sum_d qs_r k_s e_rs) for s <= r, e_rs = exp(G_r - G_s)."""
    r16 = tl.arange(0, 16)
    incl = (r16[:, None] >= r16[None, :])[:, :, None]
    decay = tl.exp(tl.where(incl, G[:, None, :] - G[None, :, :], float("-inf")))
    right = kb[None, :, :] * decay
    return tl.sum(bk[:, None, :] * right, 2), tl.sum(qs[:, None, :] * right, 2)


@triton.jit
def _off_products(bk_t, qs_t, ref, kb_j, G_j):
    """Rows of sub-chunk i (already times exp(G_i - ref)) against columns of an earlier sub-chunk j."""
    right = kb_j * tl.exp(ref[None, :] - G_j)
    return (tl.dot(bk_t, tl.trans(right), input_precision="ieee"),
            tl.dot(qs_t, tl.trans(right), input_precision="ieee"))


@triton.jit
def _store16(ptr, blk, t, eos, col0, stride_t):
    c16 = tl.arange(0, 16)
    tl.store(ptr + t[:, None] * stride_t + col0 + c16[None, :], blk.to(ptr.dtype.element_ty),
             mask=(t < eos)[:, None])


@tuned(INTRA_CONFIGS, key=["K", "USE_L2"], interpret_config=INTRA_INTERPRET, dtype_arg="q")
@triton.jit
def gdn2_fwd_kernel_intra(q, k, g, b, rq, rk, A, Aqk, cu_seqlens, chunk_indices, scale,
                          H: tl.constexpr, K: tl.constexpr, BKS: tl.constexpr, USE_L2: tl.constexpr):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_n = tl.load(chunk_indices + 2 * i_c)
    i_t = tl.load(chunk_indices + 2 * i_c + 1)
    bos = tl.load(cu_seqlens + i_n)
    eos = tl.load(cu_seqlens + i_n + 1)
    SK = H * K
    q += i_h * K
    k += i_h * K
    g += i_h * K
    b += i_h * K
    rq += i_h
    rk += i_h
    r16 = tl.arange(0, 16)
    ta = bos + i_t * 64 + r16
    tb = ta + 16
    tc = ta + 32
    td = ta + 48
    z = tl.zeros([16, 16], dtype=tl.float32)
    Taa, Tbb, Tcc, Tdd, Tba, Tca, Tcb, Tda, Tdb, Tdc = z, z, z, z, z, z, z, z, z, z
    Qaa, Qbb, Qcc, Qdd, Qba, Qca, Qcb, Qda, Qdb, Qdc = z, z, z, z, z, z, z, z, z, z
    for k0 in range(0, K, BKS):
        cols = k0 + tl.arange(0, BKS)
        c0 = tl.zeros([BKS], dtype=tl.float32)
        Ga, cb, qa, ka, bka = _load_sub(q, k, g, b, rq, rk, ta, eos, c0, cols, scale, SK, H, K, USE_L2)
        Gb, cc, qb, kb, bkb = _load_sub(q, k, g, b, rq, rk, tb, eos, cb, cols, scale, SK, H, K, USE_L2)
        Gc, cd, qc, kc, bkc = _load_sub(q, k, g, b, rq, rk, tc, eos, cc, cols, scale, SK, H, K, USE_L2)
        Gd, _, qd, kd, bkd = _load_sub(q, k, g, b, rq, rk, td, eos, cd, cols, scale, SK, H, K, USE_L2)
        x, y = _diag_products(bka, qa, ka, Ga)
        Taa += x
        Qaa += y
        x, y = _diag_products(bkb, qb, kb, Gb)
        Tbb += x
        Qbb += y
        x, y = _diag_products(bkc, qc, kc, Gc)
        Tcc += x
        Qcc += y
        x, y = _diag_products(bkd, qd, kd, Gd)
        Tdd += x
        Qdd += y
        # sub-chunk b against a, reference G at the last row of a (= carry cb)
        lb = tl.exp(Gb - cb[None, :])
        x, y = _off_products(bkb * lb, qb * lb, cb, ka, Ga)
        Tba += x
        Qba += y
        lc = tl.exp(Gc - cc[None, :])
        x, y = _off_products(bkc * lc, qc * lc, cc, ka, Ga)
        Tca += x
        Qca += y
        x, y = _off_products(bkc * lc, qc * lc, cc, kb, Gb)
        Tcb += x
        Qcb += y
        ld = tl.exp(Gd - cd[None, :])
        x, y = _off_products(bkd * ld, qd * ld, cd, ka, Ga)
        Tda += x
        Qda += y
        x, y = _off_products(bkd * ld, qd * ld, cd, kb, Gb)
        Tdb += x
        Qdb += y
        x, y = _off_products(bkd * ld, qd * ld, cd, kc, Gc)
        Tdc += x
        Qdc += y
    strict = r16[:, None] > r16[None, :]
    # diagonal blocks of A = (I + T)^-1 by forward substitution, then the block recursion
    #   A_ij = -A_ii sum_{j <= m < i} T_im A_mj         (all fp32, IEEE products)
    Aaa = unit_lower_inverse16(tl.where(strict, Taa, 0.))
    Abb = unit_lower_inverse16(tl.where(strict, Tbb, 0.))
    Acc = unit_lower_inverse16(tl.where(strict, Tcc, 0.))
    Add = unit_lower_inverse16(tl.where(strict, Tdd, 0.))
    Aba = -tl.dot(Abb, tl.dot(Tba, Aaa, input_precision="ieee"), input_precision="ieee")
    Acb = -tl.dot(Acc, tl.dot(Tcb, Abb, input_precision="ieee"), input_precision="ieee")
    Aca = -tl.dot(Acc, tl.dot(Tca, Aaa, input_precision="ieee") + tl.dot(Tcb, Aba, input_precision="ieee"),
                  input_precision="ieee")
    Adc = -tl.dot(Add, tl.dot(Tdc, Acc, input_precision="ieee"), input_precision="ieee")
    Adb = -tl.dot(Add, tl.dot(Tdb, Abb, input_precision="ieee") + tl.dot(Tdc, Acb, input_precision="ieee"),
                  input_precision="ieee")
    Ada = -tl.dot(Add, tl.dot(Tda, Aaa, input_precision="ieee") + tl.dot(Tdb, Aba, input_precision="ieee")
                  + tl.dot(Tdc, Aca, input_precision="ieee"), input_precision="ieee")
    A += i_h * 64
    Aqk += i_h * 64
    S64 = H * 64
    incl = r16[:, None] >= r16[None, :]
    _store16(A, Aaa, ta, eos, 0, S64)
    _store16(A, z, ta, eos, 16, S64)
    _store16(A, z, ta, eos, 32, S64)
    _store16(A, z, ta, eos, 48, S64)
    _store16(A, Aba, tb, eos, 0, S64)
    _store16(A, Abb, tb, eos, 16, S64)
    _store16(A, z, tb, eos, 32, S64)
    _store16(A, z, tb, eos, 48, S64)
    _store16(A, Aca, tc, eos, 0, S64)
    _store16(A, Acb, tc, eos, 16, S64)
    _store16(A, Acc, tc, eos, 32, S64)
    _store16(A, z, tc, eos, 48, S64)
    _store16(A, Ada, td, eos, 0, S64)
    _store16(A, Adb, td, eos, 16, S64)
    _store16(A, Adc, td, eos, 32, S64)
    _store16(A, Add, td, eos, 48, S64)
    _store16(Aqk, tl.where(incl, Qaa, 0.), ta, eos, 0, S64)
    _store16(Aqk, z, ta, eos, 16, S64)
    _store16(Aqk, z, ta, eos, 32, S64)
    _store16(Aqk, z, ta, eos, 48, S64)
    _store16(Aqk, Qba, tb, eos, 0, S64)
    _store16(Aqk, tl.where(incl, Qbb, 0.), tb, eos, 16, S64)
    _store16(Aqk, z, tb, eos, 32, S64)
    _store16(Aqk, z, tb, eos, 48, S64)
    _store16(Aqk, Qca, tc, eos, 0, S64)
    _store16(Aqk, Qcb, tc, eos, 16, S64)
    _store16(Aqk, tl.where(incl, Qcc, 0.), tc, eos, 32, S64)
    _store16(Aqk, z, tc, eos, 48, S64)
    _store16(Aqk, Qda, td, eos, 0, S64)
    _store16(Aqk, Qdb, td, eos, 16, S64)
    _store16(Aqk, Qdc, td, eos, 32, S64)
    _store16(Aqk, tl.where(incl, Qdd, 0.), td, eos, 48, S64)


@triton.jit
def chunk_key_side(q, k, g, b, rq, rk, t, eos, cols, scale, SK, SH, K: tl.constexpr, USE_L2: tl.constexpr):
    """Full-K tiles of one chunk: G [64, BK], decay exp(G_C) [BK], E = e^G b k, Q = scale e^G q, Kt = e^(G_C-G) k."""
    gt = load_rows(g, t, eos, SK, cols, K)
    G = tl.cumsum(gt, 0)
    G_last = tl.sum(gt, 0)
    kt = load_rows(k, t, eos, SK, cols, K)
    qt = load_rows(q, t, eos, SK, cols, K)
    if USE_L2:
        kt = kt * load_scale(rk, t, eos, SH)[:, None]
        qt = qt * load_scale(rq, t, eos, SH)[:, None]
    bt = load_rows(b, t, eos, SK, cols, K)
    gamma = tl.exp(G)
    E = gamma * bt * kt
    Q = gamma * qt * scale
    Kt = tl.exp(G_last[None, :] - G) * kt
    return G, G_last, E, Q, Kt, qt, kt, bt


@tuned(RECURRENCE_CONFIGS, key=["K", "V", "HV", "USE_L2", "STORE_STATES"], interpret_config=RECURRENCE_INTERPRET,
       fits=half_pipelined)
@triton.jit
def gdn2_fwd_kernel_recurrence(q, k, v, g, b, w, rq, rk, A, Aqk, h0, o, ht, hs, cu_seqlens, chunk_offsets, scale,
                               H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                               BK: tl.constexpr, BV: tl.constexpr, USE_L2: tl.constexpr, HAS_H0: tl.constexpr,
                               STORE_FINAL: tl.constexpr, STORE_STATES: tl.constexpr):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n = i_nh // HV
    i_hv = i_nh % HV
    i_h = i_hv // (HV // H)
    bos = tl.load(cu_seqlens + i_n)
    eos = tl.load(cu_seqlens + i_n + 1)
    n_chunks = (eos - bos + 63) // 64
    SK = H * K
    SV = HV * V
    q += i_h * K
    k += i_h * K
    g += i_h * K
    b += i_h * K
    rq += i_h
    rk += i_h
    v += i_hv * V
    w += i_hv * V
    o += i_hv * V
    A += i_h * 64
    Aqk += i_h * 64
    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    c64 = tl.arange(0, 64)
    mkv = (ck < K)[:, None] & (cv < V)[None, :]
    state_off = ck[:, None] * V + cv[None, :]
    dt = v.dtype.element_ty
    if HAS_H0:
        S = tl.load(h0 + i_nh * K * V + state_off, mask=mkv, other=0.).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    for i_t in range(n_chunks):
        t = bos + i_t * 64 + c64
        if STORE_STATES:
            i_c = tl.load(chunk_offsets + i_n) + i_t
            tl.store(hs + (i_c * HV + i_hv) * K * V + state_off, S.to(hs.dtype.element_ty), mask=mkv)
        G, G_last, E, Q, Kt, _, _, _ = chunk_key_side(q, k, g, b, rq, rk, t, eos, ck, scale, SK, H, K, USE_L2)
        vt = load_rows(v, t, eos, SV, cv, V)
        wt = load_rows(w, t, eos, SV, cv, V)
        Sd = S.to(dt)
        Wp = wt * vt - tl.dot(E.to(dt), Sd)                                    # Z - E S_0
        At = load_rows(A, t, eos, H * 64, c64, 64)
        R = tl.dot(At, Wp)                                                      # A (Z - E S_0), fp32/tf32
        Aq = load_rows(Aqk, t, eos, H * 64, c64, 64)
        Rd = R.to(dt)
        out = tl.dot(Q.to(dt), Sd) + tl.dot(Aq.to(dt), Rd)
        tl.store(o + t[:, None] * SV + cv[None, :], out.to(o.dtype.element_ty),
                 mask=(t < eos)[:, None] & (cv < V)[None, :])
        S = S * tl.exp(G_last)[:, None] + tl.dot(tl.trans(Kt.to(dt)), Rd)
    if STORE_FINAL:
        tl.store(ht + i_nh * K * V + state_off, S, mask=mkv)


def intra_forward(q, k, g, b, rq, rk, scale, cu, chunk_indices, n_chunks, use_l2):
    """A (fp32) and Aqk (q's dtype) per key head: [TT, H, 64] each."""
    TT, H, K = q.shape
    A = torch.empty(TT, H, CHUNK, device=q.device, dtype=torch.float32)
    Aqk = torch.empty(TT, H, CHUNK, device=q.device, dtype=torch.float32 if q.dtype == torch.float32 else q.dtype)
    gdn2_fwd_kernel_intra[(n_chunks, H)](q, k, g, b, rq, rk, A, Aqk, cu, chunk_indices, scale,
                                         H=H, K=K, USE_L2=use_l2)
    return A, Aqk


def recurrence_forward(q, k, v, g, b, w, rq, rk, A, Aqk, h0, scale, cu, chunk_offsets, n_chunks, n_seqs,
                       use_l2, store_final, store_states):
    """Runs the chunk recurrence; returns o [TT, Hv, V], final state [N, Hv, K, V] fp32 or None, per-chunk entering
    states [NC, Hv, K, V] (v's dtype) or None."""
    TT, H, K = q.shape
    HV, V = v.shape[1], v.shape[2]
    o = torch.empty_like(v)
    ht = torch.empty(n_seqs, HV, K, V, device=q.device, dtype=torch.float32) if store_final else None
    hs = torch.empty(n_chunks, HV, K, V, device=q.device, dtype=v.dtype) if store_states else None
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), n_seqs * HV)
    gdn2_fwd_kernel_recurrence[grid](q, k, v, g, b, w, rq, rk, A, Aqk, h0, o, ht, hs, cu, chunk_offsets, scale,
                                     H=H, HV=HV, K=K, V=V, BK=triton.next_power_of_2(K), USE_L2=use_l2,
                                     HAS_H0=h0 is not None, STORE_FINAL=store_final, STORE_STATES=store_states)
    return o, ht, hs
