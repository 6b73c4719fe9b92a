"""Mamba-3 (SISO and MIMO): fla's Mamba3ForCausalLM folders and mamba-ssm folders (ssm_cfg.layer "Mamba3").

The mixer as mamba-ssm 2.3.2.post1 defines it (modules/mamba3.py + ops/triton/mamba3 + ops/tilelang/mamba3; fla 0.6.0's
layers/mamba3.py wraps the same kernels with the same parameter names). d = d_model, E = expand*d, H = E/P heads,
G = ngroups (B/C heads), N = d_state, R = mimo_rank (1 for SISO), A = num_rope_angles = (N*rope_fraction)//2:

    in_proj  [2E + 2*N*G*R + 3H + A, d] -> z [E], x [E], B [R,G,N], C [R,G,N], dd_dt [H], dd_A [H], trap [H], angles [A]
    dt_bias [H];  B_bias, C_bias [H, R, N] (init 1);  B_norm, C_norm: RMSNorm over N (weight [N]);  D [H]
    MIMO: mimo_x, mimo_z, mimo_o [H, R, P];  is_outproj_norm: norm = RMSNormGated(E, group P, norm_before_gate=True)
    out_proj [d, E].  No conv1d, no A_log (A is data-dependent).

Per token t and head h (group g = h // (H/G)):
    DT = softplus(dd_dt + dt_bias);  A = min(-softplus(dd_A), -A_floor);  lam = sigmoid(trap)
    theta_t = theta_{t-1} + pi * tanh(angles_t) * DT_t          (cumulative, mod 2*pi; one angle set per head)
    k_{t,r} = Rot(theta_t) (B_norm(B_{t,r,g}) + B_bias[h,r]),  q_{t,r} = Rot(theta_t) (C_norm(C_{t,r,g}) + C_bias[h,r])
        SISO rotates pairs (2i, 2i+1), MIMO pairs (i, i + N/2), for i < A; the rest passes through
    v_{t,r} = x_t * mimo_x[h,r]  (SISO: x_t)
    S_t = exp(A_t DT_t) (S_{t-1} + (1-lam_t) DT_t sum_r v_{t-1,r} k_{t-1,r}^T) + lam_t DT_t sum_r v_{t,r} k_{t,r}^T
    o_{t,r} = S_t q_{t,r} + D v_{t,r}
    SISO: y = o * silu(z)  [is_outproj_norm: y = RMSNormGated(o, z)]
    MIMO: y = sum_r o_r * mimo_o[h,r] * silu(z * mimo_z[h,r])
          [is_outproj_norm: sum_r RMSNormGated(o_r, z*mimo_z_r) * mimo_o_r]
    out = out_proj(y)
The state a sequence carries: theta [B, H, A], S [B, H, P, N] (fp32), and the last token's rotated k [B, R, H, N]
and v [B, R, H, P] (the trapezoid's pending term). state_floats_per_layer counts S only: H * P * N.

Note: mamba-ssm after 2.3.2.post1 (commit c69aaab) replaced softplus in A with a "heavy-tail" activation; this module
follows 2.3.2.post1 (softplus), as fla 0.6.0 does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from baselines.common import mask_padding
from baselines.mamba2 import is_mamba_ssm_config, mamba_ssm_layer, mamba_ssm_lm_config
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


@dataclass
class Mamba3MixerConfig:
    hidden_size: int
    state_size: int = 128
    expand: int = 2
    head_dim: int = 64
    n_groups: int = 1
    rope_fraction: float = 0.5
    A_floor: float = 1e-4
    is_outproj_norm: bool = False
    is_mimo: bool = False
    mimo_rank: int = 4
    chunk_size: int = 64
    use_bias: bool = False
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.d_inner % self.head_dim:
            raise ValueError(f"Mamba-3: expand*hidden_size = {self.d_inner} is not a multiple of head_dim "
                             f"{self.head_dim}")
        if self.n_groups < 1 or self.num_heads % self.n_groups:
            raise ValueError(f"Mamba-3: n_groups={self.n_groups} must divide the {self.num_heads} heads")
        if self.rope_fraction not in (0.5, 1.0):
            raise ValueError(f"Mamba-3: rope_fraction must be 0.5 or 1.0; got {self.rope_fraction}")
        if self.num_rope_angles <= 0:
            raise ValueError(f"Mamba-3: state_size {self.state_size} * rope_fraction gives no rotary angle")
        if self.is_mimo and self.mimo_rank < 1:
            raise ValueError(f"Mamba-3: mimo_rank must be >= 1; got {self.mimo_rank}")

    @property
    def d_inner(self) -> int:
        return int(self.expand * self.hidden_size)

    @property
    def num_heads(self) -> int:
        return self.d_inner // self.head_dim

    @property
    def rank(self) -> int:
        return self.mimo_rank if self.is_mimo else 1

    @property
    def num_rope_angles(self) -> int:
        split = int(self.state_size * self.rope_fraction)
        return (split - split % 2) // 2

    def state_floats(self) -> int:
        """SSM state per layer: H * P * N (MIMO raises the rank of each update, not the state size)."""
        return self.num_heads * self.head_dim * self.state_size

    def aux_state_floats(self) -> int:
        """What else a decoding layer carries: angles H*A, last k R*H*N, last v H*P (upstream stores raw x)."""
        return self.num_heads * (self.num_rope_angles + self.rank * self.state_size + self.head_dim)


@dataclass
class Mamba3LayerState:
    """angle: cumulative rotary angles [B, H, A] fp32; ssm: RecurrentState (S [B, H, P, N], k_last [B, R, H, N],
    v_last [B, R, H, P] = x * mimo_x of the last token)."""

    angle: torch.Tensor
    ssm: RecurrentState


def _rotate(x: torch.Tensor, theta: torch.Tensor, pairwise: bool) -> torch.Tensor:
    """Rotate x [B, T, R, H, N] by theta [B, T, H, A]: pairs (2i, 2i+1) (pairwise) or (i, i + N/2), i < A."""
    A, N = theta.shape[-1], x.shape[-1]
    cos, sin = theta.cos()[:, :, None], theta.sin()[:, :, None]                 # [B, T, 1, H, A]
    if pairwise:
        first, second = slice(0, 2 * A, 2), slice(1, 2 * A, 2)
    else:
        first, second = slice(0, A), slice(N // 2, N // 2 + A)
    x0, x1 = x[..., first], x[..., second]
    out = x.clone()
    out[..., first] = x0 * cos - x1 * sin
    out[..., second] = x0 * sin + x1 * cos
    return out


class Mamba3Mixer(nn.Module):
    """The Mamba-3 mixer (SISO or MIMO); hidden_states [B, T, d] -> [B, T, d]. Names as mamba-ssm / fla."""

    masks_padding = True       # forward(..., token_mask=): left padding passes with the state unchanged
    takes_pre_norm = True      # forward(..., norm=): the block fuses its pre-norm into in_proj

    def __init__(self, config: Mamba3MixerConfig, layer_idx: int | None = None):
        super().__init__()
        c = self.config = config
        self.layer_idx = layer_idx
        self.use_kernels = False
        H, R, N, P = c.num_heads, c.rank, c.state_size, c.head_dim
        d_in_proj = 2 * c.d_inner + 2 * N * c.n_groups * R + 3 * H + c.num_rope_angles
        self.in_proj = nn.Linear(c.hidden_size, d_in_proj, bias=c.use_bias)
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.B_bias = nn.Parameter(torch.ones(H, R, N))
        self.C_bias = nn.Parameter(torch.ones(H, R, N))
        self.B_norm = GroupedRMSNormGated(N, eps=c.norm_eps)
        self.C_norm = GroupedRMSNormGated(N, eps=c.norm_eps)
        if c.is_mimo:
            self.mimo_x = nn.Parameter(torch.full((H, R, P), 1.0 / R))
            self.mimo_z = nn.Parameter(torch.ones(H, R, P))
            self.mimo_o = nn.Parameter(torch.full((H, R, P), 1.0 / R))
        self.D = nn.Parameter(torch.ones(H))
        if c.is_outproj_norm:
            self.norm = GroupedRMSNormGated(c.d_inner, eps=c.norm_eps, group_size=P, norm_before_gate=True)
        self.out_proj = nn.Linear(c.d_inner, c.hidden_size, bias=c.use_bias)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        dt = (torch.rand_like(self.dt_bias) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).exp().clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(self, hidden_states: torch.Tensor, state: Mamba3LayerState | None = None, use_cache: bool = False,
                token_mask: torch.Tensor | None = None, norm: nn.Module | None = None):
        """hidden_states [B, T, d] -> (y [B, T, d], state or None). token_mask [B, T] (0 = left padding): x and DT
        are zero there, so nothing is written or decayed, the rotary angle does not advance and the first token's
        trapezoid term sees a zero previous value, as at a sequence start. norm: the block's pre-norm, run with
        in_proj as one Function (gdn2.fused.norm_linears: the normed input is not kept); None: hidden_states is
        normed."""
        c = self.config
        Bsz, T, _ = hidden_states.shape
        H, R, G, N, P, A_n = c.num_heads, c.rank, c.n_groups, c.state_size, c.head_dim, c.num_rope_angles
        z, x, B, C, dd_dt, dd_A, trap, angles = torch.split(
            norm_linears(hidden_states, norm, (self.in_proj,))[0],
            [c.d_inner, c.d_inner, N * G * R, N * G * R, H, H, H, A_n], dim=-1)
        acc = torch.float64 if hidden_states.dtype == torch.float64 else torch.float32
        A = (-F.softplus(dd_A.to(acc))).clamp(max=-c.A_floor)                    # [B, T, H]
        DT = F.softplus(dd_dt.to(acc) + self.dt_bias.to(acc))
        x, DT = mask_padding(token_mask, x, DT)
        if self.use_kernels and hidden_states.is_cuda and not c.is_mimo and not (state is not None and T == 1):
            return self._siso_kernel(hidden_states, z, x, B, C, A, DT, trap, angles, state, use_cache)
        lam = torch.sigmoid(trap.to(acc))
        rates = torch.tanh(angles.to(acc)) * math.pi                               # [B, T, A]
        theta = torch.cumsum(rates[:, :, None, :] * DT[..., None], dim=1)          # [B, T, H, A]
        if state is not None:
            theta = theta + state.angle.to(acc)[:, None]
        theta = torch.remainder(theta, 2 * math.pi)

        heads = torch.arange(H, device=x.device) // (H // G)
        Bn = self.B_norm(B.reshape(Bsz, T, R, G, N)).to(acc)[:, :, :, heads] + self.B_bias.to(acc).transpose(0, 1)
        Cn = self.C_norm(C.reshape(Bsz, T, R, G, N)).to(acc)[:, :, :, heads] + self.C_bias.to(acc).transpose(0, 1)
        k = _rotate(Bn, theta, pairwise=not c.is_mimo)                             # [B, T, R, H, N]
        q = _rotate(Cn, theta, pairwise=not c.is_mimo)
        xh = x.reshape(Bsz, T, H, P).to(acc)
        v = xh[:, :, None] * self.mimo_x.to(acc).transpose(0, 1) if c.is_mimo else xh[:, :, None]
        gamma, eta = lam * DT, (1 - lam) * DT
        previous = None if state is None else state.ssm
        if previous is not None and T == 1:
            o, new_ssm = trapezoid_step(q[:, 0], k[:, 0], v[:, 0], (A * DT)[:, 0], gamma[:, 0], eta[:, 0], previous)
            o = o[:, None]
        else:
            o, new_ssm = trapezoid_scan(q, k, v, A * DT, gamma, eta, previous, c.chunk_size)
        o = o + self.D.to(acc)[:, None] * v                                        # [B, T, R, H, P]
        zh = z.reshape(Bsz, T, H, P).to(acc)
        if not c.is_mimo and c.is_outproj_norm:
            out = gated_norm_out(self.norm, self.out_proj, o[:, :, 0].reshape(Bsz, T, c.d_inner), z,
                                 hidden_states.dtype)
        elif not c.is_mimo:
            out = self.out_proj((o[:, :, 0] * F.silu(zh)).reshape(Bsz, T, c.d_inner).to(hidden_states.dtype))
        else:
            z_r = zh[:, :, None] * self.mimo_z.to(acc).transpose(0, 1)             # [B, T, R, H, P]
            if c.is_outproj_norm:
                o = self.norm(o.reshape(Bsz, T, R, c.d_inner), z_r.reshape(Bsz, T, R, c.d_inner)).reshape(o.shape)
            else:
                o = o * F.silu(z_r)
            y = (o * self.mimo_o.to(acc).transpose(0, 1)).sum(2).reshape(Bsz, T, c.d_inner)
            out = self.out_proj(y.to(hidden_states.dtype))
        new_state = Mamba3LayerState(theta[:, -1], new_ssm) if use_cache else None
        return out, new_state


    def _siso_kernel(self, hidden_states, z, x, B, C, A, DT, trap, angles, state, use_cache):
        """SISO prefill with mamba-ssm's Triton kernel (CUDA), called as mamba-ssm's Mamba3.forward calls it, plus
        the carried state. The kernel casts Q/K/V/trap/angles/Z to bf16 internally (upstream's choice)."""
        from mamba_ssm.ops.triton.mamba3.mamba3_siso_combined import mamba3_siso_combined

        c = self.config
        Bsz, T, _ = hidden_states.shape
        H, G, N, P = c.num_heads, c.n_groups, c.state_size, c.head_dim
        Bn = self.B_norm(B.reshape(Bsz, T, G, N))
        Cn = self.C_norm(C.reshape(Bsz, T, G, N))
        inputs = None
        if state is not None:
            inputs = (state.angle.float().contiguous(), state.ssm.ssm.float().contiguous(),
                      state.ssm.k_last[:, 0].float().contiguous(), state.ssm.v_last[:, 0].float().contiguous())
        zh = z.reshape(Bsz, T, H, P)
        y, angle, ssm, k_last, v_last = mamba3_siso_combined(
            Q=Cn, K=Bn, V=x.reshape(Bsz, T, H, P), ADT=(A * DT).transpose(1, 2).contiguous(),
            DT=DT.transpose(1, 2).contiguous(), Trap=trap.transpose(1, 2).contiguous(),
            Q_bias=self.C_bias[:, 0].float(), K_bias=self.B_bias[:, 0].float(),
            Angles=angles.float()[:, :, None, :].expand(-1, -1, H, -1), D=self.D.float(),
            Z=None if c.is_outproj_norm else zh, chunk_size=c.chunk_size, Input_States=inputs,
            return_final_states=True)
        y = y.reshape(Bsz, T, c.d_inner)
        if c.is_outproj_norm:
            out = gated_norm_out(self.norm, self.out_proj, y, z, hidden_states.dtype)
        else:
            out = self.out_proj(y.to(hidden_states.dtype))
        if not use_cache:
            return out, None
        ssm_state = RecurrentState(ssm.float(), k_last.float().reshape(Bsz, 1, H, N),
                                   v_last.float().reshape(Bsz, 1, H, P))
        return out, Mamba3LayerState(angle.float(), ssm_state)


# ------------------------------------------------------------------------------------------ configs
_FLA_MIXER_KEYS_M3 = {"state_size", "expand", "head_dim", "n_groups", "rope_fraction", "A_floor", "is_outproj_norm",
                      "is_mimo", "mimo_rank", "chunk_size", "use_bias", "norm_eps"}


def mamba3_configs(config: dict, source: str = "config.json") -> MambaLMConfig:
    """MambaLMConfig (with a Mamba3MixerConfig) from an fla config.json or a mamba-ssm config.json."""
    if is_mamba_ssm_config(config):
        known = {"d_state": "state_size", "expand": "expand", "headdim": "head_dim", "ngroups": "n_groups",
                 "rope_fraction": "rope_fraction", "A_floor": "A_floor", "is_outproj_norm": "is_outproj_norm",
                 "is_mimo": "is_mimo", "mimo_rank": "mimo_rank", "chunk_size": "chunk_size"}
        ignored = {"dt_min", "dt_max", "dt_init_floor", "dropout", "n_layer"}
        return mamba_ssm_lm_config(config, source, "Mamba3", Mamba3MixerConfig, known, ignored)
    fields = {k: config[k] for k in _FLA_MIXER_KEYS_M3 if k in config}
    hidden = int(config.get("hidden_size", 2048))
    mixer = Mamba3MixerConfig(hidden_size=hidden, **fields)
    return MambaLMConfig(
        vocab_size=int(config.get("vocab_size", 32000)), hidden_size=hidden,
        num_hidden_layers=int(config.get("num_hidden_layers", 48)), mixer=mixer,
        norm_eps=float(config.get("norm_eps", 1e-5)), residual_in_fp32=bool(config.get("residual_in_fp32", True)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)), source_format="fla",
    )


