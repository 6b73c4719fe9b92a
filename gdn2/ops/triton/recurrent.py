r"""GDN-2 fused recurrent decode step: a batch of fp32 states advanced IN PLACE by one or a few tokens, one launch.

Per token, per value head (key head i_hv // (Hv // H)), state S [K, V] (rows = key channels):
    S <- Diag(exp g) S;   r = S^T (b * k);   S <- S + k (w * v - r)^T;   o = scale * S^T q
with q, k optionally L2-normalised in the kernel (eps 1e-6 inside the rsqrt). Each program owns the whole K axis and
a BV-wide slice of V (the update is independent across value columns), keeps it in registers over the T tokens and
writes it back once. No host work beyond the launch (no syncs, no allocations but o): CUDA-graph friendly.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gdn2.ops.triton.utils import INTERPRET, L2NORM_EPS

# (BV, num_warps) candidates; the launch picks one by a size rule (no autotuning: the state is updated in place, and a
# tuner would run the update several times). benchmarks/check_kernels_gpu.py runs every entry.
DECODE_CONFIGS = [(16, 1), (16, 2), (32, 2), (32, 4), (64, 4)]
DECODE_INTERPRET = (16, 1)


def decode_config(batch: int, num_v_heads: int, v_dim: int) -> tuple[int, int]:
    if INTERPRET:
        return DECODE_INTERPRET
    # Enough programs to cover the 132 SMs a few times over, then wider slices (fewer, longer rows of loads).
    if batch * num_v_heads * triton.cdiv(v_dim, 16) <= 4 * 132:
        return (16, 1)
    if batch * num_v_heads * triton.cdiv(v_dim, 32) <= 16 * 132:
        return (32, 2)
    return (64, 4)


@triton.jit
def gdn2_fwd_kernel_recurrent_step(q, k, v, g, b, w, state, o, scale, T,
                                   H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                                   BK: tl.constexpr, BV: tl.constexpr, USE_L2: tl.constexpr, EPS: tl.constexpr):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b = i_bh // HV
    i_hv = i_bh % HV
    i_h = i_hv // (HV // H)
    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    mk = ck < K
    mv = cv < V
    s_ptr = state + i_bh * K * V + ck[:, None] * V + cv[None, :]
    S = tl.load(s_ptr, mask=mk[:, None] & mv[None, :], other=0.)
    for t in range(T):
        koff = ((i_b * T + t) * H + i_h) * K
        voff = ((i_b * T + t) * HV + i_hv) * V
        qv = tl.load(q + koff + ck, mask=mk, other=0.).to(tl.float32)
        kv = tl.load(k + koff + ck, mask=mk, other=0.).to(tl.float32)
        gv = tl.load(g + koff + ck, mask=mk, other=0.).to(tl.float32)
        bv = tl.load(b + koff + ck, mask=mk, other=0.).to(tl.float32)
        vv = tl.load(v + voff + cv, mask=mv, other=0.).to(tl.float32)
        wv = tl.load(w + voff + cv, mask=mv, other=0.).to(tl.float32)
        if USE_L2:
            qv = qv * tl.rsqrt(tl.sum(qv * qv, 0) + EPS)
            kv = kv * tl.rsqrt(tl.sum(kv * kv, 0) + EPS)
        S = S * tl.exp(gv)[:, None]
        erase = tl.sum(S * (bv * kv)[:, None], 0)
        S = S + kv[:, None] * (wv * vv - erase)[None, :]
        out = tl.sum(S * qv[:, None], 0) * scale
        tl.store(o + voff + cv, out.to(o.dtype.element_ty), mask=mv)
    tl.store(s_ptr, S, mask=mk[:, None] & mv[None, :])


def triton_recurrent_step_gdn2(q, k, v, g, b, w, state, scale=None, use_qk_l2norm_in_kernel=False, *, config=None):
    """q, k, g, b [B, T, H, K]; v, w [B, T, Hv, V]; state [B, Hv, K, V] fp32, updated in place. Returns o
    [B, T, Hv, V] in v's dtype. `config` = (BV, num_warps) overrides the size rule (the GPU check uses it)."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(f"state must be a contiguous float32 [B, Hv, K, V] tensor; got {state.dtype}, "
                         f"contiguous={state.is_contiguous()}")
    scale = K ** -0.5 if scale is None else float(scale)
    q, k, v, g, b, w = (x.contiguous() for x in (q, k, v, g, b, w))
    o = torch.empty_like(v)
    bv, nw = config if config is not None else decode_config(B, HV, V)
    gdn2_fwd_kernel_recurrent_step[(triton.cdiv(V, bv), B * HV)](
        q, k, v, g, b, w, state, o, scale, T, H=H, HV=HV, K=K, V=V, BK=triton.next_power_of_2(K), BV=bv,
        USE_L2=use_qk_l2norm_in_kernel, EPS=L2NORM_EPS, num_warps=nw)
    return o
