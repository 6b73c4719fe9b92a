r"""The state kernel: the forward's only sequential kernel, one walk over the chunks of each sequence.

Per chunk, with Y, U, Q, Kt, exp(G_C) from the wy kernel (fwd_wy.py) and S_0 the state entering the chunk:
    R   = U - Y S_0
    O   = Q S_0 + Aqk R                        (FUSE_OUTPUT; else the output kernel, fwd_output.py)
    S_C = Diag(exp G_C) S_0 + Kt^T R
  gdn2_fwd_kernel_state  grid (V blocks, sequences * value heads). Per chunk: stores the entering state S_0 and R
                         (STORE_STATES: for the output kernel and the backward), R = U - Y S_0 (K/BK products
                         [64, BK] x [BK, BV]), S <- Diag(exp G_C) S + Kt^T R (K/BK products [BK, 64] x [64, BV]).
                         The state [K, BV] lives in fp32 registers as up to four [BK, BV] blocks (K <= 256).
                         APPLY_A: R = A (w v - E S_0), one more [64, 64] x [64, BV] product per step.
The per-chunk states (NC x Hv x K x V in v's dtype: 0.27 GB at B=8, T=4096, H=16, K=V=128, bf16) are written only
where the output kernel or the backward reads them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gdn2.ops.triton.tiles import (
    decayed_plus,
    key_block_dot,
    load_state_blocks,
    store_state_block,
    store_state_blocks,
    store_tile,
    tile,
)
from gdn2.ops.triton.utils import SERIAL_PRECISION, block_sizes, tuned

# BV is the V slice per program (B*Hv*V/BV programs walk the sequences); BV=16 is for few sequences x heads (B=1,
# H=16: 128 programs at V=128). The autotune key includes log2(sequences * value heads), so B=1 and B=8 tune
# separately; the first entry is the default without autotuning. Entries that measured slower at every shape are
# left out (docs/kernels.md#launch-configs).
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


def state_fits(config, dtype, K, fuse_output=False, store_states=True, apply_a=False) -> bool:
    """Whether the fwd state kernel's sm_90 build stays within 232,448 B of shared memory (measured with
    benchmarks/compile_check_sm90.py; fp32 operand tiles need about twice bf16's).
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
    none (plan_forward never asks for it there). Pruned further on the H100: bf16 with BV=32 at 4 warps, 2 stages
    ran into an illegal memory access with apply_a, BV=16 at 4 warps was never run there, so apply_a keeps BV=64 at 4
    warps and BV=32 at 2 warps (docs/kernels.md#launch-configs)."""
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
    FUSE_OUTPUT: computes O = Q S_0 + Aqk R in the walk (ForwardPlan.output_in_state). The inference forward sets
    exactly one of the two; the training forward sets STORE_STATES, and FUSE_OUTPUT where the plan says so.
    APPLY_A (inference, with the wy kernel's APPLY_A): Y holds E, U holds v, and the walk forms
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
