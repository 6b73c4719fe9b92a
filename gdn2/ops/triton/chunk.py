"""Public Triton entry point for chunkwise GDN-2: picks the inference-only forward or the autograd Function.

    triton_chunk_gdn2(q, k, v, g, b, w, scale=None, initial_state=None, output_final_state=False,
                      use_qk_l2norm_in_kernel=False, cu_seqlens=None, recompute_in_backward=False,
                      recompute_g=None) -> (o [B, T, Hv, V], final_state | None)

q, k, g, b: [B, T, H, K]; v, w: [B, T, Hv, V] (Hv a multiple of H; value head j reads key head j // (Hv // H));
g is the natural-log decay per key channel; the state is fp32 [N, Hv, K, V]. With cu_seqlens [N + 1], B must be 1.
Dispatch: the autograd Function when grad mode is on and any input requires grad (chunk_fwd.chunk_forward keeping its
intermediates, then chunk_bwd.chunk_backward); otherwise the same forward, its intermediates freed on return. Which
forward launches run is one ForwardPlan per call (dispatch.plan_forward). With recompute_in_backward the Function
keeps only its inputs: its forward runs the inference plan, and the backward runs the training forward again,
without the output, to get the intermediates (A, Aqk, Y, Qg, Kt, hs, R: 30 KB per token per layer at the 1.3B
shapes in bf16) just before it reads them, so one layer's intermediates are alive at a time instead of every
layer's. With recompute_g (a function returning g again, bit for bit, e.g. the decay gate run on the f it keeps)
the Function does not keep g (fp32, 8 KB per token per layer at the 1.3B shapes) and calls recompute_g in its
backward instead.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from gdn2.ops.naive import check_gdn2_inputs
from gdn2.ops.triton import chunk_bwd, fwd_matrices, fwd_output, fwd_state, fwd_wy
from gdn2.ops.triton.chunk_bwd import chunk_backward
from gdn2.ops.triton.chunk_fwd import chunk_forward
from gdn2.ops.triton.dispatch import plan_forward
from gdn2.ops.triton.l2norm import inverse_norms, l2norm_vjp
from gdn2.ops.triton.utils import INTERPRET, sequence_layout

# Every chunk kernel by the name the GPU check, the sm_90 compile report and the profiler use, in launch order.
CHUNK_KERNELS = {
    "fwd_intra": fwd_matrices.gdn2_fwd_kernel_intra,
    "fwd_exact_diag": fwd_matrices.gdn2_fwd_kernel_exact_diag,
    "fwd_solve": fwd_matrices.gdn2_fwd_kernel_solve,
    "fwd_wy": fwd_wy.gdn2_fwd_kernel_wy,
    "fwd_state": fwd_state.gdn2_fwd_kernel_state,
    "fwd_output": fwd_output.gdn2_fwd_kernel_output,
    "bwd_dlocal": chunk_bwd.gdn2_bwd_kernel_dlocal,
    "bwd_dstate": chunk_bwd.gdn2_bwd_kernel_dstate,
    "bwd_dqk": chunk_bwd.gdn2_bwd_kernel_dqk,
    "bwd_dav": chunk_bwd.gdn2_bwd_kernel_dav,
    "bwd_exact_diag": chunk_bwd.gdn2_bwd_kernel_exact_diag,
    "bwd_dqkg": chunk_bwd.gdn2_bwd_kernel_dqkg,
}


BF16_UNDER_INTERPRETER = (
    "bfloat16 inputs under TRITON_INTERPRET=1: Triton's interpreter keeps bfloat16 as 16-bit integers and tl.dot "
    "multiplies those, so the chunk kernels' values are wrong here (shapes and the tensors kept for the backward pass "
    "are right). Interpret float32 or float16 inputs (dispatch.planned_as runs the 16-bit plans on float32), or use "
    "backend='torch'.")


def packed_inputs(q, k, v, g, b, w, initial_state, use_l2, cu_seqlens):
    """The kernels' view of a call: q, k, g, b as [B*T, H, K] and v, w as [B*T, Hv, V] (contiguous), the inverse
    norms rq, rk [B*T, H] (q, k themselves without the fused L2-norm), h0 fp32 or None, and the sequence layout."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    qf, kf, gf, bf = (x.reshape(B * T, H, K).contiguous() for x in (q, k, g, b))
    vf, wf = (x.reshape(B * T, HV, V).contiguous() for x in (v, w))
    rq, rk = (inverse_norms(qf), inverse_norms(kf)) if use_l2 else (qf, kf)
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    return qf, kf, vf, gf, bf, wf, rq, rk, h0, sequence_layout(cu_seqlens, B, T, q.device)


def plan_for(v: torch.Tensor, K: int, layout, training: bool):
    """plan_forward for a call: v's dtype, key width K, walks = sequences x value heads."""
    n_walks = (layout[0].numel() - 1) * v.shape[-2]
    return plan_forward(v.dtype, K, n_walks, training)