def build_mamba3(config: MambaLMConfig) -> MambaLM:
    return MambaLM(config, [Mamba3Mixer(config.mixer, i) for i in range(config.num_hidden_layers)])


def upstream_kernels() -> dict[str, bool]:
    """Which of mamba-ssm's Mamba-3 kernel backends import here: siso (Triton), mimo (TileLang), step (CuTe)."""
    from baselines.mamba_common import install_selective_scan_stub

    install_selective_scan_stub()
    found = {}
    for key, module in (("siso", "mamba_ssm.ops.triton.mamba3.mamba3_siso_combined"),
                        ("mimo", "mamba_ssm.ops.tilelang.mamba3.mamba3_mimo"),
                        ("step", "mamba_ssm.ops.cute.mamba3.mamba3_step_fn")):
        try:
            __import__(module)
            found[key] = True
        except Exception:
            found[key] = False
    return found


# ------------------------------------------------------------------------------------------ family
@register_family("mamba3")
class Mamba3Family(ModelFamily):
    model_types = ("mamba3",)
    architectures = ("Mamba3ForCausalLM",)
    loads_from = ("HF folders of fla's Mamba3ForCausalLM (config.json + safetensors); mamba-ssm MambaLMHeadModel "
                  "folders (config.json + pytorch_model.bin, ssm_cfg.layer 'Mamba3', as mamba-ssm after 2.3.2.post1 "
                  "saves them: 2.3.2.post1's own MambaLMHeadModel builds only Mamba1/Mamba2); SISO and MIMO (is_mimo)")

    # The paper's matched baselines (spec/gdn2.md): expand 2, head dim 64, d_state 64 at d_model 2048; MIMO rank 4.
    paper_config = {"model_type": "mamba3", "hidden_size": 2048, "expand": 2, "head_dim": 64, "state_size": 64,
                    "n_groups": 1, "vocab_size": 32000}

    def paper_configs(self) -> dict[str, dict]:
        return {"SISO": self.paper_config, "MIMO r4": {**self.paper_config, "is_mimo": True, "mimo_rank": 4}}

    def claims(self, config: dict) -> bool:
        if is_mamba_ssm_config(config):
            return mamba_ssm_layer(config) == "Mamba3"
        return super().claims(config)

    def backend(self, device: torch.device) -> str:
        if device.type != "cuda":
            return "torch reference (SISO and MIMO)"
        found = upstream_kernels()
        siso = "mamba-ssm Triton kernel" if found["siso"] else "torch reference (mamba-ssm not importable)"
        mimo = ("torch reference (TileLang missing)" if not found["mimo"]
                else "torch reference (TileLang kernel not wired)")
        step = "torch step" + ("" if found["step"] else " (CuTe missing)")
        return f"SISO prefill: {siso}; MIMO: {mimo}; decode: {step}"

    def backend_for(self, mixer: Mamba3MixerConfig, device: torch.device) -> str:
        """The backend of one loaded model (SISO or MIMO)."""
        if device.type != "cuda":
            return "torch reference"
        found = upstream_kernels()
        step = "decode: torch step" + ("" if found["step"] else " (CuTe missing)")
        if mixer.is_mimo:
            return "torch reference (" + ("TileLang missing" if not found["mimo"] else "TileLang kernel not wired") + \
                f"); {step}"
        return ("mamba-ssm Triton SISO kernel" if found["siso"] else "torch reference") + f"; {step}"

    def state_floats_per_layer(self, config: dict) -> int:
        return mamba3_configs(config).mixer.state_floats()

    def load(self, source: str, device: torch.device, dtype: torch.dtype, tokenizer: str | None) -> EvalModel:
        from baselines.mamba_common import load_mamba_family

        use = device.type == "cuda" and upstream_kernels()["siso"]
        return load_mamba_family(self, source, device, dtype, tokenizer, mamba3_configs, build_mamba3,
                                 use_kernels=use)

    def conformance_models(self, device: torch.device | str, variant: str = ""):
        """harness/doctor.py's hook: (upstream, ours) on identical random weights, fp32: fla's Mamba3ForCausalLM
        (mamba-ssm's Triton SISO / TileLang MIMO kernels; decode needs the CuTe step) and our MambaLM with the
        kernels load() would use. variant "" = SISO, "mimo" = MIMO rank 4, "outproj_norm" = SISO with the gated
        output norm. Raises harness.doctor.ConformanceSkipped when the upstream cannot run here.

        Tolerance: mamba3_siso_combined casts Q/K/V/trap/angles/Z to bf16 (and keeps the cumulative angles in
        bf16), so upstream-vs-reference agreement is at bf16 level (see conformance_tolerance), not 1e-3."""
        from baselines.mamba_common import fla_conformance_pair

        mimo = variant == "mimo"

        def needs():
            found = upstream_kernels()
            if mimo and not found["mimo"]:
                return "Mamba-3 MIMO needs TileLang (mamba_ssm.ops.tilelang.mamba3 does not import)"
            if not mimo and not found["siso"]:
                return "mamba_ssm.ops.triton.mamba3.mamba3_siso_combined does not import"
            import fla.layers.mamba3 as fla_mamba3
            if (mimo and fla_mamba3.mamba3_mimo_combined is None) or (
                    not mimo and fla_mamba3.mamba3_siso_combined is None):
                return "fla.layers.mamba3 was imported before mamba_ssm could be (install the selective_scan_cuda " \
                       "stub first)"
            return True

        config = {"model_type": "mamba3", "vocab_size": 256, "hidden_size": 128, "state_size": 64, "head_dim": 64,
                  "expand": 2, "n_groups": 1, "num_hidden_layers": 2, "is_mimo": mimo, "mimo_rank": 4,
                  "is_outproj_norm": variant == "outproj_norm", "chunk_size": 16 if mimo else 64,
                  "tie_word_embeddings": False}
        device = torch.device(device)
        return fla_conformance_pair(config, "Mamba3ForCausalLM", mamba3_configs, build_mamba3, device, needs=needs,
                                    use_kernels=device.type == "cuda" and not mimo)

    def conformance_variants(self) -> list[str]:
        return ["", "outproj_norm", "mimo"]

    def conformance_skips(self, variant: str = "") -> dict[str, str]:
        """fla's Mamba-3 layer (the doctor's upstream) decodes (T = 1 with a cache) only with mamba-ssm's CuTe step
        kernel and rotary helper; without them its decode raises, which is a missing backend, not a failed check."""
        try:
            import fla.layers.mamba3 as fla_mamba3
        except Exception:                                      # conformance_models reports fla itself
            return {}
        if fla_mamba3.mamba3_step_fn is not None and fla_mamba3.apply_rotary_qk_inference_fwd is not None:
            return {}
        return {"prefill+decode vs full (upstream)": "fla's Mamba-3 decode needs mamba-ssm's CuTe step kernel "
                                                     "(nvidia-cutlass-dsl, quack-kernels), not importable here"}

    def conformance_tolerance(self, variant: str = "") -> float:
        """Relative logits error the upstream can meet: bf16-level for SISO (the Triton kernel computes in bf16)."""
        return 1e-3 if variant == "mimo" else 3e-2
