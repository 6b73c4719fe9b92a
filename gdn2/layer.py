"""The GDN-2 token mixer (as in the official code; parameter names match it and fla's GatedDeltaNet2).

x [B, T, d] -> q, k = L2norm(SiLU(conv(W_q x))), SiLU(conv(W_k x))   [B, T, H, K]
               v = SiLU(conv(W_v x))                                 [B, T, Hv, V]
               g = -exp(A_log) * softplus(f_proj(x) + dt_bias)       [B, T, H, K]  (fp32, low-rank f_proj)
               b = sigmoid(b_proj x) (x2 if allow_neg_eigval),  w = sigmoid(w_proj x)
               (erase_gate / write_gate "scalar": one gate per head, broadcast over K / V: the paper's
               Table 5 ablations; "channel" is GDN-2)
            o = GDN-2(q, k, v, g, b, w);  y = o_proj(RMSNorm(o) * act(g_proj x)),  act = SiLU (or sigmoid)
               (one autograd Function, gdn2.fused.gated_rms_norm_linear: the normed output is not kept)
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gdn2.configuration import GATE_GRANULARITIES
from gdn2.fused import causal_conv_silu as causal_conv_silu  # noqa: F401  (the torch reference, re-exported)
from gdn2.fused import (
    decay,
    decay_again,
    gated_rms_norm,
    gated_rms_norm_linear,
    norm_linears,
    plain,
    short_conv_silu,
)
from gdn2.ops import chunk_gdn2, recurrent_step_gdn2

# Prompts up to this many tokens continue a cached state with the recurrent kernel instead of the chunkwise one.
RECURRENT_MAX_TOKENS = 16


@dataclass
class GDN2LayerState:
    """What one GDN-2 mixer carries between calls.

    recurrent_state: [B, Hv, K, V] fp32.  conv_states: (q, k, v) inputs of the last conv_size - 1 tokens,
    each [B, D, conv_size - 1] with D = H*K, H*K, Hv*V (None without short convs).
    """

    recurrent_state: torch.Tensor
    conv_states: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None


def inverse_softplus_dt(n: int) -> torch.Tensor:
    """dt_bias init shared by the delta-rule family: softplus^-1(dt), dt ~ logU(1e-3, 1e-1) clamped >= 1e-4. [n] fp32"""
    log_dt = torch.rand(n) * (math.log(0.1) - math.log(0.001)) + math.log(0.001)
    dt = log_dt.exp().clamp(min=1e-4)
    return dt + torch.log(-torch.expm1(-dt))


def short_conv_qkv(mixer: nn.Module, x: torch.Tensor, state, projections: tuple | None = None) -> tuple:
    """q, k, v = SiLU(conv(W x)) for a mixer with q/k/v_proj and (if use_short_conv) q/k/v_conv1d, continuing the
    conv inputs carried in state.conv_states; projections: (W_q x, W_k x, W_v x) when already computed (x unused).
    Returns (q, k, v, conv_states or None); shapes [B, T, D]."""
    if projections is None:
        projections = (mixer.q_proj(x), mixer.k_proj(x), mixer.v_proj(x))
    if not mixer.use_short_conv:
        return (*(F.silu(p) for p in projections), None)
    carried = state.conv_states if state is not None and state.conv_states is not None else (None,) * 3
    (q, cq), (k, ck), (v, cv) = (conv(p, c) for conv, p, c in
                                 zip((mixer.q_conv1d, mixer.k_conv1d, mixer.v_conv1d), projections, carried,
                                     strict=True))
    return q, k, v, (cq, ck, cv)


class ShortConvolution(nn.Module):
    """Depthwise causal conv over time followed by SiLU. weight [D, 1, W] (nn.Conv1d's layout and fla's)."""

    def __init__(self, hidden_size: int, kernel_size: int, bias: bool = False):
        super().__init__()
        self.hidden_size, self.kernel_size = hidden_size, kernel_size
        self.weight = nn.Parameter(torch.empty(hidden_size, 1, kernel_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D], cache [B, D, W-1] (the previous inputs; zeros when None) -> (y [B, T, D], new cache).
        With autograd only x is kept (gdn2.fused.short_conv_silu: the conv is recomputed in the backward pass)."""
        B, T, D = x.shape
        if cache is None:
            cache = x.new_zeros(B, D, self.kernel_size - 1)
        y = short_conv_silu(x, cache, self.weight, self.bias)
        # a copy, not a view: a view would keep the whole [B, T, D] input alive in the decoding cache
        if T >= self.kernel_size - 1:
            new_cache = x[:, T - (self.kernel_size - 1):].transpose(1, 2).clone(memory_format=torch.contiguous_format)
        else:
            new_cache = torch.cat([cache.to(x.dtype), x.transpose(1, 2)], dim=-1)[..., T:].contiguous()
        return y, new_cache


