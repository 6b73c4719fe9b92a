"""Triton kernels behind gdn2/fused.py's autograd Functions on CUDA: one launch per pass instead of the four to ten
elementwise and reduction launches (each reading or writing an fp32 copy of the activation) of the torch expressions.

    rms_norm_fwd(x [N, D], weight [D], eps, gate=None, activation, out_dtype=None, keep_dtype=None,
                 round_x=False, rstd=None) -> (y [N, D], rstd [N] fp32, x in keep_dtype or None)
    rms_norm_bwd(x, weight, rstd, dy, gate=None, activation, dx_dtype=None) -> (dx, dweight fp32 [D], dgate or None)
    silu_mul_fwd(gate, up) -> y;  silu_mul_bwd(gate, up, dy) -> (dgate, dup)
    conv_silu_fwd(x [B, T, D], cache [B, D, W-1], weight [D, W], bias) -> silu(causal depthwise conv), [B, T, D]
    conv_silu_bwd(x, cache, weight, bias, dy) -> (dx, dweight fp32, dbias fp32 or None)

With gate, y = x / rms(x) * weight * act(gate) (act: silu or sigmoid), the output-gated norm of the mixers. Math in
fp32 (the torch path's precision); inputs and outputs keep their dtypes. Rows are at most 16384 wide. The
convolution works on the [B, T, D] layout the projections produce (no transposed copies) and recomputes its
pre-activation in the backward pass.
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
def _rms_fwd_kernel(x_ptr, w_ptr, g_ptr, y_ptr, rstd_ptr, keep_ptr, N, D, eps, HAS_GATE: tl.constexpr,
                    ACT: tl.constexpr, KEEP: tl.constexpr, ROUND_X: tl.constexpr, GIVEN_RSTD: tl.constexpr,
                    ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows[:, None] < N) & (cols[None, :] < D)
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if GIVEN_RSTD:                             # 1/rms as an earlier pass computed it (a recompute of its y)
        rstd = tl.load(rstd_ptr + rows, mask=rows < N, other=0.0)
    else:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    if KEEP:                                   # the copy of x the backward pass reads, in a narrower dtype
        kept = x.to(keep_ptr.dtype.element_ty)
        tl.store(keep_ptr + offs, kept, mask=mask)
        if ROUND_X:                            # y from the kept x (1/rms from the full x): recomputable from both
            x = kept.to(tl.float32)
    y = x * rstd[:, None] * tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    if HAS_GATE:
        y = y * _act(tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32), ACT)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    if not GIVEN_RSTD:
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
                 activation: str = "silu", out_dtype: torch.dtype | None = None,
                 keep_dtype: torch.dtype | None = None, round_x: bool = False, rstd: torch.Tensor | None = None):
    """(y [N, D] in out_dtype (None: x's), rstd [N] fp32, x in keep_dtype or None) for contiguous x [N, D] (and
    gate [N, D]); keep_dtype writes a copy of x in that dtype in the same pass. round_x: y is computed from that
    copy (1/rms still from the full x), so that the copy and rstd give the same y again. rstd [N] fp32 given: used
    instead of computing 1/rms from x (and returned as is)."""
    N, D = x.shape
    y = torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device)
    given = rstd is not None
    rstd = rstd if given else torch.empty(N, dtype=torch.float32, device=x.device)
    kept = torch.empty(x.shape, dtype=keep_dtype, device=x.device) if keep_dtype is not None else None
    block, rows, warps = _tile(D)
    _rms_fwd_kernel[(triton.cdiv(N, rows),)](x, weight, gate if gate is not None else x, y, rstd,
                                            kept if kept is not None else y, N, D, eps, HAS_GATE=gate is not None,
                                            ACT=ACTIVATIONS[activation], KEEP=kept is not None, ROUND_X=round_x,
                                            GIVEN_RSTD=given, ROWS=rows, BLOCK=block, num_warps=warps)
    return y, rstd, kept


def rms_norm_bwd(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor,
                 gate: torch.Tensor | None = None, activation: str = "silu", dx_dtype: torch.dtype | None = None):
    """(dx in dx_dtype (None: x's), dweight fp32 [D], dgate in gate's dtype or None) of rms_norm_fwd; x may be the
    narrower copy rms_norm_fwd kept."""
    N, D = x.shape
    dx = torch.empty(x.shape, dtype=dx_dtype or x.dtype, device=x.device)
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


# ------------------------------------------------------------------------------------------ short convolution
@triton.jit
def _conv_input(x_ptr, c_ptr, b, rows, src, d, dmask, T, D, W: tl.constexpr):
    """fp32 conv input x_in[b, src, d] for output rows `rows` [BT]: x [B, T, D] where 0 <= src < T, the cache
    c [B, D, W-1] where src < 0 (for rows inside the sequence), zero elsewhere. -> [BT, BD]"""
    from_x = tl.load(x_ptr + (b * T + src[:, None]) * D + d[None, :],
                     mask=(src[:, None] >= 0) & (src[:, None] < T) & dmask[None, :], other=0.0)
    from_c = tl.load(c_ptr + (b * D + d[None, :]) * (W - 1) + (src[:, None] + W - 1),
                     mask=(src[:, None] < 0) & (rows[:, None] < T) & dmask[None, :], other=0.0)
    return from_x.to(tl.float32) + from_c.to(tl.float32)


@triton.jit
def _conv_pre(x_ptr, c_ptr, w_ptr, bias_ptr, b, rows, d, dmask, T, D, W: tl.constexpr, HAS_BIAS: tl.constexpr,
              BT: tl.constexpr, BD: tl.constexpr):
    """fp32 pre-activation bias[d] + sum_j w[d, j] * x_in[b, rows + j - (W-1), d] of output rows `rows` [BT].
    -> [BT, BD]"""
    pre = tl.zeros([BT, BD], dtype=tl.float32)
    if HAS_BIAS:
        pre += tl.load(bias_ptr + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    for j in tl.static_range(W):
        weight = tl.load(w_ptr + d * W + j, mask=dmask, other=0.0).to(tl.float32)
        pre += _conv_input(x_ptr, c_ptr, b, rows, rows + j - (W - 1), d, dmask, T, D, W) * weight[None, :]
    return pre


@triton.jit
def _conv_fwd_kernel(x_ptr, c_ptr, w_ptr, bias_ptr, y_ptr, T, D, W: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BT: tl.constexpr, BD: tl.constexpr):
    """y[b, t, d] = silu(bias[d] + sum_j w[d, j] * x_in[b, t + j - (W-1), d]), x_in continuing the cache c
    [B, D, W-1]."""
    b, tb, db = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    t = tb * BT + tl.arange(0, BT)
    d = db * BD + tl.arange(0, BD)
    dmask = d < D
    acc = _conv_pre(x_ptr, c_ptr, w_ptr, bias_ptr, b, t, d, dmask, T, D, W, HAS_BIAS, BT, BD)
    y = acc * tl.sigmoid(acc)
    tl.store(y_ptr + (b * T + t[:, None]) * D + d[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(t[:, None] < T) & dmask[None, :])


@triton.jit
def _conv_bwd_grad_kernel(x_ptr, c_ptr, w_ptr, bias_ptr, dy_ptr, g_ptr, dw_ptr, db_ptr, T, D, NT, W: tl.constexpr,
                          HAS_BIAS: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """First pass of the backward: g = dy * silu'(pre) (pre recomputed) of this block's rows into g [B, T, D]
    fp32, and the block's partial dw [b, tb, d, j] = sum_t g[t] * x_in[t + j - (W-1)] and dbias [b, tb, d]."""
    b, tb, db = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    t = tb * BT + tl.arange(0, BT)
    d = db * BD + tl.arange(0, BD)
    dmask = d < D
    live = (t[:, None] < T) & dmask[None, :]
    pre = _conv_pre(x_ptr, c_ptr, w_ptr, bias_ptr, b, t, d, dmask, T, D, W, HAS_BIAS, BT, BD)
    dy = tl.load(dy_ptr + (b * T + t[:, None]) * D + d[None, :], mask=live, other=0.0).to(tl.float32)
    s = tl.sigmoid(pre)
    g = tl.where(live, dy * s * (1 + pre * (1 - s)), 0.0)
    tl.store(g_ptr + (b * T + t[:, None]) * D + d[None, :], g, mask=live)
    if HAS_BIAS:
        tl.store(db_ptr + (b * NT + tb) * D + d, tl.sum(g, axis=0), mask=dmask)
    for j in tl.static_range(W):
        part = tl.sum(g * _conv_input(x_ptr, c_ptr, b, t, t + j - (W - 1), d, dmask, T, D, W), axis=0)
        tl.store(dw_ptr + ((b * NT + tb) * D + d) * W + j, part, mask=dmask)


@triton.jit
def _conv_bwd_dx_kernel(g_ptr, w_ptr, dx_ptr, T, D, W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """Second pass: dx[t] = sum_k w[W-1-k] * g[t + k] (output row t + k reads input row t through tap W-1-k)."""
    b, tb, db = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    t = tb * BT + tl.arange(0, BT)
    d = db * BD + tl.arange(0, BD)
    dmask = d < D
    dx = tl.zeros([BT, BD], dtype=tl.float32)
    for k in tl.static_range(W):
        rows = t + k
        g = tl.load(g_ptr + (b * T + rows[:, None]) * D + d[None, :], mask=(rows[:, None] < T) & dmask[None, :],
                    other=0.0)
        dx += g * tl.load(w_ptr + d * W + (W - 1 - k), mask=dmask, other=0.0).to(tl.float32)[None, :]
    tl.store(dx_ptr + (b * T + t[:, None]) * D + d[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=(t[:, None] < T) & dmask[None, :])


# (rows BT, channels BD, warps) per program. Every element of a tile holds its own 64-bit addresses and masks, so
# the tiles are small (a one-pass backward at 64 x 128 spilled 54 KB of registers per thread on sm_90). On an H100 at
# the 1.3B model's 16K tokens x 2,048 channels (benchmarks/bench_conv.py, results/bench/conv-*.csv), 32 x 128 took
# 0.446 ms backward, the fastest tile (16 x 64: 0.551), and 0.113 ms forward (the fastest, 8 x 128: 0.111).
CONV_FWD_TILE = (32, 128, 4)
CONV_BWD_TILE = (32, 128, 4)


def conv_silu_fwd(x: torch.Tensor, cache: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None = None, tile: tuple[int, int, int] = CONV_FWD_TILE) -> torch.Tensor:
    """silu(depthwise causal conv + bias) of contiguous x [B, T, D] continuing contiguous cache [B, D, W-1];
    weight [D, W] contiguous. tile: (BT, BD, num_warps)."""
    B, T, D = x.shape
    bt, bd, warps = tile
    y = torch.empty_like(x)
    grid = (B, triton.cdiv(T, bt), triton.cdiv(D, bd))
    _conv_fwd_kernel[grid](x, cache, weight, bias if bias is not None else weight, y, T, D, W=weight.shape[1],
                           HAS_BIAS=bias is not None, BT=bt, BD=bd, num_warps=warps)
    return y


def conv_silu_bwd(x: torch.Tensor, cache: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  dy: torch.Tensor, tile: tuple[int, int, int] = CONV_BWD_TILE):
    """(dx in x's dtype, dweight fp32 [D, W], dbias fp32 [D] or None) of conv_silu_fwd (no gradient for the cache),
    in two passes: g = dy * silu'(pre) once per row into an fp32 [B, T, D] buffer with the partial weight gradients,
    then dx from W shifted reads of g. tile: (BT, BD, num_warps) of both passes."""
    B, T, D = x.shape
    W = weight.shape[1]
    bt, bd, warps = tile
    nt = triton.cdiv(T, bt)
    g = torch.empty(B, T, D, dtype=torch.float32, device=x.device)
    dx = torch.empty_like(x)
    dw = torch.empty(B, nt, D, W, dtype=torch.float32, device=x.device)
    db = torch.empty(B, nt, D, dtype=torch.float32, device=x.device) if bias is not None else None
    grid = (B, nt, triton.cdiv(D, bd))
    _conv_bwd_grad_kernel[grid](x, cache, weight, bias if bias is not None else weight, dy, g, dw,
                                db if db is not None else dw, T, D, nt, W=W, HAS_BIAS=bias is not None, BT=bt,
                                BD=bd, num_warps=warps)
    _conv_bwd_dx_kernel[grid](g, weight, dx, T, D, W=W, BT=bt, BD=bd, num_warps=warps)
    return dx, dw.sum((0, 1)), None if db is None else db.sum((0, 1))


# ------------------------------------------------------------------------------------------ decay gate
@triton.jit
def _decay_fwd_kernel(f_ptr, a_ptr, dt_ptr, g_ptr, N, D, K, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """g[n, c] = -exp(A_log[c // K]) * softplus(f[n, c] + dt_bias[c]) (fp32)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    cmask = cols < D
    mask = (rows[:, None] < N) & cmask[None, :]
    offs = rows[:, None] * D + cols[None, :]
    z = tl.load(f_ptr + offs, mask=mask, other=0.0).to(tl.float32) + \
        tl.load(dt_ptr + cols, mask=cmask, other=0.0)[None, :]
    a = tl.exp(tl.load(a_ptr + cols // K, mask=cmask, other=0.0))
    softplus = tl.where(z > 20.0, z, tl.log(1 + tl.exp(tl.minimum(z, 20.0))))
    tl.store(g_ptr + offs, -a[None, :] * softplus, mask=mask)


@triton.jit
def _decay_bwd_kernel(f_ptr, a_ptr, dt_ptr, dg_ptr, df_ptr, ddt_ptr, da_ptr, N, D, K, ROWS: tl.constexpr,
                      ITERS: tl.constexpr, BLOCK: tl.constexpr):
    """df = dg * -a * sigmoid(z); per-program column sums of df (dt_bias) and of dg * -a * softplus(z) (A_log)."""
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    cmask = cols < D
    dt = tl.load(dt_ptr + cols, mask=cmask, other=0.0)[None, :]
    a = tl.exp(tl.load(a_ptr + cols // K, mask=cmask, other=0.0))[None, :]
    ddt = tl.zeros([BLOCK], dtype=tl.float32)
    da = tl.zeros([BLOCK], dtype=tl.float32)
    for it in range(ITERS):
        rows = (pid * ITERS + it) * ROWS + tl.arange(0, ROWS)
        mask = (rows[:, None] < N) & cmask[None, :]
        offs = rows[:, None] * D + cols[None, :]
        z = tl.load(f_ptr + offs, mask=mask, other=0.0).to(tl.float32) + dt
        dg = tl.load(dg_ptr + offs, mask=mask, other=0.0)
        softplus = tl.where(z > 20.0, z, tl.log(1 + tl.exp(tl.minimum(z, 20.0))))
        dz = tl.where(mask, -a * dg * tl.sigmoid(z), 0.0)
        tl.store(df_ptr + offs, dz.to(df_ptr.dtype.element_ty), mask=mask)
        ddt += tl.sum(dz, axis=0)
        da += tl.sum(tl.where(mask, -a * dg * softplus, 0.0), axis=0)
    tl.store(ddt_ptr + pid * D + cols, ddt, mask=cmask)
    tl.store(da_ptr + pid * D + cols, da, mask=cmask)


def decay_fwd(f: torch.Tensor, a_log: torch.Tensor, dt_bias: torch.Tensor, head_dim: int) -> torch.Tensor:
    """g [N, D] fp32 from contiguous f [N, D] (D = H * head_dim), A_log [H] and dt_bias [D] (fp32)."""
    N, D = f.shape
    g = torch.empty(N, D, dtype=torch.float32, device=f.device)
    block, rows, warps = _tile(D)
    _decay_fwd_kernel[(triton.cdiv(N, rows),)](f, a_log, dt_bias, g, N, D, head_dim, ROWS=rows, BLOCK=block,
                                              num_warps=warps)
    return g


def decay_bwd(f: torch.Tensor, a_log: torch.Tensor, dt_bias: torch.Tensor, head_dim: int, dg: torch.Tensor):
    """(df in f's dtype, dA_log fp32 [H], ddt_bias fp32 [D]) of decay_fwd; dg contiguous fp32 [N, D]."""
    N, D = f.shape
    block, rows, warps = _tile(D)
    programs = triton.cdiv(N, rows * BACKWARD_TILES)
    df = torch.empty_like(f)
    ddt = torch.empty(programs, D, dtype=torch.float32, device=f.device)
    da = torch.empty(programs, D, dtype=torch.float32, device=f.device)
    _decay_bwd_kernel[(programs,)](f, a_log, dt_bias, dg, df, ddt, da, N, D, head_dim, ROWS=rows,
                                   ITERS=BACKWARD_TILES, BLOCK=block, num_warps=warps)
    return df, da.sum(0).reshape(-1, head_dim).sum(1), ddt.sum(0)
