r"""Token-serial GDN-2 recurrence: the readable reference every other implementation is tested against.

One head, state S in R^{K x V} (rows = key channels), for t = 1..T (eq. 10 of the paper):

    S_t = (I - k_t (b_t * k_t)^T) Diag(exp(g_t)) S_{t-1} + k_t (w_t * v_t)^T
    o_t = scale * S_t^T q_t                                   (read after the update)

computed as:  S <- Diag(exp g) S;  r = S^T (b * k);  S <- S + k (w * v - r)^T;  o = scale * S^T q.

Layout as in flash-linear-attention: q, k, g, b are [B, T, H, K]; v, w are [B, T, Hv, V] with Hv a multiple of H
(grouped value heads: value head j reads key head j // (Hv // H)); the state is [N, Hv, K, V].
"""
from __future__ import annotations

import torch

L2NORM_EPS = 1e-6


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last axis, computed in at least fp32."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return (xf * torch.rsqrt((xf * xf).sum(-1, keepdim=True) + eps)).to(x.dtype)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else runs in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def expand_key_heads(x: torch.Tensor, num_v_heads: int) -> torch.Tensor:
    """[B, T, H, K] -> [B, T, Hv, K]: repeat each key head over its group of value heads."""
    num_heads = x.shape[2]
    if num_v_heads == num_heads:
        return x
    return x.repeat_interleave(num_v_heads // num_heads, dim=2)


def check_gdn2_inputs(q, k, v, g, b, w, initial_state, cu_seqlens) -> int:
    """Validate shapes shared by every GDN-2 entry point; returns the number of sequences N."""
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, K]; got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    for name, x in (("k", k), ("g", g), ("b", b)):
        if x.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)} ([B, T, H, K]); got {tuple(x.shape)}")
    if v.dim() != 4 or v.shape[:2] != (B, T):
        raise ValueError(f"v must be [B, T, Hv, V] with B={B}, T={T}; got {tuple(v.shape)}")
    Hv, V = v.shape[2], v.shape[3]
    if w.shape != v.shape:
        raise ValueError(f"w must have v's shape {tuple(v.shape)} ([B, T, Hv, V]); got {tuple(w.shape)}")
    if Hv % H != 0:
        raise ValueError(f"the number of value heads Hv={Hv} must be a multiple of the key heads H={H}")
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"with cu_seqlens the batch must be packed into B=1; got B={B}")
        if cu_seqlens.dim() != 1 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T:
            raise ValueError(f"cu_seqlens must be 1-D, start at 0 and end at T={T}; got {cu_seqlens.tolist()}")
        N = cu_seqlens.numel() - 1
    else:
        N = B
    if initial_state is not None and tuple(initial_state.shape) != (N, Hv, K, V):
        raise ValueError(f"initial_state must be [N, Hv, K, V] = {(N, Hv, K, V)}; got {tuple(initial_state.shape)}")
    return N


def prepare_inputs(q, k, v, g, b, w, scale: float | None, use_qk_l2norm: bool, acc: torch.dtype):
    """What every PyTorch path does first: scale defaults to K^-1/2, q and k optionally L2-normalised, the key-side
    tensors repeated over their value-head groups ([B, T, H, K] -> [B, T, Hv, K]), everything cast to acc.
    Returns (q, k, v, g, b, w, scale)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    Hv = v.shape[2]
    q, k, g, b = (expand_key_heads(x, Hv).to(acc) for x in (q, k, g, b))
    return q, k, g, b, v.to(acc), w.to(acc), scale


def sequence_bounds(cu_seqlens: torch.Tensor | None, batch: int, length: int) -> list[tuple[int, int, int]]:
    """(batch row, start, end) of every sequence: rows of a padded batch, or segments of a packed one."""
    if cu_seqlens is None:
        return [(i, 0, length) for i in range(batch)]
    cu = cu_seqlens.tolist()
    return [(0, cu[i], cu[i + 1]) for i in range(len(cu) - 1)]


def naive_recurrent_gdn2(
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token GDN-2 in the accumulation dtype (fp32, or float64 for float64 inputs).

    Shapes: q, k, g, b [B, T, H, K]; v, w [B, T, Hv, V]; initial_state [N, Hv, K, V] (N = B, or the number of
    packed sequences when cu_seqlens [N + 1] is given with B = 1).
    Returns o [B, T, Hv, V] in v's dtype and the final state [N, Hv, K, V] (accumulation dtype) or None.
    """
    check_gdn2_inputs(q, k, v, g, b, w, initial_state, cu_seqlens)
    B, T, H, K = q.shape
    Hv, V = v.shape[2], v.shape[3]
    out_dtype = v.dtype
    acc = compute_dtype(out_dtype)
    q, k, g, b, v, w, scale = prepare_inputs(q, k, v, g, b, w, scale, use_qk_l2norm_in_kernel, acc)

    outputs = torch.zeros(B, T, Hv, V, dtype=acc, device=v.device)
    final_states = []
    for n, (row, start, end) in enumerate(sequence_bounds(cu_seqlens, B, T)):
        S = q.new_zeros(Hv, K, V) if initial_state is None else initial_state[n].to(acc)
        for t in range(start, end):
            S = S * g[row, t].exp()[..., None]                                   # Diag(exp g) S
            erase = torch.einsum("hkv,hk->hv", S, b[row, t] * k[row, t])         # S^T (b * k)
            S = S + k[row, t][..., None] * (w[row, t] * v[row, t] - erase)[:, None, :]
            outputs[row, t] = scale * torch.einsum("hkv,hk->hv", S, q[row, t])
        final_states.append(S)
    final_state = torch.stack(final_states) if output_final_state else None
    return outputs.to(out_dtype), final_state