class GatedRMSNorm(nn.Module):
    """RMSNorm over the last axis (one weight shared by heads) times act(gate). Computed in fp32."""

    def __init__(self, dim: int, eps: float, activation: str):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.activation = activation

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(x, gate, self.weight, self.eps, self.activation)


class GatedDeltaNet2(nn.Module):
    """GDN-2 mixer. Shapes: x [B, T, hidden_size] -> [B, T, hidden_size]."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        expand_v: float = 1.0,
        num_v_heads: int | None = None,
        conv_size: int = 4,
        use_short_conv: bool = True,
        allow_neg_eigval: bool = False,
        output_gate_activation: str = "silu",
        norm_eps: float = 1e-5,
        layer_idx: int | None = None,
        erase_gate: str = "channel",
        write_gate: str = "channel",
    ):
        super().__init__()
        for name, value in (("erase_gate", erase_gate), ("write_gate", write_gate)):
            if value not in GATE_GRANULARITIES:
                raise ValueError(f"{name} must be one of {GATE_GRANULARITIES}; got {value!r}")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_v_heads = num_heads if num_v_heads is None else num_v_heads
        self.head_k_dim = head_dim
        self.head_v_dim = int(head_dim * expand_v)
        self.key_dim = self.num_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.use_short_conv = use_short_conv
        self.allow_neg_eigval = allow_neg_eigval
        self.conv_size = conv_size
        self.layer_idx = layer_idx
        self.erase_gate, self.write_gate = erase_gate, write_gate
        self.recompute_chunk = False     # set by chunk_recompute_enable(): chunk intermediates recomputed in backward

        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        if use_short_conv:
            self.q_conv1d = ShortConvolution(self.key_dim, conv_size)
            self.k_conv1d = ShortConvolution(self.key_dim, conv_size)
            self.v_conv1d = ShortConvolution(self.value_dim, conv_size)
        self.f_proj = nn.Sequential(
            nn.Linear(hidden_size, self.head_v_dim, bias=False),
            nn.Linear(self.head_v_dim, self.key_dim, bias=False),
        )
        self.b_proj = nn.Linear(hidden_size, self.key_dim if erase_gate == "channel" else self.num_heads, bias=False)
        self.w_proj = nn.Linear(hidden_size, self.value_dim if write_gate == "channel" else self.num_v_heads,
                                bias=False)
        self.A_log = nn.Parameter(torch.empty(self.num_heads, dtype=torch.float32))
        self.A_log._no_weight_decay = True
        self.dt_bias = nn.Parameter(torch.empty(self.key_dim, dtype=torch.float32))
        self.dt_bias._no_weight_decay = True
        self.g_proj = nn.Sequential(
            nn.Linear(hidden_size, self.head_v_dim, bias=False),
            nn.Linear(self.head_v_dim, self.value_dim, bias=True),
        )
        self.o_norm = GatedRMSNorm(self.head_v_dim, eps=norm_eps, activation=output_gate_activation)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Official init: Xavier-uniform (gain 2^-2.5) linears, zero biases, A ~ U(1, 16), dt ~ logU(1e-3, 1e-1)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight, gain=2 ** -2.5)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
        self.dt_bias.copy_(inverse_softplus_dt(self.dt_bias.numel()))

    def input_projections(self, hidden_states: torch.Tensor, norm: nn.Module | None = None) -> tuple:
        """(W_q x, W_k x, W_v x, f_proj(x), b_proj(x), w_proj(x), g_proj(x)) [B, T, *] of x = hidden_states, or of
        x = norm(hidden_states) for a plain RMSNorm `norm` (weight, eps; the caller checks, gdn2.fused.plain): then it
        runs with the seven linears reading it as one Function (gdn2.fused.rms_norm_linears) that does not keep the
        normed x for the backward pass."""
        linears = (self.q_proj, self.k_proj, self.v_proj, self.f_proj[0], self.b_proj, self.w_proj, self.g_proj[0])
        q, k, v, f, b, w, g = norm_linears(hidden_states, norm, linears)
        return q, k, v, self.f_proj[1](f), b, w, self.g_proj[1](g)

    def forward(
        self, hidden_states: torch.Tensor, state: GDN2LayerState | None = None, use_cache: bool = False,
        token_mask: torch.Tensor | None = None, norm: nn.Module | None = None,
    ) -> tuple[torch.Tensor, GDN2LayerState | None]:
        """hidden_states [B, T, d]; state: the carried state (None at the start of a sequence); token_mask [B, T]
        (1 = token, 0 = left padding; None: all tokens): padding leaves the state and the conv inputs as they were.
        norm: the block's pre-norm, applied here to hidden_states with the input projections (see
        input_projections; not with token_mask). Returns y [B, T, d] and the state after the last token (when
        use_cache, else None)."""
        B, T, _ = hidden_states.shape
        if token_mask is not None:     # zero inputs: q = k = v = 0 there and the short convs carry zeros
            if norm is not None:
                raise ValueError("the mixer takes a pre-norm to fuse only without token_mask: pass norm(x)")
            hidden_states = hidden_states * token_mask[..., None].to(hidden_states.dtype)
        q, k, v, f, b, w, gate = self.input_projections(hidden_states, norm)
        q, k, v, conv_states = short_conv_qkv(self, hidden_states, state, (q, k, v))
        g = decay(f, self.A_log, self.dt_bias, self.head_k_dim)
        b = b.sigmoid()
        if self.allow_neg_eigval:
            b = b * 2.0
        w = w.sigmoid()

        q, k, g = (x.reshape(B, T, self.num_heads, self.head_k_dim) for x in (q, k, g))
        v = v.reshape(B, T, self.num_v_heads, self.head_v_dim)
        b = b.reshape(B, T, self.num_heads, -1).expand(B, T, self.num_heads, self.head_k_dim)
        w = w.reshape(B, T, self.num_v_heads, -1).expand(B, T, self.num_v_heads, self.head_v_dim)
        previous = state.recurrent_state if state is not None else None
        if token_mask is not None:     # no decay at padding; with k = 0 the delta update is zero, so S passes unchanged
            g = g * token_mask[:, :, None, None].to(g.dtype)
        if previous is not None and T <= RECURRENT_MAX_TOKENS and not torch.is_grad_enabled():
            recurrent = previous if use_cache else previous.clone()
            o, recurrent = recurrent_step_gdn2(q, k, v, g, b, w, recurrent, use_qk_l2norm_in_kernel=True)
        else:
            # without padding g is the decay gate's output: recomputed from f (kept by the gate) in the backward
            # pass instead of kept (fp32, 8 KB per token at the 1.3B shapes)
            again = None if token_mask is not None else functools.partial(decay_again, f, self.A_log, self.dt_bias,
                                                                           self.head_k_dim)
            o, recurrent = chunk_gdn2(
                q, k, v, g, b, w, initial_state=previous, output_final_state=use_cache, use_qk_l2norm_in_kernel=True,
                recompute_in_backward=self.recompute_chunk, recompute_g=again,
            )
        gate = gate.reshape(B, T, self.num_v_heads, self.head_v_dim)
        if plain(self.o_norm, GatedRMSNorm) and plain(self.o_proj, nn.Linear):
            # o_proj(o_norm(o, gate)) without keeping the normed output for o_proj's weight gradient (recomputed)
            y = gated_rms_norm_linear(o, gate, self.o_norm.weight, self.o_proj.weight, self.o_norm.eps,
                                      self.o_norm.activation)
        else:
            y = self.o_proj(self.o_norm(o, gate).reshape(B, T, self.value_dim))
        new_state = GDN2LayerState(recurrent, conv_states) if use_cache else None
        return y, new_state