class ChunkGDN2Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, b, w, scale, initial_state, output_final_state, use_l2, cu_seqlens, recompute,
                recompute_g):
        B, T, H, K = q.shape
        HV, V = v.shape[2], v.shape[3]
        qf, kf, vf, gf, bf, wf, rq, rk, h0, layout = packed_inputs(q, k, v, g, b, w, initial_state, use_l2,
                                                                   cu_seqlens)
        o, ht, saved = chunk_forward(qf, kf, vf, gf, bf, wf, rq, rk, h0, scale, layout, use_l2, output_final_state,
                                     plan_for(vf, K, layout, training=not recompute))
        saved = {} if recompute else saved
        ctx.saved_names, ctx.recompute, ctx.recompute_g = tuple(saved), recompute, recompute_g
        kept_g = None if recompute_g is not None else gf       # g [TT, H, K] fp32, or computed again in backward
        ctx.save_for_backward(qf, kf, vf, kept_g, bf, wf, rq, rk, h0, *saved.values())
        ctx.meta = (scale, layout, use_l2, (B, T, H, K, HV, V), initial_state is not None,
                    initial_state.dtype if initial_state is not None else None,
                    tuple(x.dtype for x in (q, k, v, g, b, w)))
        return o.reshape(B, T, HV, V), ht

    @staticmethod
    def backward(ctx, do, dht):
        qf, kf, vf, gf, bf, wf, rq, rk, h0, *rest = ctx.saved_tensors
        saved = dict(zip(ctx.saved_names, rest, strict=False))
        scale, layout, use_l2, (B, T, H, K, HV, V), has_h0, h0_dtype, dtypes = ctx.meta
        if gf is None:
            gf = ctx.recompute_g().reshape(B * T, H, K).to(dtypes[3]).contiguous()      # as packed_inputs gave it
        if ctx.recompute:                             # the intermediates alone: O is not needed again
            _, _, saved = chunk_forward(qf, kf, vf, gf, bf, wf, rq, rk, h0, scale, layout, use_l2, False,
                                        plan_for(vf, K, layout, training=True).without_output())
        do = do.reshape(B * T, HV, V).contiguous()
        dht = dht.float().contiguous() if dht is not None else None
        dq, dk, db, dg, dv, dw, dh0 = chunk_backward(qf, kf, vf, gf, bf, wf, rq, rk, h0, saved, do, dht, scale,
                                                     layout, use_l2)
        if use_l2:                                    # in q's and k's dtype
            dq = l2norm_vjp(qf, rq, dq.contiguous())
            dk = l2norm_vjp(kf, rk, dk.contiguous())
        grads = [x.reshape(B, T, H, K) for x in (dq, dk)] + [dv.reshape(B, T, HV, V)]
        grads += [dg.reshape(B, T, H, K), db.reshape(B, T, H, K), dw.reshape(B, T, HV, V)]
        grads = [x.to(dt) for x, dt in zip(grads, dtypes, strict=False)]
        dh0 = dh0.to(h0_dtype) if has_h0 else None
        return (*grads, None, dh0, None, None, None, None, None)


def triton_chunk_gdn2(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    recompute_in_backward: bool = False,
    recompute_g: Callable[[], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise GDN-2 on Triton kernels; see the module docstring for shapes, dispatch, recompute_in_backward and
    recompute_g."""
    check_gdn2_inputs(q, k, v, g, b, w, initial_state, cu_seqlens)
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    if K > 256 or V > 256:
        raise ValueError(f"the Triton kernels support K, V <= 256; got K={K}, V={V} (use backend='torch')")
    scale = K ** -0.5 if scale is None else float(scale)
    inputs = (q, k, v, g, b, w) + ((initial_state,) if initial_state is not None else ())
    if INTERPRET and any(x.dtype == torch.bfloat16 for x in inputs):
        warnings.warn(BF16_UNDER_INTERPRETER, RuntimeWarning, stacklevel=2)
    if torch.is_grad_enabled() and any(x.requires_grad for x in inputs):
        return ChunkGDN2Function.apply(q, k, v, g, b, w, scale, initial_state, output_final_state,
                                       use_qk_l2norm_in_kernel, cu_seqlens, recompute_in_backward, recompute_g)
    qf, kf, vf, gf, bf, wf, rq, rk, h0, layout = packed_inputs(q, k, v, g, b, w, initial_state,
                                                               use_qk_l2norm_in_kernel, cu_seqlens)
    o, ht, _ = chunk_forward(qf, kf, vf, gf, bf, wf, rq, rk, h0, scale, layout, use_qk_l2norm_in_kernel,
                             output_final_state, plan_for(vf, K, layout, training=False))
    return o.reshape(B, T, HV, V), ht
