"""Tile loads and stores shared by the forward and backward chunk kernels (Triton jit helpers, no kernels).

Every chunk kernel sees packed tokens: [TT, H, K] with TT = B*T (a padded batch is B packed sequences of length T).
A tile is a block of rows t (tokens, masked from the sequence end eos on) and columns (key or value channels, masked
from the width on) of such a row-major matrix; a state block is a [BK, BV] block of a row-major [K, V] state. The
sequential kernels hold a state as up to four [BK, BV] fp32 blocks (K <= 256), so no [64, K] tile is ever formed.
``chunk_indices[c] = (sequence n, chunk i within n)`` drives the chunk-parallel kernels (chunk_span,
sub_chunk_span); ``chunk_offsets[n]`` is the first global chunk of sequence n.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def row_tile(ptr, t, t_end, stride_t, cols, n_cols):
    """[len(t), len(cols)] tile, in the stored dtype, of rows t (0 from t_end on) and columns cols (0 from n_cols on)
    of a row-major matrix at ptr with row stride stride_t."""
    mask = (t < t_end)[:, None] & (cols < n_cols)[None, :]
    return tl.load(ptr + t[:, None] * stride_t + cols[None, :], mask=mask, other=0.)


@triton.jit
def load_rows(ptr, t, t_end, stride_t, cols, n_cols):
    """row_tile in fp32."""
    return row_tile(ptr, t, t_end, stride_t, cols, n_cols).to(tl.float32)


@triton.jit
def store_rows(ptr, x, t, t_end, stride_t, cols, n_cols):
    """The inverse of row_tile: x, cast to ptr's dtype, into rows t < t_end and columns cols < n_cols."""
    tl.store(ptr + t[:, None] * stride_t + cols[None, :], x.to(ptr.dtype.element_ty),
             mask=(t < t_end)[:, None] & (cols < n_cols)[None, :])


@triton.jit
def l2_rows(x, inv_norm, t, t_end, stride_t, USE_L2: tl.constexpr):
    """The fused q/k L2-norm: x [len(t), .] fp32 times its rows' inverse norms inv_norm[t * stride_t] (0 from t_end
    on) when USE_L2, x itself otherwise."""
    if USE_L2:
        x = x * tl.load(inv_norm + t * stride_t, mask=t < t_end, other=0.).to(tl.float32)[:, None]
    return x


@triton.jit
def tile(ptr, t, eos, stride_t, c0, n_cols, BC: tl.constexpr):
    """[len(t), BC] row_tile (stored dtype) of rows t < eos, columns c0 .. c0 + BC (masked < n_cols)."""
    return row_tile(ptr, t, eos, stride_t, c0 + tl.arange(0, BC), n_cols)


@triton.jit
def tile_t(ptr, t, eos, stride_t, c0, n_cols, BC: tl.constexpr):
    """[BC, len(t)] transposed tile: out[c, j] = M[t_j, c0 + c] (loaded transposed, no tl.trans)."""
    cols = c0 + tl.arange(0, BC)
    return tl.load(ptr + t[None, :] * stride_t + cols[:, None], mask=(t < eos)[None, :] & (cols < n_cols)[:, None],
                   other=0.)


@triton.jit
def store_tile(ptr, x, t, eos, stride_t, c0, n_cols, BC: tl.constexpr):
    """The inverse of tile (utils.store_rows)."""
    store_rows(ptr, x, t, eos, stride_t, c0 + tl.arange(0, BC), n_cols)


@triton.jit
def state_block(ptr, k0, cv, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr):
    """[BK, BV] block (stored dtype) of a row-major [K, V] state at ptr: rows k0 .. k0 + BK, columns cv."""
    ck = k0 + tl.arange(0, BK)
    return tl.load(ptr + ck[:, None] * V + cv[None, :], mask=(ck < K)[:, None] & (cv < V)[None, :], other=0.)


@triton.jit
def state_block_t(ptr, k0, cv, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr):
    """[BV, BK] transposed block of a row-major [K, V] state: out[j, c] = S[k0 + c, cv_j]."""
    ck = k0 + tl.arange(0, BK)
    return tl.load(ptr + ck[None, :] * V + cv[:, None], mask=(ck < K)[None, :] & (cv < V)[:, None], other=0.)


