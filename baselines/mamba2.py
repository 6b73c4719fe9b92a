"""Mamba-2: fla's Mamba2ForCausalLM folders and mamba-ssm MambaLMHeadModel folders (ssm_cfg.layer "Mamba2").

The mixer, as mamba-ssm 2.3.2 (modules/mamba2.py) and fla 0.6.0 (layers/mamba2.py) define it; same parameter names
and shapes, so one checkpoint loads into either (d = d_model, E = expand*d, H = E/P heads, G groups, N = d_state):

    in_proj   [2*d_mlp + E + (E + 2GN) + H, d]   -> (z0, x0 | z, xBC, dt); d_mlp = 0 unless mamba-ssm's d_ssm < E
    conv1d    weight [E + 2GN, 1, W], bias       depthwise causal conv over xBC, then SiLU -> (x, B, C)
    dt_bias [H], A_log [H], D [H] (or [E] when D_has_hdim)
    norm      RMSNormGated(E, group E/G): y = rmsnorm(y * silu(z)) * w   (norm_before_gate=False)
    out_proj  [d, E]

    dt = softplus(dt + dt_bias) clamped to dt_limit;  A = -exp(A_log);  per head h (group g = h // (H/G)):
    S_t = exp(A dt_t) S_{t-1} + dt_t x_t B_t^T,   y_t = S_t C_t + D x_t      (S [P, N], fp32)

Prefill runs the chunked SSD scan (baselines.mamba_common.chunk_scan); a single new token runs the recurrent step
with the conv inputs [B, E+2GN, W-1] and the SSM state [B, H, P, N] carried. On CUDA with mamba-ssm importable the
upstream Triton kernels run instead (mamba_chunk_scan_combined / selective_state_update).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from baselines.common import ShortConvolution, mask_padding
from baselines.mamba_common import (
    GroupedRMSNormGated,
    MambaLM,
    MambaLMConfig,
    RecurrentState,
    gated_norm_out,
    trapezoid_scan,
    trapezoid_step,
)
from gdn2.fused import norm_linears
from harness.model import EvalModel
from harness.registry import ModelFamily, register_family

# ------------------------------------------------------------------------------------------ mixer


@dataclass
class Mamba2MixerConfig:
    hidden_size: int
    state_size: int = 128
    expand: int = 2
    head_dim: int = 64
    n_groups: int = 1
    conv_kernel: int = 4
    use_conv_bias: bool = True
    use_bias: bool = False
    rmsnorm: bool = True
    norm_before_gate: bool = False
    norm_eps: float = 1e-5
    D_has_hdim: bool = False
    dt_limit: tuple = (0.0, float("inf"))
    chunk_size: int = 256
    d_ssm: int | None = None            # mamba-ssm only: SSM on this many channels, the rest a gated MLP

    def __post_init__(self):
        if self.d_inner % self.head_dim:
            raise ValueError(f"Mamba-2: expand*hidden_size = {self.d_inner} is not a multiple of head_dim "
                             f"{self.head_dim}")
        if self.ssm_dim % self.head_dim:
            raise ValueError(f"Mamba-2: d_ssm = {self.ssm_dim} is not a multiple of head_dim {self.head_dim}")
        if self.num_heads % self.n_groups:
            raise ValueError(f"Mamba-2: {self.num_heads} heads are not divisible into n_groups={self.n_groups}")
        self.dt_limit = tuple(float(v) for v in self.dt_limit)

    @property
    def d_inner(self) -> int:
        return int(self.expand * self.hidden_size)

    @property
    def ssm_dim(self) -> int:
        return self.d_inner if self.d_ssm is None else int(self.d_ssm)

    @property
    def num_heads(self) -> int:
        return self.ssm_dim // self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.ssm_dim + 2 * self.n_groups * self.state_size

    @property
    def d_mlp(self) -> int:
        return self.d_inner - self.ssm_dim

    def state_floats(self) -> int:
        """SSM state per layer: H * P * N (the conv inputs, (E+2GN)*(W-1), are not counted)."""
        return self.num_heads * self.head_dim * self.state_size


@dataclass
class Mamba2LayerState:
    """conv: the last W-1 inputs of the conv [B, E+2GN, W-1]; ssm: RecurrentState with ssm [B, H, P, N] fp32."""

    conv: torch.Tensor
    ssm: RecurrentState


def _mamba_ssm_kernels():
    """mamba-ssm's Mamba-2 Triton kernels, or None (import needs a `selective_scan_cuda` module; see doctor)."""
    from baselines.mamba_common import install_selective_scan_stub

    install_selective_scan_stub()
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception:  # ImportError, or a broken/absent Triton driver
        return None
    return mamba_chunk_scan_combined, selective_state_update


