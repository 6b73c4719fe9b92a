"""Triton kernels behind gdn2/fused.py's autograd Functions on CUDA: one launch per pass instead of the four to ten
elementwise and reduction launches (each reading or writing an fp32 copy of the activation) of the torch expressions.

    rms_norm_fwd(x [N, D], weight [D], eps, gate=None, activation, out_dtype=None) -> (y [N, D], rstd [N] fp32)
    rms_norm_bwd(x, weight, rstd, dy, gate=None, activation) -> (dx, dweight fp32 [D], dgate or None)
    silu_mul_fwd(gate, up) -> y;  silu_mul_bwd(gate, up, dy) -> (dgate, dup)

With gate, y = x / rms(x) * weight * act(gate) (act: silu or sigmoid), the output-gated norm of the mixers. Math in
fp32 (the torch path's precision); inputs and outputs keep their dtypes. Rows are at most 16384 wide.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE_ELEMENTS = 4096       # elements per row tile (a tile is one program's rows in the forward pass)
BACKWARD_TILES = 8         # tiles one backward program walks (its dweight partial is one row of a [programs, D] sum)
ELEMENTS_PER_PROGRAM = 4096
ACTIVATIONS = {"silu": 0, "sigmoid": 1}


@triton.jit
def _act(z, ACT: tl.constexpr):
    s = tl.sigmoid(z)
    if ACT == 0:
        return z * s
    return s


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    s = tl.sigmoid(z)
    if ACT == 0:
        return s * (1 + z * (1 - s))
    return s * (1 - s)


@triton.jit
def _rms_fwd_kernel(x_ptr, w_ptr, g_ptr, y_ptr, rstd_ptr, N, D, eps, HAS_GATE: tl.constexpr, ACT: tl.constexpr,
                    ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows[:, None] < N) & (cols[None, :] < D)
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    y = x * rstd[:, None] * tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    if HAS_GATE:
        y = y * _act(tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32), ACT)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=rows < N)


@triton.jit
def _rms_bwd_kernel(x_ptr, w_ptr, g_ptr, rstd_ptr, dy_ptr, dx_ptr, dg_ptr, dw_ptr, N, D,
                    HAS_GATE: tl.constexpr, ACT: tl.constexpr, ROWS: tl.constexpr, ITERS: tl.constexpr,
                    BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    for it in range(ITERS):
        rows = (pid * ITERS + it) * ROWS + tl.arange(0, ROWS)
        mask = (rows[:, None] < N) & (cols[None, :] < D)
        offs = rows[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=rows < N, other=0.0)[:, None]
        x_hat = x * rstd
        if HAS_GATE:
            z = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(dg_ptr + offs, (dy * x_hat * w * _act_grad(z, ACT)).to(dg_ptr.dtype.element_ty), mask=mask)
            dy = dy * _act(z, ACT)
        dw += tl.sum(dy * x_hat, axis=0)
        dx_hat = dy * w
        dx = rstd * (dx_hat - x_hat * (tl.sum(dx_hat * x_hat, axis=1) / D)[:, None])
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + pid * D + cols, dw, mask=cols < D)


def _tile(D: int) -> tuple[int, int, int]:
    """(BLOCK >= D, rows per tile so that a tile holds about TILE_ELEMENTS, num_warps)."""
    if D > 16384:
        raise ValueError(f"the fused norm kernels take rows of at most 16384; got {D}")
    block = triton.next_power_of_2(D)
    rows = max(TILE_ELEMENTS // block, 1)
    return block, rows, min(max(rows * block // 512, 1), 16)


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float, gate: torch.Tensor | None = None,
                 activation: str = "silu", out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [N, D] in out_dtype (None: x's), rstd [N] fp32) for contiguous x [N, D] (and gate [N, D])."""
    N, D = x.shape
    y = torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device)
    rstd = torch.empty(N, dtype=torch.float32, device=x.device)
    block, rows, warps = _tile(D)
    _rms_fwd_kernel[(triton.cdiv(N, rows),)](x, weight, gate if gate is not None else x, y, rstd, N, D, eps,
                                            HAS_GATE=gate is not None, ACT=ACTIVATIONS[activation], ROWS=rows,
                                            BLOCK=block, num_warps=warps)
    return y, rstd


def rms_norm_bwd(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor,
                 gate: torch.Tensor | None = None, activation: str = "silu"):
    """(dx in x's dtype, dweight fp32 [D], dgate in gate's dtype or None) of rms_norm_fwd."""
    N, D = x.shape
    dx = torch.empty_like(x)
    dg = torch.empty_like(gate) if gate is not None else None
    block, rows, warps = _tile(D)
    programs = triton.cdiv(N, rows * BACKWARD_TILES)
    dw = torch.empty(programs, D, dtype=torch.float32, device=x.device)
    _rms_bwd_kernel[(programs,)](x, weight, gate if gate is not None else x, rstd, dy, dx,
                                 dg if dg is not None else dx, dw, N, D, HAS_GATE=gate is not None,
                                 ACT=ACTIVATIONS[activation], ROWS=rows, ITERS=BACKWARD_TILES, BLOCK=block,
                                 num_warps=warps)
    return dx, dw.sum(0), dg


@triton.jit
def _silu_mul_fwd_kernel(g_ptr, u_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, (g * tl.sigmoid(g) * u).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_bwd_kernel(g_ptr, u_ptr, dy_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(dg_ptr + offs, (dy * u * s * (1 + g * (1 - s))).to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + offs, (dy * g * s).to(du_ptr.dtype.element_ty), mask=mask)


def silu_mul_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for contiguous tensors of one shape (fp32 math, gate's dtype out)."""
    y = torch.empty_like(gate)
    n = gate.numel()
    _silu_mul_fwd_kernel[(triton.cdiv(n, ELEMENTS_PER_PROGRAM),)](gate, up, y, n, BLOCK=ELEMENTS_PER_PROGRAM,
                                                                 num_warps=8)
    return y


def silu_mul_bwd(gate: torch.Tensor, up: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dg, du = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    _silu_mul_bwd_kernel[(triton.cdiv(n, ELEMENTS_PER_PROGRAM),)](gate, up, dy, dg, du, n,
                                                                 BLOCK=ELEMENTS_PER_PROGRAM, num_warps=8)
    return dg, du
