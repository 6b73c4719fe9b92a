"""Kimi Delta Attention (KDA; Kimi Linear, 2025): fla-format folders of KDAForCausalLM, and hybrids with
sliding-window attention layers where the config has an `attn` section.

Reference mixer (pure PyTorch; fla 0.6.0's fla.layers.KimiDeltaAttention parameter names and shapes):

    q, k = SiLU(conv(q_proj x)), SiLU(conv(k_proj x))        [B, T, H, K]   (L2-normalised in the recurrence)
    v    = SiLU(conv(v_proj x))                              [B, T, Hv, V]
    beta = sigmoid(b_proj x)             (x2 if allow_neg_eigval)          [B, T, Hv]
    g    = -exp(A_log) * softplus(f_proj(x) + dt_bias)       per key channel, per VALUE head [B, T, Hv, K] (fp32)
           (with lower_bound set: g = lower_bound * sigmoid(exp(A_log) * (f_proj(x) + dt_bias)))
    S_t  = Diag(exp g_t) S_{t-1} + beta_t k_t (v_t - (Diag(exp g_t) S_{t-1})^T k_t)^T;   o_t = K^-1/2 S_t^T q_t
    y    = o_proj(RMSNorm(o) * sigmoid(g_proj x))        f_proj, g_proj low-rank (d -> V -> ...), g_proj with bias

The recurrence runs through gdn2.ops with b = w = beta (GDN-2 reduces to KDA).
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn

from baselines.common import (
    PAPER_DELTA_RULE_CONFIG,
    FLAFamilyBase,
    GatedRMSNorm,
    ShortConvolution,
    delta_rule_heads,
    gated_delta_rule,
    gated_output,
    mask_padding,
)
from gdn2.fused import decay as gdn2_decay
from gdn2.fused import norm_linears
from gdn2.layer import GDN2LayerState, inverse_softplus_dt, short_conv_qkv
from harness.registry import register_family

# fla 0.6.0 KDAConfig.__init__ defaults (a config.json that omits a field means these).
KDA_DEFAULTS = dict(
    attn_mode="chunk", hidden_size=2048, expand_v=1.0, use_short_conv=True, allow_neg_eigval=False, safe_gate=False,
    lower_bound=None, conv_size=4, head_dim=128, num_heads=16, num_v_heads=None, max_position_embeddings=2048,
    hidden_ratio=4, intermediate_size=None, hidden_act="swish", num_hidden_layers=24, norm_eps=1e-6, attn=None,
    tie_word_embeddings=False, vocab_size=32000,
)


class KDAMixer(nn.Module):
    """KDA token mixer. x [B, T, d] -> y [B, T, d]; state: GDN2LayerState (fp32 [B, Hv, K, V] + conv inputs)."""

    takes_pre_norm = True      # forward(..., norm=): the block fuses its pre-norm into the input projections
    masks_padding = True       # forward(..., token_mask=): left padding passes with the state unchanged

    def __init__(self, hidden_size: int, expand_v: float, head_dim: int, num_heads: int, num_v_heads: int | None,
                 use_short_conv: bool = True, allow_neg_eigval: bool = False, safe_gate: bool = False,
                 lower_bound: float | None = None, conv_size: int = 4, conv_bias: bool = False,
                 norm_eps: float = 1e-5, layer_idx: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.num_v_heads = num_heads if num_v_heads is None else num_v_heads
        if self.num_v_heads % num_heads != 0:
            raise ValueError(f"num_v_heads={self.num_v_heads} must be a multiple of num_heads={num_heads}")
        self.head_k_dim = head_dim
        self.head_v_dim = int(head_dim * expand_v)
        if self.head_v_dim != head_dim * expand_v:
            raise ValueError(f"head_dim * expand_v must be an integer; got {head_dim} * {expand_v}")
        self.key_dim = num_heads * head_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.gate_dim = self.num_v_heads * head_dim
        self.use_short_conv, self.allow_neg_eigval = use_short_conv, allow_neg_eigval
        self.lower_bound = lower_bound
        self.layer_idx = layer_idx

        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        if use_short_conv:
            self.q_conv1d = ShortConvolution(self.key_dim, conv_size, bias=conv_bias)
            self.k_conv1d = ShortConvolution(self.key_dim, conv_size, bias=conv_bias)
            self.v_conv1d = ShortConvolution(self.value_dim, conv_size, bias=conv_bias)
        self.f_proj = nn.Sequential(nn.Linear(hidden_size, self.head_v_dim, bias=False),
                                    nn.Linear(self.head_v_dim, self.gate_dim, bias=False))
        self.b_proj = nn.Linear(hidden_size, self.num_v_heads, bias=False)
        A = torch.zeros(self.num_v_heads) if safe_gate else torch.empty(self.num_v_heads).uniform_(1, 16).log()
        self.A_log = nn.Parameter(A.float())
        self.dt_bias = nn.Parameter(inverse_softplus_dt(self.gate_dim))
        self.g_proj = nn.Sequential(nn.Linear(hidden_size, self.head_v_dim, bias=False),
                                    nn.Linear(self.head_v_dim, self.value_dim, bias=True))
        self.o_norm = GatedRMSNorm(self.head_v_dim, eps=norm_eps, activation="sigmoid")
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    def decay(self, f: torch.Tensor) -> torch.Tensor:
        """f_proj output [B, T, Hv*K] -> log decay g [B, T, Hv, K] (fp32). Without lower_bound it is GDN-2's decay
        (gdn2.fused.decay: one Triton kernel per pass on CUDA, keeping only f for the backward pass)."""
        B, T, _ = f.shape
        if self.lower_bound is None:
            return gdn2_decay(f, self.A_log, self.dt_bias, self.head_k_dim).view(B, T, self.num_v_heads,
                                                                                self.head_k_dim)
        x = (f.float() + self.dt_bias.float()).view(B, T, self.num_v_heads, self.head_k_dim)
        return self.lower_bound * torch.sigmoid(self.A_log.float().exp()[:, None] * x)

    def forward(self, hidden_states: torch.Tensor, state: GDN2LayerState | None = None, use_cache: bool = False,
                norm: nn.Module | None = None, token_mask: torch.Tensor | None = None):
        """hidden_states [B, T, d] -> (y [B, T, d], state or None). norm: the block's pre-norm, applied here to
        hidden_states with the input projections as one Function (gdn2.fused.norm_linears: the normed input is
        recomputed in the backward pass, not kept); None: hidden_states is already normed. token_mask [B, T]
        (0 = left padding): q, k and v are zero there (common.mask_padding), so the state stays zero and the conv
        windows see zeros, as at a sequence start."""
        B, T, _ = hidden_states.shape
        linears = (self.q_proj, self.k_proj, self.v_proj, self.b_proj, self.f_proj[0], self.g_proj[0])
        q, k, v, b, f, g = norm_linears(hidden_states, norm, linears)
        q, k, v = mask_padding(token_mask, q, k, v)
        q, k, v, conv_states = short_conv_qkv(self, hidden_states, state, (q, k, v))
        q, k, v, beta = delta_rule_heads(self, q, k, v, b)
        f = self.f_proj[1](f)
        decay = self.decay(f)
        # recompute_g: the decay again, without autograd, bit for bit; the chunk operator keeps no fp32 g
        o, recurrent = gated_delta_rule(q, k, v, decay, beta, state.recurrent_state if state is not None else None,
                                        use_cache, recompute_g=functools.partial(torch.no_grad()(self.decay), f))
        gate = self.g_proj[1](g).reshape(B, T, self.num_v_heads, self.head_v_dim)
        y = gated_output(self, o, gate, hidden_states.dtype)
        return y, (GDN2LayerState(recurrent, conv_states) if use_cache else None)


@register_family("kda", "kimi_delta_attention")
class KDAFamily(FLAFamilyBase):
    model_types = ("kda",)
    architectures = ("KDAForCausalLM",)
    loads_from = "fla-format HF folders of KDAForCausalLM (config.json + safetensors), hybrids via `attn`"
    upstream_class = "KDAForCausalLM"
    upstream_config_class = "KDAConfig"
    defaults = KDA_DEFAULTS
    paper_config = PAPER_DELTA_RULE_CONFIG
    tiny_config = dict(model_type="kda", hidden_size=128, num_hidden_layers=2, num_heads=2, head_dim=32,
                       expand_v=1.0, vocab_size=512, intermediate_size=256, norm_eps=1e-5)

    def settings(self, config: dict, source: str = "config.json") -> dict:
        s = super().settings(config, source)
        if s["safe_gate"] and s["lower_bound"] is None:
            from baselines.common import ConfigError

            raise ConfigError(f"{source}: safe_gate=true needs lower_bound (fla's KDAConfig refuses it too)")
        return s

    def make_mixer(self, s: dict, layer_idx: int) -> KDAMixer:
        return KDAMixer(
            hidden_size=s["hidden_size"], expand_v=s["expand_v"], head_dim=s["head_dim"], num_heads=s["num_heads"],
            num_v_heads=s["num_v_heads"], use_short_conv=s["use_short_conv"], allow_neg_eigval=s["allow_neg_eigval"],
            safe_gate=s["safe_gate"], lower_bound=s["lower_bound"], conv_size=s["conv_size"],
            conv_bias=False, norm_eps=s["norm_eps"], layer_idx=layer_idx,  # fla blocks pass no conv_bias
        )

    def mixer_state_floats(self, s: dict) -> int:
        num_v_heads = s["num_v_heads"] or s["num_heads"]
        return num_v_heads * s["head_dim"] * int(s["head_dim"] * s["expand_v"])
