r"""The decay inside a chunk: exp(G_r - G_s) split at reference points (Triton jit helpers shared by forward and
backward).

G_r = sum_{i<=r} g_i is the chunk-local inclusive cumsum of the per-channel log decay g (fp32), so G never increases
(g <= 0) and exp(G_r - G_s) <= 1 for s <= r. The pairwise products T_rs = sum_d (b k)_rd k_sd exp(G_rd - G_sd) and
Aqk_rs = scale sum_d q_rd k_sd exp(G_rd - G_sd) run on the tensor cores only if the exponent is split into a row
factor and a column factor, exp(G_r - G_s) = exp(G_r - c) exp(c - G_s), with every factor bounded:

- Earlier sub-chunk j against the rows r of sub-chunk i (16 rows each), with cb_i / ce_j = G before sub-chunk i / at
  the last row of j: exp(G_r - cb_i) * exp(cb_i - ce_j) * exp(ce_j - G_s), all three <= 1.
- Inside a sub-chunk (the diagonal [16, 16] blocks), m halfway between G before the sub-chunk and G at its last row:
  exp(G_r - m) * exp(m - G_s), each <= e^40 on the "midpoint channels" (g in [MIDPOINT_G_MIN, 0] on the sub-chunk's
  rows). The other channels take the exact form, exp(G_r - G_s) elementwise with s > r masked to -inf, row by row
  (diag_exact_fwd; the exact_diag kernels).
- A whole chunk at once (the wy kernel with SOLVE_A): m halfway between the channel's largest and smallest G in the
  chunk, on the channels whose G spans at most CHUNK_SPAN; the others ("wide") row by row with exact exponentials.

Either way the result is exp(G_r - G_s) up to rounding, never gamma_r * (1 / gamma_s). The choice of channel form uses
tl.min / tl.max of g, which are exact, so the forward, the backward and the exact kernels always agree on it.
"""
from __future__ import annotations

import triton
import triton.language as tl

from gdn2.ops.triton.tiles import l2_rows, load_rows

# The diagonal blocks' midpoint form holds on the channels whose g stays in [MIDPOINT_G_MIN, 0] on all 16 rows of a
# sub-chunk: G moves by at most 80 across it, so with m halfway each factor is <= e^40 (~2e17), and the masked s > r
# terms stay finite (<= e^80 |b k| |k|). A per-token decay below e^-5 = 0.0067 is rare in trained models but legal.
MIDPOINT_G_MIN = tl.constexpr(-5.0)
# The chunk-level midpoint form (the wy kernel with SOLVE_A) holds on the channels whose G moves by at most CHUNK_SPAN
# over the 64 rows (an average g of -2.5 per token): each factor within e^(+-80) (fp32 max ~e^88.7, smallest normal
# ~e^-87.3).
CHUNK_SPAN = tl.constexpr(160.0)


@triton.jit
def load_sub_chunk(q, k, g, b, rq, rk, t, eos, carry, cols, scale, SK, SH, K: tl.constexpr, USE_L2: tl.constexpr):
    """One 16-row sub-chunk, one K slice: G (cumsum continued from `carry`), the new carry (G at its last row),
    scale*q, k, b*k and g itself."""
    gb = load_rows(g, t, eos, SK, cols, K)
    G = tl.cumsum(gb, 0) + carry[None, :]
    kb = load_rows(k, t, eos, SK, cols, K)
    qb = load_rows(q, t, eos, SK, cols, K)
    kb = l2_rows(kb, rk, t, eos, SH, USE_L2)
    qb = l2_rows(qb, rq, t, eos, SH, USE_L2)
    bk = load_rows(b, t, eos, SK, cols, K) * kb
    return G, carry + tl.sum(gb, 0), qb * scale, kb, bk, gb


@triton.jit
def chunk_cumsum(g, t, eos, SK, cols, K: tl.constexpr):
    """G [64, BK], the chunk-local inclusive cumsum of g on rows t and channels cols, its largest and smallest value
    per channel [BK], and g itself (0 on rows past eos and channels past K)."""
    gt = load_rows(g, t, eos, SK, cols, K)
    G = tl.cumsum(gt, 0)
    return G, tl.max(G, 0), tl.min(G, 0), gt


@triton.jit
def midpoint_channels(gb):
    """[16, BK] g rows of a sub-chunk -> [BK]: the channels on the midpoint form, g in [MIDPOINT_G_MIN, 0] on every
    row (tl.min / tl.max are exact, so every kernel makes the same choice); exact_channels is the complement."""
    return (tl.min(gb, 0) >= MIDPOINT_G_MIN) & (tl.max(gb, 0) <= 0.)


