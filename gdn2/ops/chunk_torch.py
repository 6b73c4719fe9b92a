r"""Chunkwise (WY) GDN-2 in pure PyTorch: any device, autograd through torch ops.

Within a chunk of C tokens (index r = 1..C, all products elementwise over the K key channels):

    G_r = sum_{i<=r} g_i,   gamma_r = exp(G_r)
    e_r = gamma_r * b_r * k_r                        (erase factor, decay absorbed)
    z_r = w_r * v_r                                  (write factor)
    T_rs = sum_d b_rd k_rd k_sd exp(G_rd - G_sd)     for s < r (strictly lower), A = (I + T)^-1
    Y = A E,  U = A Z                                (one triangular solve serves both)
    R = U - Y S_0                                    (the corrected writes; S_0 = state entering the chunk)
    O = Q_gamma S_0 + A_qk R,   Q_gamma_r = scale * gamma_r * q_r,
                                (A_qk)_rs = scale * sum_d q_rd k_sd exp(G_rd - G_sd)  for s <= r
    S_C = Diag(gamma_C) S_0 + K_tail^T R,   K_tail_r = exp(G_C - G_r) * k_r

Exponents are always formed as differences G_r - G_s (masked to -inf above the diagonal before exp), never as
gamma_r / gamma_s, so nothing overflows however strong the decay. Everything runs in fp32 (float64 for float64
inputs); the state is carried in that dtype. Padding a sequence at its end with k = v = 0, g = 0 is exact.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from gdn2.ops.naive import check_gdn2_inputs, compute_dtype, prepare_inputs, sequence_bounds

CHUNK_SIZE = 64
SUB = 16                 # rows per block of the decayed products (_pairwise_decayed_products)


def _pairwise_budget(device: torch.device) -> int:
    """Upper bound on the elements of the largest decay temporary ([.., C, C, K] or [.., C/SUB, C, K]) built at
    once. On the CPU 2^19 (2 MiB in fp32) keeps the elementwise passes in cache: a forward of the bundled gdn2-small
    over 8 x 2,048 tokens on 2 cores takes 0.86 s in slices of 2^19 against 1.53 s in slices of 2^25 (0.79 s against
    0.84 s as eight 2,048-token forwards). On a GPU, 2^25 bounds peak memory with few launches."""
    return 1 << 19 if device.type == "cpu" else 1 << 25


def _pad_to_chunks(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """[B, T, H, D] -> [B, H, NC, C, D], zero-padding T up to a multiple of the chunk length."""
    T = x.shape[1]
    pad = (-T) % chunk
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
    B, Tp, H, D = x.shape
    return x.reshape(B, Tp // chunk, chunk, H, D).permute(0, 3, 1, 2, 4)


def _in_slices(products, left: torch.Tensor, right: torch.Tensor, G: torch.Tensor, per_item: int) -> torch.Tensor:
    """products(left, right, G) -> [n, C, C] over [..., C, K] inputs, run on slices of the flattened leading axes
    whose largest temporary (per_item elements for each item) stays within _pairwise_budget."""
    C, K = G.shape[-2:]
    flat = [x.reshape(-1, C, K) for x in (left, right, G)]
    step = max(1, _pairwise_budget(G.device) // per_item)
    parts = [products(*(x[i:i + step] for x in flat)) for i in range(0, flat[0].shape[0], step)]
    return torch.cat(parts).reshape(*G.shape[:-2], C, C)


def _pairwise_exact(left: torch.Tensor, right: torch.Tensor, G: torch.Tensor, inclusive: bool,
                    nonincreasing: bool = False) -> torch.Tensor:
    """M_rs = sum_d left_rd right_sd exp(G_rd - G_sd) for s < r (s <= r if inclusive), else 0, with every
    exponent formed as a difference. left, right, G: [..., C, K] -> [..., C, C], in slices to bound memory.
    nonincreasing (G never increases along C): every kept exponent is <= 0, so the exponents are clamped at 0 and
    the dropped pairs zeroed after the sum, one pass fewer than masking each exponent to -inf."""
    C, K = G.shape[-2:]
    mask = torch.ones(C, C, dtype=torch.bool, device=G.device).tril(0 if inclusive else -1)

    def products(lf, rt, g):
        diff = g[:, :, None, :] - g[:, None, :, :]                              # [n, C(r), C(s), K]
        if nonincreasing:
            return torch.einsum("nrk,nsk,nrsk->nrs", lf, rt, diff.clamp_max_(0).exp_()) * mask
        decay = torch.where(mask[None, :, :, None], diff, diff.new_tensor(float("-inf"))).exp()
        return torch.einsum("nrk,nsk,nrsk->nrs", lf, rt, decay)

    return _in_slices(products, left, right, G, C * C * K)


def _pairwise_decayed_products(left: torch.Tensor, right: torch.Tensor, G: torch.Tensor, inclusive: bool):
    """M_rs = sum_d left_rd right_sd exp(G_rd - G_sd) for s < r (s <= r if inclusive), else 0.

    left, right, G: [..., C, K] -> [..., C, C]. Blocks of SUB rows: a pair (r, s) with s before r's block start b
    factors as exp(G_r - G_b) exp(G_b - G_s), both exponents <= 0 since G never increases (g <= 0), so one matmul
    per block serves it without overflow; pairs inside a block take the exact pairwise form (_pairwise_exact).
    A G that increases somewhere (g > 0) takes the pairwise form everywhere.
    """
    C, K = G.shape[-2:]
    if C % SUB or C == SUB or bool((G[..., 1:, :] > G[..., :-1, :]).any()):
        return _pairwise_exact(left, right, G, inclusive)
    blocked = functools.partial(_pairwise_blocked, inclusive=inclusive)
    return _in_slices(blocked, left, right, G, C // SUB * C * K)                   # largest: [.., nb, C, K]


def _pairwise_blocked(left: torch.Tensor, right: torch.Tensor, G: torch.Tensor, inclusive: bool) -> torch.Tensor:
    """_pairwise_decayed_products for [n, C, K] inputs whose G never increases (blocks of SUB rows)."""
    C, K = G.shape[-2:]
    lead, nb = G.shape[:-2], C // SUB
    starts = G[..., ::SUB, :]                                                       # [..., nb, K]: G at b_i
    left_scaled = left * (G - starts.repeat_interleave(SUB, dim=-2)).exp()          # exp(G_r - G_b(r))
    before = torch.arange(C, device=G.device)[None, :] < torch.arange(0, C, SUB, device=G.device)[:, None]
    to_start = starts[..., :, None, :] - G[..., None, :, :]                          # [..., nb, C(s), K]
    # exp(G_b - G_s) r_s for s < b, else 0 (those exponents are >= 0: clamped to 0, then zeroed by the mask)
    right_scaled = to_start.clamp_max_(0).exp_() * (right[..., None, :, :] * before[:, :, None])
    out = left_scaled.reshape(*lead, nb, SUB, K) @ right_scaled.transpose(-1, -2)   # [..., nb, SUB, C]
    blocks = [x.reshape(*lead, nb, SUB, K) for x in (left, right, G)]
    inside = _pairwise_exact(*blocks, inclusive, nonincreasing=True)                 # [..., nb, SUB, SUB]
    out = out.clone()
    for i in range(nb):
        out[..., i, :, i * SUB:(i + 1) * SUB] = inside[..., i, :, :]
    return out.reshape(*lead, C, C)


def _chunk_gdn2_one(q, k, v, g, b, w, scale: float, state: torch.Tensor, chunk: int):
    """One sequence batch, already in the accumulation dtype. q, k, g, b [B, T, Hv, K]; v, w [B, T, Hv, V];
    state [B, Hv, K, V]. Returns o [B, T, Hv, V] and the final state."""
    T = q.shape[1]
    qc, kc, vc, gc, bc, wc = (_pad_to_chunks(x, chunk) for x in (q, k, v, g, b, w))   # [B, H, NC, C, D]
    G = gc.cumsum(-2)
    gamma = G.exp()
    erase = gamma * bc * kc
    write = wc * vc
    strict_lower = _pairwise_decayed_products(bc * kc, kc, G, inclusive=False)
    eye = torch.eye(chunk, dtype=q.dtype, device=q.device)
    Y, U = torch.linalg.solve_triangular(
        eye + strict_lower, torch.cat([erase, write], -1), upper=False, unitriangular=True
    ).split([erase.shape[-1], write.shape[-1]], -1)
    A_qk = _pairwise_decayed_products(qc * scale, kc, G, inclusive=True)
    q_gamma = qc * scale * gamma
    k_tail = (G[..., -1:, :] - G).exp() * kc
    gamma_last = gamma[..., -1, :]

    outputs = []
    for n in range(qc.shape[2]):
        R = U[:, :, n] - Y[:, :, n] @ state
        outputs.append(q_gamma[:, :, n] @ state + A_qk[:, :, n] @ R)
        state = gamma_last[:, :, n, :, None] * state + k_tail[:, :, n].transpose(-1, -2) @ R
    o = torch.stack(outputs, 2)                                                    # [B, H, NC, C, V]
    o = o.permute(0, 2, 3, 1, 4).reshape(q.shape[0], -1, o.shape[1], o.shape[-1])[:, :T]
    return o, state


def torch_chunk_gdn2(
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
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise GDN-2 (shapes as in naive_recurrent_gdn2). Returns o [B, T, Hv, V] and final state [N, Hv, K, V]."""
    N = check_gdn2_inputs(q, k, v, g, b, w, initial_state, cu_seqlens)
    B, T, H, K = q.shape
    Hv, V = v.shape[2], v.shape[3]
    out_dtype = v.dtype
    acc = compute_dtype(out_dtype)
    q, k, g, b, v, w, scale = prepare_inputs(q, k, v, g, b, w, scale, use_qk_l2norm_in_kernel, acc)
    if initial_state is None:
        initial_state = q.new_zeros(N, Hv, K, V)
    initial_state = initial_state.to(acc)

    if cu_seqlens is None:
        o, final_state = _chunk_gdn2_one(q, k, v, g, b, w, scale, initial_state, chunk_size)
    else:
        pieces, states = [], []
        for n, (_, start, end) in enumerate(sequence_bounds(cu_seqlens, B, T)):
            seg = [x[:, start:end] for x in (q, k, v, g, b, w)]
            o_n, s_n = _chunk_gdn2_one(*seg, scale, initial_state[n:n + 1], chunk_size)
            pieces.append(o_n)
            states.append(s_n)
        o, final_state = torch.cat(pieces, 1), torch.cat(states)
    return o.to(out_dtype), (final_state if output_final_state else None)