class Mamba2Mixer(nn.Module):
    """The Mamba-2 mixer; hidden_states [B, T, d] -> [B, T, d]. Parameter names as mamba-ssm / fla."""

    masks_padding = True       # forward(..., token_mask=): left padding passes with the state unchanged
    takes_pre_norm = True      # forward(..., norm=): the block fuses its pre-norm into in_proj

    def __init__(self, config: Mamba2MixerConfig, layer_idx: int | None = None):
        super().__init__()
        c = self.config = config
        self.layer_idx = layer_idx
        self.use_kernels = False            # set by the family on CUDA when mamba-ssm imports
        d_in_proj = 2 * c.d_mlp + c.ssm_dim + c.conv_dim + c.num_heads
        self.in_proj = nn.Linear(c.hidden_size, d_in_proj, bias=c.use_bias)
        self.conv1d = ShortConvolution(c.conv_dim, c.conv_kernel, bias=c.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(c.num_heads))
        self.A_log = nn.Parameter(torch.empty(c.num_heads))
        self.D = nn.Parameter(torch.ones(c.ssm_dim if c.D_has_hdim else c.num_heads))
        if c.rmsnorm:
            self.norm = GroupedRMSNormGated(c.ssm_dim, eps=c.norm_eps, group_size=c.ssm_dim // c.n_groups,
                                            norm_before_gate=c.norm_before_gate)
        self.out_proj = nn.Linear(c.d_inner, c.hidden_size, bias=c.use_bias)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """mamba-ssm's init for the SSM parameters (A ~ U(1, 16), dt ~ logU(1e-3, 1e-1)); linears keep torch's."""
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
        dt = (torch.rand_like(self.dt_bias) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).exp().clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.D.fill_(1.0)

    def _dt(self, dt_raw: torch.Tensor) -> torch.Tensor:
        acc = torch.float64 if dt_raw.dtype == torch.float64 else torch.float32
        dt = F.softplus(dt_raw.to(acc) + self.dt_bias.to(acc))
        lo, hi = self.config.dt_limit
        if (lo, hi) != (0.0, float("inf")):
            dt = dt.clamp(lo, hi)
        return dt

    def forward(self, hidden_states: torch.Tensor, state: Mamba2LayerState | None = None, use_cache: bool = False,
                token_mask: torch.Tensor | None = None, norm: nn.Module | None = None):
        """hidden_states [B, T, d] -> (y [B, T, d], state or None). token_mask [B, T] (0 = left padding): the conv
        inputs and outputs (x, B, C) are zero there, so the state stays zero (padding precedes every token of its
        row) and each conv window sees zeros, as at a sequence start. norm: the block's pre-norm, run with in_proj
        as one Function (gdn2.fused.norm_linears: the normed input is not kept); None: hidden_states is normed."""
        c = self.config
        Bsz, T, _ = hidden_states.shape
        H, P, G, N = c.num_heads, c.head_dim, c.n_groups, c.state_size
        z0, x0, z, xBC, dt_raw = torch.split(norm_linears(hidden_states, norm, (self.in_proj,))[0],
                                             [c.d_mlp, c.d_mlp, c.ssm_dim, c.conv_dim, H], dim=-1)
        xBC, = mask_padding(token_mask, xBC)
        xBC, conv_cache = self.conv1d(xBC, None if state is None else state.conv)
        xBC, = mask_padding(token_mask, xBC)          # the conv's bias would write silu(bias) at padding
        x, B, C = torch.split(xBC, [c.ssm_dim, G * N, G * N], dim=-1)
        x = x.reshape(Bsz, T, H, P)
        B, C = B.reshape(Bsz, T, G, N), C.reshape(Bsz, T, G, N)
        A = -torch.exp(self.A_log.to(torch.float64 if x.dtype == torch.float64 else torch.float32))
        D = self.D.reshape(H, P) if c.D_has_hdim else self.D[:, None]
        previous = None if state is None else state.ssm

        if self.use_kernels and hidden_states.is_cuda:
            y, new_ssm = self._kernel_scan(x, dt_raw, A, B, C, previous)
        else:
            dt = self._dt(dt_raw)                                                   # [B, T, H] fp32
            heads = torch.arange(H, device=x.device) // (H // G)
            Bh, Ch = B[:, :, heads].unsqueeze(2), C[:, :, heads].unsqueeze(2)        # [B, T, 1, H, N]
            if previous is not None and T == 1:
                o, new_ssm = trapezoid_step(Ch[:, 0], Bh[:, 0], x[:, 0, None], A * dt[:, 0], dt[:, 0], None, previous)
                o = o[:, None]
            else:
                o, new_ssm = trapezoid_scan(Ch, Bh, x.unsqueeze(2), A * dt, dt, None, previous, c.chunk_size)
            y = o[:, :, 0] + D.to(o.dtype) * x.to(o.dtype)                          # [B, T, H, P]
        y = y.reshape(Bsz, T, c.ssm_dim)
        if c.rmsnorm and not c.d_mlp:
            out = gated_norm_out(self.norm, self.out_proj, y, z, hidden_states.dtype)
        else:
            y = self.norm(y, z) if c.rmsnorm else y * F.silu(z.to(y.dtype))
            if c.d_mlp:
                y = torch.cat([(F.silu(z0) * x0).to(y.dtype), y], dim=-1)
            out = self.out_proj(y.to(hidden_states.dtype))
        new_state = Mamba2LayerState(conv_cache, new_ssm) if use_cache else None
        return out, new_state

    def _kernel_scan(self, x, dt_raw, A, B, C, previous: RecurrentState | None):
        """mamba-ssm's Triton kernels (CUDA only): chunked prefill, or the one-token state update."""
        c = self.config
        chunk_scan_combined, state_update = _mamba_ssm_kernels()
        D = self.D.reshape(c.num_heads, c.head_dim) if c.D_has_hdim else self.D
        limit = {} if c.dt_limit == (0.0, float("inf")) else {"dt_limit": c.dt_limit}
        if previous is not None and x.shape[1] == 1:
            H, P, N = c.num_heads, c.head_dim, c.state_size
            ssm = previous.ssm.float().clone()
            y = state_update(
                ssm, x[:, 0], dt_raw[:, 0, :, None].expand(-1, H, P), A[:, None, None].expand(H, P, N),
                B[:, 0], C[:, 0], D if c.D_has_hdim else D[:, None].expand(H, P), z=None,
                dt_bias=self.dt_bias[:, None].expand(H, P), dt_softplus=True,
            )
            return y[:, None], RecurrentState(ssm)
        initial = None if previous is None else previous.ssm.float()
        y, final = chunk_scan_combined(x, dt_raw, A, B, C, chunk_size=c.chunk_size, D=D, z=None,
                                       dt_bias=self.dt_bias, initial_states=initial, dt_softplus=True,
                                       return_final_states=True, **limit)
        return y, RecurrentState(final.float())


