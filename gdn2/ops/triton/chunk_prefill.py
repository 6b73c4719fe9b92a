r"""GDN-2 prefill walk: the inference forward's WY side and its sequential walk in one kernel.

After the intra kernels (chunk_fwd.intra_forward: A = (I + T)^-1 and Aqk per chunk and key head), per chunk of 64
rows (r), per key block of BK channels, elementwise over the channels (chunk_fwd.py's docstring has the derivation):

    G = cumsum_r g,  E = e^G b k,  Q = scale e^G q,  Kt = e^(G_C - G) k        (G_C: G at the chunk's last row)
    Y = A E,  U = A (w v)
    R = U - Y S_0,   O = Q S_0 + Aqk R,   S_C = Diag(e^G_C) S_0 + Kt^T R

This is chunk_fwd's wy kernel followed by its state kernel (output inside the walk), with Y, Q, Kt, U and e^G_C
kept in registers instead of written to memory and read back: per token and head, 4 K-wide and 1 V-wide tiles in
v's dtype that the split path writes once and reads (V / BV times, from L2) again. What it pays: the WY side does not
depend on the state, yet each of the V / BV programs of a value head computes it again (one [64, 64] x [64, BK]
product per key block and the elementwise exponentials), inside the step. Inference only: nothing a backward
would need is kept. K <= 128 (two [BK, BV] state blocks at most).

Products: Y = A E and U = A Z with fp32 operands at SERIAL_PRECISION, as the wy kernel; the walk's products in v's
dtype, as the state kernel (Y, Q, Kt, R and S_0 rounded to it). U stays fp32 (the wy kernel stores it in v's dtype).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gdn2.ops.triton.chunk_fwd import (block_sizes, chunk_key_side, intra_forward, key_head_inputs,
                                       load_state_blocks, store_state_blocks, tile)
from gdn2.ops.triton.utils import SERIAL_PRECISION, tuned

# One program per (V block, sequence x value head), as the state kernel. Not yet timed on a GPU: the first entry
# is the default without autotuning. sm_90 builds (benchmarks/compile_check_sm90.py, K = 128, 2026-11-27): every
# entry takes 255 registers and spills (16-92 B per thread at BV <= 32 and 4 warps, 500-1,128 B at BV >= 64).
PREFILL_CONFIGS = [triton.Config({"BV": bv}, num_warps=w, num_stages=st)
                   for bv, w, st in ((32, 4, 2), (32, 4, 1), (64, 4, 1), (16, 4, 1), (64, 8, 1), (128, 8, 1),
                                     (128, 8, 2))]
PREFILL_INTERPRET = triton.Config({"BV": 16}, num_warps=4, num_stages=1)
MAX_K = 128


def prefill_fits(config, dtype, K) -> bool:
    """Up to K = 128 (the kernel's limit): 16-bit inputs every entry (largest shared memory: BV=128, 8 warps,
    2 stages, 205,312 B), fp32 one stage only (2 stages: 262,656-393,728 B; one: <= 131,072 B); measured with
    benchmarks/compile_check_sm90.py, 2026-11-27."""
    if K is None:
        return True
    return K <= MAX_K and (dtype != torch.float32 or config.num_stages == 1)


@triton.jit
def wy_block(q, k, g, b, rq, rk, Am, t, eos, k0, scale, SK, H, K: tl.constexpr, BK: tl.constexpr,
             USE_L2: tl.constexpr, PREC: tl.constexpr, dt: tl.constexpr):
    """Key channels k0 .. k0 + BK of one chunk (rows t): Y = A E, Q ([64, BK]), Kt^T ([BK, 64]), all in dt, and
    e^G_C [BK] fp32."""
    cols = k0 + tl.arange(0, BK)
    _, G_last, E, Q, Kt, _, _, _ = chunk_key_side(q, k, g, b, rq, rk, t, eos, cols, scale, SK, H, K, USE_L2)
    return tl.dot(Am, E, input_precision=PREC).to(dt), Q.to(dt), tl.trans(Kt.to(dt)), tl.exp(G_last)


@tuned(PREFILL_CONFIGS, key=["K", "V", "HV", "NSH_LOG2", "HAS_H0", "STORE_FINAL", "USE_L2", "PREC"],
       interpret_config=PREFILL_INTERPRET, fits=prefill_fits, dtype_arg="v")
@triton.jit
def gdn2_fwd_kernel_prefill(q, k, v, g, b, w, rq, rk, A, Aqk, h0, ht, o, cu_seqlens, chunk_offsets, scale, NSH_LOG2,
                            H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                            BV: tl.constexpr, HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr,
                            USE_L2: tl.constexpr, PREC: tl.constexpr):
    """Grid (V / BV, sequences x value heads). o [TT, Hv, V] in v's dtype; ht [N, Hv, K, V] fp32 if STORE_FINAL.
    The state [K, BV] lives in fp32 registers as one or two [BK, BV] blocks (K <= 2 BK = 128)."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n = i_nh // HV
    i_hv = i_nh % HV
    i_h = i_hv // (HV // H)
    bos = tl.load(cu_seqlens + i_n)
    eos = tl.load(cu_seqlens + i_n + 1)
    n_chunks = (eos - bos + 63) // 64
    SK = H * K
    SV = HV * V
    q, k, g, b, rq, rk = key_head_inputs(q, k, g, b, rq, rk, i_h, K)
    A += i_h * 64
    Aqk += i_h * 64
    v += i_hv * V
    w += i_hv * V
    o += i_hv * V
    v0 = i_v * BV
    cv = v0 + tl.arange(0, BV)
    c64 = tl.arange(0, 64)
    dt = v.dtype.element_ty
    S1 = tl.zeros([BK, BV], dtype=tl.float32)
    S2 = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        S1, S2, _, _ = load_state_blocks(h0 + i_nh * K * V, cv, K, V, BK, BV)
    for i_t in range(n_chunks):
        t = bos + i_t * 64 + c64
        Am = tile(A, t, eos, H * 64, 0, 64, 64).to(tl.float32)
        Z = tile(w, t, eos, SV, v0, V, BV).to(tl.float32) * tile(v, t, eos, SV, v0, V, BV).to(tl.float32)
        Rb = tl.dot(Am, Z, input_precision=PREC)                                   # U, then R = U - Y S_0
        Y1, Q1, KtT1, gam1 = wy_block(q, k, g, b, rq, rk, Am, t, eos, 0, scale, SK, H, K, BK, USE_L2, PREC, dt)
        S1d = S1.to(dt)
        Rb -= tl.dot(Y1, S1d, input_precision=PREC)
        out = tl.dot(Q1, S1d, input_precision=PREC)
        if K > BK:
            Y2, Q2, KtT2, gam2 = wy_block(q, k, g, b, rq, rk, Am, t, eos, BK, scale, SK, H, K, BK, USE_L2, PREC, dt)
            S2d = S2.to(dt)
            Rb -= tl.dot(Y2, S2d, input_precision=PREC)
            out += tl.dot(Q2, S2d, input_precision=PREC)
        Rd = Rb.to(dt)
        S1 = S1 * gam1[:, None] + tl.dot(KtT1, Rd, input_precision=PREC)
        if K > BK:
            S2 = S2 * gam2[:, None] + tl.dot(KtT2, Rd, input_precision=PREC)
        out += tl.dot(tile(Aqk, t, eos, H * 64, 0, 64, 64).to(dt), Rd, input_precision=PREC)
        tl.store(o + t[:, None] * SV + cv[None, :], out.to(dt), mask=(t < eos)[:, None] & (cv < V)[None, :])
    if STORE_FINAL:
        store_state_blocks(ht + i_nh * K * V, S1, S2, S2, S2, cv, K, V, BK)      # K <= 2 BK: S1, S2 only


