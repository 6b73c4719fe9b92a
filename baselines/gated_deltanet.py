"""Gated DeltaNet (Yang et al., 2024): fla-format folders of GatedDeltaNetForCausalLM, and hybrids with
sliding-window attention layers where the config has an `attn` section.

Reference mixer (pure PyTorch; fla 0.6.0's fla.layers.GatedDeltaNet parameter names and shapes):

    q, k = SiLU(conv(q_proj x)), SiLU(conv(k_proj x))       [B, T, H, K]   (L2-normalised in the recurrence)
    v    = SiLU(conv(v_proj x))                             [B, T, Hv, V]  V = head_dim * expand_v
    beta = sigmoid(b_proj x)            (x2 if allow_neg_eigval)          [B, T, Hv]
    g    = -exp(A_log) * softplus(a_proj(x) + dt_bias)       (fp32)        [B, T, Hv]  scalar decay per head
    S_t  = exp(g_t) S_{t-1} + beta_t k_t (v_t - (exp(g_t) S_{t-1})^T k_t)^T;   o_t = K^-1/2 S_t^T q_t
    y    = o_proj(RMSNorm(o) * act(g_proj x))   (use_gate; act = swish or sigmoid)  or  o_proj(RMSNorm(o))

The recurrence runs through gdn2.ops with the decay broadcast over K and b = w = beta (GDN-2 reduces to GDN).
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from baselines.common import (
    PAPER_DELTA_RULE_CONFIG,
    FLAFamilyBase,
    GatedRMSNorm,
    RMSNorm,
    ShortConvolution,
    delta_rule_heads,
    gate_activation,
    gated_delta_rule,
    gated_output,
    mask_padding,
)
from gdn2.fused import norm_linears
from gdn2.layer import GDN2LayerState, inverse_softplus_dt, short_conv_qkv
from harness.registry import register_family

# fla 0.6.0 GatedDeltaNetConfig.__init__ defaults (a config.json that omits a field means these).
GDN_DEFAULTS = dict(
    attn_mode="chunk", hidden_size=2048, expand_v=2.0, use_gate=True, use_short_conv=True, allow_neg_eigval=False,
    conv_size=4, head_dim=256, num_heads=6, num_v_heads=None, max_position_embeddings=2048, hidden_ratio=4,
    intermediate_size=None, hidden_act="swish", num_hidden_layers=21, norm_eps=1e-6, attn=None,
    tie_word_embeddings=False, vocab_size=32000, output_gate_activation="swish",
)


class GatedDeltaNetMixer(nn.Module):
    """Gated DeltaNet token mixer. x [B, T, d] -> y [B, T, d]; state: GDN2LayerState (fp32 [B, Hv, K, V] + convs)."""

    takes_pre_norm = True      # forward(..., norm=): the block fuses its pre-norm into the input projections
    masks_padding = True       # forward(..., token_mask=): left padding passes with the state unchanged

    def __init__(self, hidden_size: int, expand_v: float, head_dim: int, num_heads: int, num_v_heads: int | None,
                 use_gate: bool = True, use_short_conv: bool = True, allow_neg_eigval: bool = False,
                 conv_size: int = 4, conv_bias: bool = False, norm_eps: float = 1e-5,
                 output_gate_activation: str = "swish", layer_idx: int | None = None):
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
        self.use_gate, self.use_short_conv, self.allow_neg_eigval = use_gate, use_short_conv, allow_neg_eigval
        self.layer_idx = layer_idx

        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.a_proj = nn.Linear(hidden_size, self.num_v_heads, bias=False)
        self.b_proj = nn.Linear(hidden_size, self.num_v_heads, bias=False)
        # fla: A ~ U(0, 16)
        self.A_log = nn.Parameter(torch.empty(self.num_v_heads, dtype=torch.float32).uniform_(0, 16).log())
        self.dt_bias = nn.Parameter(inverse_softplus_dt(self.num_v_heads))
        if use_short_conv:
            self.q_conv1d = ShortConvolution(self.key_dim, conv_size, bias=conv_bias)
            self.k_conv1d = ShortConvolution(self.key_dim, conv_size, bias=conv_bias)
            self.v_conv1d = ShortConvolution(self.value_dim, conv_size, bias=conv_bias)
        if use_gate:
            self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
            self.o_norm = GatedRMSNorm(self.head_v_dim, eps=norm_eps, activation=output_gate_activation)
        else:
            self.o_norm = RMSNorm(self.head_v_dim, eps=norm_eps)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    def decay(self, a: torch.Tensor) -> torch.Tensor:
        """a_proj output [B, T, Hv] -> log decay g [B, T, Hv, K] (fp32; one value per head, broadcast over K)."""
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())
        return g[..., None].expand(*a.shape, self.head_k_dim)

    def forward(self, hidden_states: torch.Tensor, state: GDN2LayerState | None = None, use_cache: bool = False,
                norm: nn.Module | None = None, token_mask: torch.Tensor | None = None):
        """hidden_states [B, T, d] -> (y [B, T, d], state or None). norm: the block's pre-norm, applied here to
        hidden_states with the input projections as one Function (gdn2.fused.norm_linears: the normed input is
        recomputed in the backward pass, not kept); None: hidden_states is already normed. token_mask [B, T]
        (0 = left padding): q, k and v are zero there (common.mask_padding), so the state stays zero and the conv
        windows see zeros, as at a sequence start."""
        B, T, _ = hidden_states.shape
        linears = (self.q_proj, self.k_proj, self.v_proj, self.b_proj, self.a_proj)
        q, k, v, b, a, *gate = norm_linears(hidden_states, norm, linears + ((self.g_proj,) if self.use_gate else ()))
        q, k, v = mask_padding(token_mask, q, k, v)
        q, k, v, conv_states = short_conv_qkv(self, hidden_states, state, (q, k, v))
        q, k, v, beta = delta_rule_heads(self, q, k, v, b)
        g = self.decay(a)
        # recompute_g: the decay again, without autograd, bit for bit; the chunk operator keeps no fp32 g
        o, recurrent = gated_delta_rule(q, k, v, g, beta, state.recurrent_state if state is not None else None,
                                        use_cache, recompute_g=functools.partial(torch.no_grad()(self.decay), a))
        if self.use_gate:
            y = gated_output(self, o, gate[0].reshape(B, T, self.num_v_heads, self.head_v_dim), hidden_states.dtype)
        else:
            y = self.o_proj(self.o_norm(o).reshape(B, T, self.value_dim).to(hidden_states.dtype))
        return y, (GDN2LayerState(recurrent, conv_states) if use_cache else None)


@register_family("gated_deltanet", "gdn")
class GatedDeltaNetFamily(FLAFamilyBase):
    model_types = ("gated_deltanet",)
    architectures = ("GatedDeltaNetForCausalLM",)
    loads_from = "fla-format HF folders of GatedDeltaNetForCausalLM (config.json + safetensors), hybrids via `attn`"
    upstream_class = "GatedDeltaNetForCausalLM"
    upstream_config_class = "GatedDeltaNetConfig"
    defaults = GDN_DEFAULTS
    paper_config = PAPER_DELTA_RULE_CONFIG
    tiny_config = dict(model_type="gated_deltanet", hidden_size=128, num_hidden_layers=2, num_heads=2, head_dim=32,
                       expand_v=2.0, vocab_size=512, intermediate_size=256, norm_eps=1e-5)

    def settings(self, config: dict, source: str = "config.json") -> dict:
        s = super().settings(config, source)
        gate_activation(s["output_gate_activation"])  # refuse unknown activations with the value
        return s

    def make_mixer(self, s: dict, layer_idx: int) -> GatedDeltaNetMixer:
        return GatedDeltaNetMixer(
            hidden_size=s["hidden_size"], expand_v=s["expand_v"], head_dim=s["head_dim"], num_heads=s["num_heads"],
            num_v_heads=s["num_v_heads"], use_gate=s["use_gate"], use_short_conv=s["use_short_conv"],
            allow_neg_eigval=s["allow_neg_eigval"], conv_size=s["conv_size"], conv_bias=False,  # fla blocks pass none
            norm_eps=s["norm_eps"], output_gate_activation=s["output_gate_activation"], layer_idx=layer_idx,
        )

    def mixer_state_floats(self, s: dict) -> int:
        num_v_heads = s["num_v_heads"] or s["num_heads"]
        return num_v_heads * s["head_dim"] * int(s["head_dim"] * s["expand_v"])

    def upstream_note(self, device: torch.device) -> str:
        """fla refuses the gated backward (chunk_bwd_dqkwg) on Hopper with Triton >= 3.4, < 3.7.1; the forward
        used for evaluation is unaffected."""
        try:
            import triton
            from packaging import version

            hopper = torch.cuda.get_device_capability(device)[0] == 9
            bad = version.parse("3.4.0") <= version.parse(triton.__version__) < version.parse("3.7.1")
        except Exception:
            return ""
        if hopper and bad:
            return f"forward only: fla refuses its gated backward on Hopper with Triton {triton.__version__}"
        return ""