# ------------------------------------------------------------------------------------------ configs
def is_mamba_ssm_config(config: dict) -> bool:
    """mamba-ssm's MambaConfig as saved by MambaLMHeadModel.save_pretrained / on the hub (d_model, n_layer, ssm_cfg)."""
    return "d_model" in config and "n_layer" in config


def mamba_ssm_layer(config: dict) -> str:
    return (config.get("ssm_cfg") or {}).get("layer", "Mamba1")


def padded_vocab(config: dict) -> int:
    """mamba-ssm pads vocab_size up to a multiple of pad_vocab_size_multiple (default 8)."""
    vocab, multiple = int(config.get("vocab_size", 50277)), int(config.get("pad_vocab_size_multiple", 8))
    return vocab + (-vocab) % multiple


def check_mamba_ssm_shell(config: dict, source: str) -> None:
    if config.get("attn_layer_idx"):
        raise ValueError(f"{source}: mamba-ssm hybrid models (attn_layer_idx={config['attn_layer_idx']}) are not "
                         "supported; only pure Mamba-2 / Mamba-3 stacks load")


def mamba_ssm_lm_config(config: dict, source: str, layer: str, mixer_class, known: dict[str, str],
                        ignored: set[str]) -> MambaLMConfig:
    """MambaLMConfig of a mamba-ssm MambaLMHeadModel config.json whose ssm_cfg.layer is `layer`; `known` maps
    ssm_cfg keys to mixer-config fields, `ignored` are init-only keys; anything else is refused by name."""
    check_mamba_ssm_shell(config, source)
    if mamba_ssm_layer(config) != layer:
        raise ValueError(f"{source}: ssm_cfg.layer is {mamba_ssm_layer(config)!r}, not {layer!r}")
    ssm = dict(config.get("ssm_cfg") or {})
    ssm.pop("layer", None)
    unknown = set(ssm) - set(known) - ignored
    if unknown:
        raise ValueError(f"{source}: unsupported {layer} ssm_cfg keys {sorted(unknown)} (this loader follows "
                         f"mamba-ssm 2.3.2.post1's {layer} arguments)")
    mixer = mixer_class(hidden_size=int(config["d_model"]), **{known[k]: v for k, v in ssm.items() if k in known})
    return MambaLMConfig(
        vocab_size=padded_vocab(config), hidden_size=int(config["d_model"]), num_hidden_layers=int(config["n_layer"]),
        mixer=mixer, norm_eps=float(config.get("norm_epsilon", 1e-5)), rms_norm=bool(config.get("rms_norm", True)),
        residual_in_fp32=bool(config.get("residual_in_fp32", True)),
        tie_word_embeddings=bool(config.get("tie_embeddings", True)),
        d_intermediate=int(config.get("d_intermediate", 0) or 0), source_format="mamba_ssm",
    )