def prefill_forward(q, k, v, g, b, w, rq, rk, h0, scale, layout, use_l2, output_final_state):
    """Inference forward, WY side inside the walk: o [TT, Hv, V] and the final state [N, Hv, K, V] fp32 (or None).
    q, k, g, b [TT, H, K] with K <= 128; v, w [TT, Hv, V]; layout from utils.sequence_layout."""
    TT, H, K = q.shape
    if K > MAX_K:
        raise ValueError(f"the prefill walk holds the state as two [64, BV] blocks, so K <= {MAX_K}; got K = {K}. "
                         f"Unset GDN2_TRITON_PREFILL (or set it to 0) for the split path, which takes K up to 256")
    HV, V = v.shape[1], v.shape[2]
    cu, chunk_indices, chunk_offsets, n_chunks = layout
    n_seqs = cu.numel() - 1
    BK, _ = block_sizes(K, V)
    A, Aqk, _ = intra_forward(q, k, g, b, rq, rk, scale, cu, chunk_indices, n_chunks, use_l2)
    o = torch.empty_like(v)
    ht = torch.empty(n_seqs, HV, K, V, device=v.device, dtype=torch.float32) if output_final_state else None
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), n_seqs * HV)
    gdn2_fwd_kernel_prefill[grid](q, k, v, g, b, w, rq, rk, A, Aqk, h0, ht, o, cu, chunk_offsets, scale,
                                  (n_seqs * HV).bit_length(), H=H, HV=HV, K=K, V=V, BK=BK,
                                  HAS_H0=h0 is not None, STORE_FINAL=output_final_state, USE_L2=use_l2,
                                  PREC=SERIAL_PRECISION)
    return o, ht
