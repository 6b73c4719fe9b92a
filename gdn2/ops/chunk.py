"""Public chunkwise GDN-2 operator with backend dispatch (fla's argument convention; see naive.py for the math)."""
from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from gdn2.ops.chunk_torch import torch_chunk_gdn2

BACKENDS = ("auto", "torch", "triton")


def triton_available(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> 'triton' for CUDA tensors, 'torch' otherwise. Explicit 'triton' on a CPU tensor is refused."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and not triton_available(device):
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {device}); on CPU set TRITON_INTERPRET=1 to run the kernels "
            "in Triton's interpreter, or use backend='torch'"
        )
    return backend


def chunk_gdn2(
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
    backend: str = "auto",
    recompute_in_backward: bool = False,
    recompute_g: Callable[[], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise GDN-2: S_t = (I - k_t (b_t*k_t)^T) Diag(exp g_t) S_{t-1} + k_t (w_t*v_t)^T, o_t = scale S_t^T q_t.

    q, k, g, b: [B, T, H, K]; v, w: [B, T, Hv, V] (Hv a multiple of H); g is the natural-log decay (<= 0);
    initial_state: [N, Hv, K, V] with N = B, or the number of sequences when cu_seqlens [N + 1] packs them into B = 1.
    Returns o [B, T, Hv, V] (v's dtype) and the final state [N, Hv, K, V] in fp32 (float64 for float64 inputs)
    when output_final_state, else None. recompute_in_backward: keep only the inputs for the backward pass and run
    the forward again there (less memory in training, one more forward's time); the same gradients. recompute_g:
    a function that returns g again, bit for bit (e.g. the decay gate on the f it keeps): the Triton path then keeps
    no copy of g for the backward pass and calls it there (the torch path keeps what its ops keep).
    """
    chosen = resolve_backend(backend, q.device)
    args = dict(
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        cu_seqlens=cu_seqlens,
    )
    if chosen == "torch":
        if recompute_in_backward and torch.is_grad_enabled():
            return checkpoint(functools.partial(torch_chunk_gdn2, **args), q, k, v, g, b, w, use_reentrant=False)
        return torch_chunk_gdn2(q, k, v, g, b, w, **args)
    from gdn2.ops.triton import triton_chunk_gdn2  # imported lazily: CPU users never need Triton

    return triton_chunk_gdn2(q, k, v, g, b, w, **args, recompute_in_backward=recompute_in_backward,
                             recompute_g=recompute_g)