_FLA_MIXER_KEYS_M2 = {"state_size", "expand", "head_dim", "n_groups", "conv_kernel", "use_conv_bias", "use_bias",
                      "rmsnorm", "norm_before_gate", "norm_eps", "D_has_hdim", "chunk_size"}


def mamba2_configs(config: dict, source: str = "config.json") -> MambaLMConfig:
    """MambaLMConfig (with a Mamba2MixerConfig) from an fla / HF config.json or a mamba-ssm config.json."""
    if is_mamba_ssm_config(config):
        known = {"d_state": "state_size", "d_conv": "conv_kernel", "expand": "expand", "headdim": "head_dim",
                 "ngroups": "n_groups", "d_ssm": "d_ssm", "D_has_hdim": "D_has_hdim", "rmsnorm": "rmsnorm",
                 "norm_before_gate": "norm_before_gate", "dt_limit": "dt_limit", "bias": "use_bias",
                 "conv_bias": "use_conv_bias", "chunk_size": "chunk_size"}
        ignored = {"conv_init", "A_init_range", "dt_min", "dt_max", "dt_init_floor", "use_mem_eff_path",
                   "sequence_parallel", "process_group"}
        return mamba_ssm_lm_config(config, source, "Mamba2", Mamba2MixerConfig, known, ignored)
    act = config.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"{source}: Mamba-2 with hidden_act={act!r} is not supported (only silu)")
    fields = {k: config[k] for k in _FLA_MIXER_KEYS_M2 if k in config}
    limit = config.get("dt_limit", config.get("time_step_limit"))   # fla: dt_limit; transformers: time_step_limit
    if limit is not None:
        fields["dt_limit"] = tuple(limit)
    hidden = int(config.get("hidden_size", 2048))
    mixer = Mamba2MixerConfig(hidden_size=hidden, **fields)
    if config.get("num_heads") not in (None, 0, mixer.num_heads):
        raise ValueError(f"{source}: num_heads={config['num_heads']} but expand*hidden_size/head_dim = "
                         f"{mixer.num_heads}")
    return MambaLMConfig(
        vocab_size=int(config.get("vocab_size", 32000)), hidden_size=hidden,
        num_hidden_layers=int(config.get("num_hidden_layers", 48)), mixer=mixer,
        norm_eps=float(config.get("norm_eps", config.get("layer_norm_epsilon", 1e-5))),
        residual_in_fp32=bool(config.get("residual_in_fp32", True)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)), source_format="fla",
    )


