"""One-token (or few-token) GDN-2 update of a carried state: the decode path.

Per token (see naive.py): S <- Diag(exp g) S;  r = S^T (b*k);  S <- S + k (w*v - r)^T;  o = scale * S^T q.
"""
from __future__ import annotations

import torch

from gdn2.ops.naive import check_gdn2_inputs, compute_dtype, prepare_inputs


def torch_recurrent_step_gdn2(q, k, v, g, b, w, state, scale, use_qk_l2norm_in_kernel):
    """Pure-PyTorch step; updates `state` [B, Hv, K, V] in place and returns o [B, T, Hv, V]."""
    q, k, g, b, v32, w32, scale = prepare_inputs(q, k, v, g, b, w, scale, use_qk_l2norm_in_kernel, state.dtype)
    outputs = []
    for t in range(q.shape[1]):
        state.mul_(g[:, t].exp()[..., None])
        erase = torch.einsum("bhkv,bhk->bhv", state, b[:, t] * k[:, t])
        state.add_(k[:, t][..., None] * (w32[:, t] * v32[:, t] - erase)[:, :, None, :])
        outputs.append(scale * torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
    return torch.stack(outputs, 1).to(v.dtype)


def recurrent_step_gdn2(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    state: torch.Tensor,
    scale: float | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advance `state` [B, Hv, K, V] (fp32, or float64) IN PLACE by the T tokens of q, k, g, b [B, T, H, K],
    v, w [B, T, Hv, V]; T is small (decoding). Returns (o [B, T, Hv, V], state). No autograd (inference path).
    backend: "auto" (Triton for CUDA tensors), "torch" or "triton"."""
    from gdn2.ops.chunk import resolve_backend

    check_gdn2_inputs(q, k, v, g, b, w, state, cu_seqlens=None)     # names any mis-shaped input (state included)
    if state.dtype != compute_dtype(state.dtype):
        raise ValueError(f"state must be float32 (or float64); got {state.dtype}")
    chosen = resolve_backend(backend, q.device)
    with torch.no_grad():
        if chosen == "torch":
            o = torch_recurrent_step_gdn2(q, k, v, g, b, w, state, scale, use_qk_l2norm_in_kernel)
        else:
            from gdn2.ops.triton import triton_recurrent_step_gdn2

            o = triton_recurrent_step_gdn2(q, k, v, g, b, w, state, scale, use_qk_l2norm_in_kernel)
    return o, state