@triton.jit
def exact_channels(gb):
    return (tl.min(gb, 0) < MIDPOINT_G_MIN) | (tl.max(gb, 0) > 0.)


@triton.jit
def midpoint_factors(G, c0, c1, on):
    """exp(G - m) and exp(m - G) for a sub-chunk's [16, BK] G, m = (c0 + c1) / 2 halfway between G before the
    sub-chunk (c0) and at its last row (c1); 0 on the channels where `on` [BK] is false."""
    m = ((c0 + c1) * 0.5)[None, :]
    on2 = on[None, :]
    return tl.exp(tl.where(on2, G - m, float("-inf"))), tl.exp(tl.where(on2, m - G, float("-inf")))


@triton.jit
def diag_row(q, k, g, b, rq, rk, tr, ok, r, cols, G_r, Gs, scale, SK, H, K: tl.constexpr, USE_L2: tl.constexpr):
    """Row r (token tr, 0 past eos) of a sub-chunk for the exact diagonal blocks (forward and backward): the running
    G_r and the [16, .] tile Gs with its row r set to it, e_rs = exp(G_r - G_s) for s <= r (0 above), scale q_r and
    (b k)_r (q, k scaled by their inverse L2 norms if fused). Gs has one row per row of the block (16, or 64)."""
    r16 = tl.arange(0, Gs.shape[0])
    G_r += tl.load(g + tr * SK + cols, mask=(cols < K) & ok, other=0.)
    Gs = tl.where((r16 == r)[:, None], G_r[None, :], Gs)
    kr = tl.load(k + tr * SK + cols, mask=(cols < K) & ok, other=0.).to(tl.float32)
    qr = tl.load(q + tr * SK + cols, mask=(cols < K) & ok, other=0.).to(tl.float32) * scale
    if USE_L2:
        kr = kr * tl.load(rk + tr * H, mask=ok, other=0.)
        qr = qr * tl.load(rq + tr * H, mask=ok, other=0.)
    bkr = tl.load(b + tr * SK + cols, mask=(cols < K) & ok, other=0.).to(tl.float32) * kr
    e = tl.exp(tl.where((r16 <= r)[:, None], G_r[None, :] - Gs, float("-inf")))
    return G_r, Gs, e, qr, bkr


@triton.jit
def diag_exact_fwd(q, k, g, b, rq, rk, t0, eos, cols, kt, exact, Tx, Qx, scale, SK, H, K: tl.constexpr,
                   BK: tl.constexpr, USE_L2: tl.constexpr):
    """Tx, Qx plus the diagonal [16, 16] blocks of T (s <= r; the caller masks s = r) and Aqk summed over the `exact`
    channels [BK] only, row by row with exact exponentials. kt: the sub-chunk's k rows [16, BK] (or a whole chunk's,
    [64, BK], with [64, 64] Tx, Qx: then the chunk's blocks, rows from t0 on)."""
    NR: tl.constexpr = kt.shape[0]
    r16 = tl.arange(0, NR)
    G_r = tl.zeros([BK], dtype=tl.float32)
    Gs = tl.zeros([NR, BK], dtype=tl.float32)
    for r in range(NR):
        tr = t0 + r
        G_r, Gs, e, qr, bkr = diag_row(q, k, g, b, rq, rk, tr, tr < eos, r, cols, G_r, Gs, scale, SK, H, K, USE_L2)
        right = kt * tl.where(exact[None, :], e, 0.)
        row = (r16 == r)[:, None]
        Tx = tl.where(row, Tx + tl.sum(right * bkr[None, :], 1)[None, :], Tx)
        Qx = tl.where(row, Qx + tl.sum(right * qr[None, :], 1)[None, :], Qx)
    return Tx, Qx


@triton.jit
def chunk_key_side(q, k, g, b, rq, rk, t, eos, cols, scale, SK, SH, K: tl.constexpr, USE_L2: tl.constexpr):
    """Full-K tiles of one chunk: G [64, BK], decay exp(G_C) [BK], E = e^G b k, Q = scale e^G q, Kt = e^(G_C-G) k."""
    gt = load_rows(g, t, eos, SK, cols, K)
    G = tl.cumsum(gt, 0)
    G_last = tl.sum(gt, 0)
    kt = load_rows(k, t, eos, SK, cols, K)
    qt = load_rows(q, t, eos, SK, cols, K)
    kt = l2_rows(kt, rk, t, eos, SH, USE_L2)
    qt = l2_rows(qt, rq, t, eos, SH, USE_L2)
    bt = load_rows(b, t, eos, SK, cols, K)
    gamma = tl.exp(G)
    E = gamma * bt * kt
    Q = gamma * qt * scale
    Kt = tl.exp(G_last[None, :] - G) * kt
    return G, G_last, E, Q, Kt, qt, kt, bt