def build_mamba2(config: MambaLMConfig) -> MambaLM:
    return MambaLM(config, [Mamba2Mixer(config.mixer, i) for i in range(config.num_hidden_layers)])


# ------------------------------------------------------------------------------------------ family
@register_family("mamba2")
class Mamba2Family(ModelFamily):
    model_types = ("mamba2",)
    architectures = ("Mamba2ForCausalLM",)
    loads_from = ("HF folders of fla's Mamba2ForCausalLM (config.json + safetensors); mamba-ssm MambaLMHeadModel "
                  "folders (config.json + pytorch_model.bin, ssm_cfg.layer 'Mamba2', e.g. state-spaces/mamba2-*)")

    # The paper's matched baseline (spec/gdn2.md): expand 2, head dim 64, d_state 64 at d_model 2048 -> 64 heads.
    paper_config = {"model_type": "mamba2", "hidden_size": 2048, "expand": 2, "head_dim": 64, "state_size": 64,
                    "n_groups": 1, "vocab_size": 32000}

    def claims(self, config: dict) -> bool:
        if is_mamba_ssm_config(config):
            return mamba_ssm_layer(config) == "Mamba2"
        return super().claims(config)

    def backend(self, device: torch.device) -> str:
        if device.type != "cuda":
            return "torch reference (chunked SSD + recurrent step)"
        if _mamba_ssm_kernels() is None:
            return "torch reference (mamba-ssm not importable)"
        return "mamba-ssm Triton kernels (SSD chunk scan, selective_state_update)"

    def state_floats_per_layer(self, config: dict) -> int:
        return mamba2_configs(config).mixer.state_floats()

    def load(self, source: str, device: torch.device, dtype: torch.dtype, tokenizer: str | None) -> EvalModel:
        from baselines.mamba_common import load_mamba_family

        return load_mamba_family(self, source, device, dtype, tokenizer, mamba2_configs, build_mamba2,
                                 use_kernels=device.type == "cuda" and _mamba_ssm_kernels() is not None)

    def conformance_models(self, device: torch.device | str, variant: str = ""):
        """harness/doctor.py's hook: (upstream, ours) on identical random weights, fp32: fla's Mamba2ForCausalLM
        (mamba-ssm Triton kernels, CUDA only) and our MambaLM with the kernels load() would use on `device`.
        variant "groups": n_groups = 2. Raises harness.doctor.ConformanceSkipped when the upstream cannot run here."""
        from baselines.mamba_common import fla_conformance_pair

        def needs():
            if _mamba_ssm_kernels() is None:
                return None
            import fla.layers.mamba2 as fla_mamba2
            if not fla_mamba2.is_fast_path_available:
                return ("fla.layers.mamba2 was imported before mamba_ssm could be (its torch fallback would run); "
                        "install the selective_scan_cuda stub before importing fla")
            return True

        config = {"model_type": "mamba2", "vocab_size": 256, "hidden_size": 128, "state_size": 64, "head_dim": 64,
                  "expand": 2, "n_groups": 2 if variant == "groups" else 1, "num_hidden_layers": 2,
                  "chunk_size": 64, "tie_word_embeddings": False}
        device = torch.device(device)
        upstream, ours = fla_conformance_pair(config, "Mamba2ForCausalLM", mamba2_configs, build_mamba2, device,
                                              needs=needs, use_kernels=device.type == "cuda")
        return upstream, ours

    def conformance_variants(self) -> list[str]:
        return ["", "groups"]

    def conformance_single_token_decode(self, variant: str = "") -> str:
        """fla's Mamba2 model (the doctor's upstream) raises on more than one new token once it has a cache
        ("Mamba2 cached decoding only supports a single new token per step")."""
        return "fla's Mamba2 takes one new token per cached call"