@triton.jit
def store_state_block(ptr, x, k0, cv, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr):
    ck = k0 + tl.arange(0, BK)
    tl.store(ptr + ck[:, None] * V + cv[None, :], x.to(ptr.dtype.element_ty),
             mask=(ck < K)[:, None] & (cv < V)[None, :])


@triton.jit
def load_state_blocks(ptr, cv, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """A row-major [K, V] state's columns cv as four fp32 [BK, BV] blocks (rows 0, BK, 2 BK, 3 BK; zeros past K)."""
    S1 = state_block(ptr, 0, cv, K, V, BK).to(tl.float32)
    S2 = tl.zeros([BK, BV], dtype=tl.float32)
    S3 = tl.zeros([BK, BV], dtype=tl.float32)
    S4 = tl.zeros([BK, BV], dtype=tl.float32)
    if K > BK:
        S2 = state_block(ptr, BK, cv, K, V, BK).to(tl.float32)
    if K > 2 * BK:
        S3 = state_block(ptr, 2 * BK, cv, K, V, BK).to(tl.float32)
    if K > 3 * BK:
        S4 = state_block(ptr, 3 * BK, cv, K, V, BK).to(tl.float32)
    return S1, S2, S3, S4


@triton.jit
def store_state_blocks(ptr, S1, S2, S3, S4, cv, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr):
    """The inverse of load_state_blocks: the blocks that lie inside K into a row-major [K, V] state at ptr."""
    store_state_block(ptr, S1, 0, cv, K, V, BK)
    if K > BK:
        store_state_block(ptr, S2, BK, cv, K, V, BK)
    if K > 2 * BK:
        store_state_block(ptr, S3, 2 * BK, cv, K, V, BK)
    if K > 3 * BK:
        store_state_block(ptr, S4, 3 * BK, cv, K, V, BK)


@triton.jit
def key_vector(ptr, k0, K: tl.constexpr, BK: tl.constexpr):
    ck = k0 + tl.arange(0, BK)
    return tl.load(ptr + ck, mask=ck < K, other=0.).to(tl.float32)


@triton.jit
def key_block_dot(X, S, t, eos, SK, k0, dt, K: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """One key block's share of X S in a walk step: X's tile [64, BK] (rows t, key columns k0 .. k0 + BK; stored
    dtype) times the state block S [BK, BV] cast to dt."""
    return tl.dot(tile(X, t, eos, SK, k0, K, BK), S.to(dt), input_precision=PREC)


@triton.jit
def key_block_dot_t(X, Z, t, eos, SK, k0, K: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """X^T Z for one key block: X's tile loaded transposed ([BK, 64]: key columns k0 .. k0 + BK, rows t) times
    Z [64, BV]."""
    return tl.dot(tile_t(X, t, eos, SK, k0, K, BK), Z, input_precision=PREC)


@triton.jit
def decayed_plus(S, pg, k0, X, Z, t, eos, SK, K: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """A state block [BK, BV] one chunk on: Diag(decay[k0 .. k0 + BK]) S + X^T Z (key_block_dot_t), with decay the
    chunk's exp(G_C) at pg."""
    return S * key_vector(pg, k0, K, BK)[:, None] + key_block_dot_t(X, Z, t, eos, SK, k0, K, BK, PREC)


@triton.jit
def chunk_span(chunk_indices, cu_seqlens, i_c):
    """(chunk i_t within its sequence, the sequence's first token bos, its end eos) of global chunk i_c."""
    i_n = tl.load(chunk_indices + 2 * i_c)
    return tl.load(chunk_indices + 2 * i_c + 1), tl.load(cu_seqlens + i_n), tl.load(cu_seqlens + i_n + 1)


@triton.jit
def sub_chunk_span(chunk_indices, cu_seqlens, i_s):
    """Program index i_s over 4 x chunks (one 16-row sub-chunk each) -> (r0, the sub-chunk's first row within its
    chunk; i_t, bos, eos as chunk_span)."""
    i_t, bos, eos = chunk_span(chunk_indices, cu_seqlens, i_s // 4)
    return (i_s % 4) * 16, i_t, bos, eos


@triton.jit
def key_head_inputs(q, k, g, b, rq, rk, i_h, K: tl.constexpr):
    """q, k, g, b ([TT, H, K]) and the inverse norms rq, rk ([TT, H]) moved to key head i_h."""
    return q + i_h * K, k + i_h * K, g + i_h * K, b + i_h * K, rq + i_h, rk + i_h
