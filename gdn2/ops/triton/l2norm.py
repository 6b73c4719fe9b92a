r"""The L2-norm of q and k that the chunk kernels fuse (use_qk_l2norm_in_kernel): its two passes outside them.

Per row x of K channels (a token's head), in fp32:

    r      = 1 / sqrt(sum_d x_d^2 + eps)                   the only thing the forward materialises; the chunk
                                                           kernels read x and scale by r
    dx     = r * (dx_hat - x_hat * <x_hat, dx_hat>)        with x_hat = x * r, given dx_hat (fp32, from chunk_backward)

One launch per pass over [rows, K] instead of the four to six elementwise passes (each an fp32 copy of q or k) of the
torch expressions; the backward writes dx in the input's dtype, so no cast follows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gdn2.ops.triton.utils import L2NORM_EPS

ROWS = 16


@triton.jit
def _inverse_norms_kernel(x_ptr, r_ptr, N, K, EPS: tl.constexpr, ROWS: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BK)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(r_ptr + rows, 1.0 / tl.sqrt(tl.sum(x * x, axis=1) + EPS), mask=rows < N)


@triton.jit
def _l2norm_vjp_kernel(x_ptr, r_ptr, g_ptr, dx_ptr, N, K, ROWS: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BK)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    offs = rows[:, None] * K + cols[None, :]
    r = tl.load(r_ptr + rows, mask=rows < N, other=0.0)[:, None]
    x_hat = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) * r
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dx = r * (g - x_hat * tl.sum(x_hat * g, axis=1)[:, None])
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def inverse_norms(x: torch.Tensor) -> torch.Tensor:
    """[..., K] contiguous -> [...] fp32 1/sqrt(sum x^2 + eps)."""
    K = x.shape[-1]
    N = x.numel() // K
    r = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    _inverse_norms_kernel[(triton.cdiv(N, ROWS),)](x, r, N, K, EPS=L2NORM_EPS, ROWS=ROWS,
                                                   BK=triton.next_power_of_2(K), num_warps=4)
    return r


def l2norm_vjp(x: torch.Tensor, inv_norm: torch.Tensor, grad_hat: torch.Tensor) -> torch.Tensor:
    """Gradient wrt x [..., K] (contiguous) of x_hat = x * inv_norm [...], given grad_hat [..., K] (contiguous);
    in x's dtype."""
    K = x.shape[-1]
    N = x.numel() // K
    dx = torch.empty_like(x)
    _l2norm_vjp_kernel[(triton.cdiv(N, ROWS),)](x, inv_norm, grad_hat, dx, N, K, ROWS=ROWS,
                                                BK=triton.next_power_of_2(K), num_warps=4)
    return dx
