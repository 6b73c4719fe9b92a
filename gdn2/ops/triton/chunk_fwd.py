r"""GDN-2 chunkwise forward: the launches of one ForwardPlan (dispatch.py), in order.

Per chunk of C = 64 tokens (rows r, s = 0..63), per head, elementwise over the K key channels (WY form, the decay
absorbed into asymmetric erase factors):

    G_r = sum_{i<=r} g_i                     (chunk-local inclusive cumsum, fp32)
    T_rs   = sum_d b_rd k_rd k_sd exp(G_rd - G_sd)            s <  r      A = (I + T)^-1  (fp32)
    Aqk_rs = scale sum_d q_rd k_sd exp(G_rd - G_sd)           s <= r
    E_r = exp(G_r) b_r k_r,  Z_r = w_r v_r,  Q_r = scale exp(G_r) q_r,  Kt_r = exp(G_C - G_r) k_r
    Y = A E,  U = A Z                (one inverse serves the erase and the write side)
    R   = U - Y S_0
    O   = Q S_0 + Aqk R
    S_C = Diag(exp G_C) S_0 + Kt^T R

Only R and S_C depend on the state carried between chunks; everything else is chunk-parallel. Where each part runs:
  fwd_matrices.py  T, Aqk, A (intra, exact_diag, solve kernels)            unless plan.solve_in_wy
  fwd_wy.py        Y, U, Q, Kt, exp(G_C) (and T, Aqk, A with solve_in_wy)
  fwd_state.py     R, S_C, the final state (and O with output_in_state)    sequential over the chunks
  fwd_output.py    O                                          unless plan.output_in_state or not plan.output
gates.py says how exp(G_r - G_s) is split into bounded factors; tiles.py holds the tile helpers.
"""
from __future__ import annotations

from gdn2.ops.triton.dispatch import ForwardPlan
from gdn2.ops.triton.fwd_matrices import chunk_matrices, local_matrices
from gdn2.ops.triton.fwd_output import output_forward
from gdn2.ops.triton.fwd_state import state_walk
from gdn2.ops.triton.fwd_wy import wy_forward


def chunk_forward(q, k, v, g, b, w, rq, rk, h0, scale, layout, use_l2, output_final_state, plan: ForwardPlan):
    """q, k, g, b [TT, H, K], v, w [TT, Hv, V] (packed tokens), rq, rk [TT, H] inverse norms (or q, k without the
    fused L2-norm), h0 [N, Hv, K, V] fp32 or None, layout from utils.sequence_layout. Returns o [TT, Hv, V] (None
    without plan.output), the final state [N, Hv, K, V] fp32 or None, and the intermediates the backward reads
    (plan.keep_for_backward): dict(A, Aqk, n_exact, Y, Qg, Kt, gC, hs, R); entries not kept are None."""
    _, _, _, n_chunks = layout
    if plan.solve_in_wy:
        A, Aqk, n_exact = chunk_matrices(q, n_chunks, with_n_exact=plan.keep_for_backward)
    else:
        A, Aqk, n_exact = local_matrices(q, k, g, b, rq, rk, scale, layout, use_l2)
    Y, Qg, Kt, gC, U = wy_forward(q, k, v, g, b, w, rq, rk, A, Aqk, n_exact, scale, layout, use_l2,
                                  solve_a=plan.solve_in_wy, apply_a=plan.state_applies_a)
    o, ht, hs, R = state_walk(Y, U, Kt, gC, h0, Qg, Aqk, layout, output_final_state, plan.output_in_state,
                              plan.store_states, *((A, w) if plan.state_applies_a else ()))
    if plan.output and not plan.output_in_state:
        o = output_forward(Qg, Aqk, hs, R, layout, q.shape[-1])
    return o, ht, dict(A=A, Aqk=Aqk, n_exact=n_exact, Y=Y, Qg=Qg, Kt=Kt, gC=gC, hs=hs, R=R)
