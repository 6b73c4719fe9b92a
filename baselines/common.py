"""Pure-PyTorch pieces the baseline reference paths share (CPU-capable; parameter names follow fla's modules).

The API is small on purpose; every mixer here and in the family modules follows one protocol:

    mixer(hidden_states [B, T, d], state: <layer state> | None, use_cache: bool) -> (y [B, T, d], new_state | None)

where the layer state is whatever that mixer needs to continue a sequence (None at its start) and new_state is
returned only when use_cache is True. A `LayerStates` cache holds one such state per layer.

Exports
- RMSNorm(dim, eps)                          weight [dim]; fp32 compute            (gdn2.modeling)
- GatedRMSNorm(dim, eps, activation)         RMSNorm(x) * act(gate); "silu"/"swish"/"sigmoid" (gdn2.layer)
- ShortConvolution(D, kernel_size, bias)     depthwise causal conv + SiLU with a carried cache [B, D, W-1]
                                             (weight [D, 1, W], bias [D]: nn.Conv1d's and fla's layout) (gdn2.layer)
- SwiGLUMLP(d, intermediate)                 gate_proj / up_proj / down_proj, no biases (gdn2.modeling)
- swiglu_width(d, hidden_ratio)              fla's GatedMLP default width (2/3 * ratio * d, rounded up to 256)
- gate_activation(name)                      "swish" | "silu" -> "silu", "sigmoid" -> "sigmoid" (else ValueError)
- apply_rotary(x, positions, base)           GPT-NeoX (half-split, non-interleaved) RoPE, as fla's RotaryEmbedding
- SlidingWindowAttention(...)                fla's Attention layer (q_proj, k_proj, v_proj, o_proj; GQA; RoPE;
                                             optional window) with a windowed KV cache: AttentionState
- PreNormBlock(attn_norm, attn, mlp_norm, mlp)    x += attn(attn_norm(x)); x += mlp(mlp_norm(x))
- LayerStates(num_layers)                    the generic cache: .states[i], .seen_tokens, get_seq_length()
- MixerStackLM(...)                          model.embeddings / model.layers / model.norm / lm_head shell with the
                                             transformers calling convention EvalModel uses
- gated_delta_rule(q, k, v, g, beta, ...)    KDA / Gated DeltaNet recurrence through gdn2.ops (b = w = beta)
- fla_settings / build_mixer_stack / keep_fp32 / perturb_unit_weights   fla config handling and model assembly
- FLAFamilyBase                              a ModelFamily for fla-format folders: config defaults, upstream-or-
                                             reference choice, strict loading, the doctor's conformance_models hook
- write_checkpoint_folder(folder, config, state, tokenizer)   tiny HF-format folders for tests and examples
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from gdn2.cache import RecurrentCache, check_forward_args, left_padding_mask, run_layers
from gdn2.layer import GatedRMSNorm as _GDN2GatedRMSNorm
from gdn2.layer import ShortConvolution as ShortConvolution  # noqa: F401  (re-exported)
from gdn2.modeling import RMSNorm as RMSNorm  # noqa: F401  (re-exported)
from gdn2.modeling import SwiGLUMLP as SwiGLUMLP  # noqa: F401  (re-exported)
from harness.registry import ModelFamily  # light: the registry imports no backend

__all__ = [
    "RMSNorm", "GatedRMSNorm", "ShortConvolution", "SwiGLUMLP", "swiglu_width", "gate_activation", "apply_rotary",
    "AttentionState", "SlidingWindowAttention", "PreNormBlock", "LayerStates", "MixerStackLM", "LMOutput",
]


def gate_activation(name: str) -> str:
    """fla's output-gate activation names -> ours: 'swish'/'silu' -> 'silu', 'sigmoid' -> 'sigmoid'."""
    if name in ("swish", "silu"):
        return "silu"
    if name == "sigmoid":
        return "sigmoid"
    raise ValueError(f"output gate activation must be 'swish', 'silu' or 'sigmoid'; got {name!r}")


class GatedRMSNorm(_GDN2GatedRMSNorm):
    """RMSNorm over the last axis times act(gate), fp32 compute; accepts fla's activation names."""

    def __init__(self, dim: int, eps: float, activation: str = "swish"):
        super().__init__(dim, eps=eps, activation=gate_activation(activation))


def swiglu_width(hidden_size: int, hidden_ratio: float | None = 4, intermediate_size: int | None = None) -> int:
    """fla GatedMLP's width: intermediate_size if given, else 2/3 * hidden_ratio * d rounded up to a multiple of 256."""
    if intermediate_size is not None:
        return int(intermediate_size)
    width = int(hidden_size * (4 if hidden_ratio is None else hidden_ratio) * 2 / 3)
    return 256 * ((width + 255) // 256)


# ------------------------------------------------------------------------------------------ attention
def apply_rotary(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """RoPE on x [B, T, H, D] at integer positions [T]: half-split (GPT-NeoX) layout, fp32 angles."""
    D = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D))
    angles = positions.to(torch.float32)[:, None] * inv_freq[None]            # [T, D/2]
    cos = torch.cat([angles.cos(), angles.cos()], -1)[None, :, None, :]
    sin = torch.cat([angles.sin(), angles.sin()], -1)[None, :, None, :]
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


@dataclass
class AttentionState:
    """What an attention layer carries: RoPE'd keys and values of the last tokens it may still attend to.

    keys, values: [B, S, Hkv, D] (S <= window_size - 1 for a windowed layer; all past tokens otherwise);
    position: how many tokens the layer has seen (the next token's RoPE position).
    """

    keys: torch.Tensor
    values: torch.Tensor
    position: int


class SlidingWindowAttention(nn.Module):
    """Causal softmax attention with RoPE and an optional sliding window (fla's Attention layer, in torch).

    Parameter names and shapes as fla.layers.attn.Attention: q_proj [d, d], k_proj / v_proj [Hkv*D, d]
    (bias when qkv_bias), o_proj [d, d]; D = d // num_heads. Query t attends to keys t - window_size + 1 .. t
    (flash-attn's window (window_size - 1, 0)); window_size None means full causal attention.
    """

    QUERY_BLOCK = 1024  # queries per block in prefill, so memory stays O(block * (block + window))

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int | None = None, qkv_bias: bool = False,
                 window_size: int | None = None, rope_theta: float = 10000.0, layer_idx: int | None = None):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads % self.num_kv_heads != 0 or hidden_size % num_heads != 0:
            raise ValueError(f"attention needs num_heads={num_heads} to divide hidden_size={hidden_size} and to be a "
                             f"multiple of num_kv_heads={self.num_kv_heads}")
        self.head_dim = hidden_size // num_heads
        self.kv_dim = self.num_kv_heads * self.head_dim
        self.window_size = window_size
        self.rope_theta = float(rope_theta)
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, self.kv_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, self.kv_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor, state: AttentionState | None = None, use_cache: bool = False):
        B, T, _ = hidden_states.shape
        D = self.head_dim
        start = 0 if state is None else state.position
        positions = torch.arange(start, start + T, device=hidden_states.device)
        q = apply_rotary(self.q_proj(hidden_states).view(B, T, self.num_heads, D), positions, self.rope_theta)
        k = apply_rotary(self.k_proj(hidden_states).view(B, T, self.num_kv_heads, D), positions, self.rope_theta)
        v = self.v_proj(hidden_states).view(B, T, self.num_kv_heads, D)
        if state is not None:
            k_all, v_all = torch.cat([state.keys.to(k.dtype), k], 1), torch.cat([state.values.to(v.dtype), v], 1)
        else:
            k_all, v_all = k, v
        past = k_all.shape[1] - T                                   # cached keys sit at positions start-past..start-1
        key_pos = torch.arange(start - past, start + T, device=hidden_states.device)
        group = self.num_heads // self.num_kv_heads
        kh = k_all.repeat_interleave(group, 2).transpose(1, 2)      # [B, H, S, D]
        vh = v_all.repeat_interleave(group, 2).transpose(1, 2)
        outputs = []
        for a in range(0, T, self.QUERY_BLOCK):
            b = min(a + self.QUERY_BLOCK, T)
            qpos = positions[a:b]
            lo = 0 if self.window_size is None else max(0, past + a - self.window_size + 1)
            hi = past + b
            allowed = key_pos[None, lo:hi] <= qpos[:, None]
            if self.window_size is not None:
                allowed &= key_pos[None, lo:hi] > qpos[:, None] - self.window_size
            o = F.scaled_dot_product_attention(q[:, a:b].transpose(1, 2), kh[:, :, lo:hi], vh[:, :, lo:hi],
                                               attn_mask=allowed)
            outputs.append(o.transpose(1, 2))
        y = self.o_proj(torch.cat(outputs, 1).reshape(B, T, self.hidden_size))
        new_state = None
        if use_cache:
            keep = k_all.shape[1] if self.window_size is None else self.window_size - 1
            keep = min(keep, k_all.shape[1])
            new_state = AttentionState(k_all[:, k_all.shape[1] - keep:], v_all[:, v_all.shape[1] - keep:], start + T)
        return y, new_state


# ------------------------------------------------------------------------------------------ blocks and the LM shell
class PreNormBlock(nn.Module):
    """x += attn(attn_norm(x)); x += mlp(mlp_norm(x)) (fla's block layout and names). mlp may be None."""

    def __init__(self, attn_norm: nn.Module, attn: nn.Module, mlp_norm: nn.Module | None, mlp: nn.Module | None):
        super().__init__()
        self.attn_norm, self.attn = attn_norm, attn
        if mlp is not None:
            self.mlp_norm, self.mlp = mlp_norm, mlp
        else:
            self.mlp = None

    def forward(self, x: torch.Tensor, state: Any, use_cache: bool, token_mask: torch.Tensor | None = None):
        """With autograd on, a plain RMSNorm pre-norm runs inside a mixer that takes it (`takes_pre_norm`: its input
        projections read it as one Function that does not keep the normed x) and inside a SwiGLUMLP (gate and up
        projections, the same); otherwise each norm runs first, as its own module. token_mask [B, T] (1 = token,
        0 = left padding) goes to the mixer, which must take it (`masks_padding`)."""
        from gdn2.fused import plain

        fuse = torch.is_grad_enabled() and token_mask is None
        mask = {} if token_mask is None else {"token_mask": token_mask}
        if fuse and getattr(self.attn, "takes_pre_norm", False) and plain(self.attn_norm, RMSNorm):
            mixed, new_state = self.attn(x, state=state, use_cache=use_cache, norm=self.attn_norm)
        else:
            mixed, new_state = self.attn(self.attn_norm(x), state=state, use_cache=use_cache, **mask)
        x = x + mixed
        if self.mlp is not None:
            if fuse and type(self.mlp) is SwiGLUMLP and plain(self.mlp_norm, RMSNorm):
                x = x + self.mlp(x, norm=self.mlp_norm)
            else:
                x = x + self.mlp(self.mlp_norm(x))
        return x, new_state


# The generic cache of a mixer stack is the one the GDN-2 model uses (gdn2/cache.py): .states[i], .seen_tokens.
LayerStates = RecurrentCache


@dataclass
class LMOutput:
    """What the LM shell returns: logits [B, T', vocab] (None when a training loss was asked for) and the cache
    (LayerStates or None)."""

    logits: torch.Tensor | None
    past_key_values: LayerStates | None = None
    loss: torch.Tensor | None = None


class _Backbone(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, layers: Sequence[nn.Module], norm: nn.Module):
        super().__init__()
        self.embeddings = nn.Embedding(vocab_size, hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = norm


class MixerStackLM(nn.Module):
    """model.embeddings -> model.layers (each `layer(x, state, use_cache) -> (x, state)`) -> model.norm -> lm_head.

    The state-dict names are those of fla's *ForCausalLM models (model.embeddings.weight, model.layers.N...,
    model.norm.weight, lm_head.weight). tie_word_embeddings shares lm_head.weight with the embeddings (and then
    lm_head.weight is not a separate entry to load). `config` is kept for description (any object).
    Call convention (what EvalModel uses):
        lm(input_ids [B, T], past_key_values=LayerStates | None, use_cache=bool, logits_to_keep=int) -> LMOutput
    """

    def __init__(self, config: Any, vocab_size: int, hidden_size: int, layers: Sequence[nn.Module],
                 norm: nn.Module, tie_word_embeddings: bool = False):
        super().__init__()
        self.config = config
        self.model = _Backbone(vocab_size, hidden_size, layers, norm)
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)
        self.tie_word_embeddings = tie_word_embeddings
        if tie_word_embeddings:
            self.lm_head.weight = self.model.embeddings.weight

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embeddings

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    @property
    def masks_left_padding(self) -> bool:
        """Whether every mixer passes left padding with its state unchanged (`masks_padding`: the delta-rule
        mixers; not attention layers), so that forward takes a left-padded attention_mask."""
        return all(getattr(getattr(layer, "attn", None), "masks_padding", False) for layer in self.model.layers)

    def forward(self, input_ids: torch.Tensor, past_key_values: LayerStates | None = None,
                use_cache: bool = False, logits_to_keep: int = 0, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **unused) -> LMOutput:
        """input_ids [B, T]; attention_mask [B, seen + T] may mark left padding where every mixer masks it
        (masks_left_padding): padded positions leave every state unchanged, so each row computes what it computes
        alone; other padding is refused. With labels and autograd on, the loss is gdn2.fused's chunked linear
        cross-entropy and logits is None."""
        token_mask = left_padding_mask(attention_mask, input_ids.shape[1]) if self.masks_left_padding else None
        check_forward_args(None if token_mask is not None else attention_mask, unused)
        x, past_key_values = run_layers(self.model.layers, self.model.embeddings(input_ids), past_key_values,
                                        use_cache, **({} if token_mask is None else {"token_mask": token_mask}))
        x = self.model.norm(x)
        if labels is not None and torch.is_grad_enabled():
            from gdn2.fused import causal_lm_loss

            return LMOutput(logits=None, past_key_values=past_key_values if use_cache else None,
                            loss=causal_lm_loss(x, self.lm_head.weight, labels))
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)
        loss = None
        if labels is not None:
            scores = logits[:, :-1].flatten(0, 1)          # in fp32 at least (float64 stays float64)
            loss = F.cross_entropy(scores.to(torch.promote_types(scores.dtype, torch.float32)),
                                   labels[:, 1:].flatten(), ignore_index=-100)
        return LMOutput(logits=logits, past_key_values=past_key_values if use_cache else None, loss=loss)


# ------------------------------------------------------------------------------------------ delta-rule recurrences
def gated_output(mixer: nn.Module, o: torch.Tensor, gate: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """mixer.o_proj(mixer.o_norm(o, gate)) over the heads: o, gate [B, T, Hv, V] -> [B, T, d]. Where both modules are
    plain (a GatedRMSNorm and a bias-free nn.Linear, no hooks) they run as gdn2.fused's gated_rms_norm_linear, which
    recomputes the normed output for o_proj's weight gradient instead of keeping it (GDN-2's output path); otherwise
    each module runs as itself, the normed output cast to dtype (the hidden states') first."""
    from gdn2.fused import gated_rms_norm_linear, plain

    if plain(mixer.o_norm, GatedRMSNorm) and plain(mixer.o_proj, nn.Linear):
        return gated_rms_norm_linear(o, gate, mixer.o_norm.weight, mixer.o_proj.weight, mixer.o_norm.eps,
                                     mixer.o_norm.activation)
    B, T = o.shape[:2]
    return mixer.o_proj(mixer.o_norm(o, gate).reshape(B, T, -1).to(dtype))


def mask_padding(token_mask: torch.Tensor | None, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each tensor [B, T, ...] with its padded positions (token_mask [B, T] 0) set to 0; unchanged without a mask.
    Left padding precedes every token of its row (gdn2.cache.left_padding_mask refuses anything else), where a
    recurrent state is still zero: a mixer that zeroes what writes into its state there (the delta rule's q, k, v
    before the short convolution; Mamba-2's conv inputs and outputs; Mamba-3's x and DT) keeps it zero, and each
    conv window sees zeros there, as at a sequence start."""
    if token_mask is None:
        return tensors
    return tuple(t * token_mask.reshape(*token_mask.shape, *([1] * (t.dim() - 2))).to(t.dtype) for t in tensors)


def delta_rule_heads(mixer: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: torch.Tensor) -> tuple:
    """The delta-rule mixers' projections split into heads: q, k [B, T, H*K] -> [B, T, H, K], v [B, T, Hv*V] ->
    [B, T, Hv, V], and beta = sigmoid(b) [B, T, Hv] in fp32 (times 2 with mixer.allow_neg_eigval)."""
    B, T = q.shape[:2]
    beta = b.float().sigmoid()
    if mixer.allow_neg_eigval:
        beta = beta * 2.0
    return (q.reshape(B, T, mixer.num_heads, mixer.head_k_dim), k.reshape(B, T, mixer.num_heads, mixer.head_k_dim),
            v.reshape(B, T, mixer.num_v_heads, mixer.head_v_dim), beta)


def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     previous: torch.Tensor | None, use_cache: bool, recompute_g=None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule with a per-key-channel decay (KDA; Gated DeltaNet when g is constant over K), run through
    gdn2.ops with b = w = beta (the GDN-2 reduction): S <- Diag(exp g) S; S <- S + beta k (v - S^T k)^T.

    q, k [B, T, H, K] (L2-normalised inside); v [B, T, Hv, V]; g [B, T, Hv, K] natural-log decay (fp32);
    beta [B, T, Hv]; previous [B, Hv, K, V] fp32 or None. Key heads are repeated over their value-head group.
    Returns o [B, T, Hv, V] and the state after the last token (None unless use_cache). recompute_g: a function
    returning g again bit for bit (chunk_gdn2's: the Triton path then keeps no fp32 copy of g for the backward pass).
    Dispatch: chunkwise (Triton on CUDA, torch on CPU); a few tokens continuing a state use the recurrent step.
    """
    from gdn2.layer import RECURRENT_MAX_TOKENS
    from gdn2.ops import chunk_gdn2, recurrent_step_gdn2
    from gdn2.ops.naive import expand_key_heads

    B, T, Hv, V = v.shape
    K = q.shape[-1]
    q, k = expand_key_heads(q, Hv), expand_key_heads(k, Hv)
    b = beta[..., None].expand(B, T, Hv, K).to(q.dtype).contiguous()
    w = beta[..., None].expand(B, T, Hv, V).to(v.dtype).contiguous()
    if previous is not None and T <= RECURRENT_MAX_TOKENS and not torch.is_grad_enabled():
        state = previous if use_cache else previous.clone()
        o, state = recurrent_step_gdn2(q, k, v, g, b, w, state, use_qk_l2norm_in_kernel=True)
        return o, state if use_cache else None
    return chunk_gdn2(q, k, v, g, b, w, initial_state=previous, output_final_state=use_cache,
                      use_qk_l2norm_in_kernel=True, recompute_g=recompute_g)


# ------------------------------------------------------------------------------------------ fla-format families
class ConfigError(ValueError):
    """A checkpoint config the reference path cannot build (names the field and the value)."""


# The paper's matched delta-rule baselines (Gated DeltaNet, KDA): H = 16, K = V = 128, so 262,144 state floats
# per layer, at GDN-2's 1.3B shape (d_model 2304, 18 layers, Llama-2 vocabulary, 4K training context).
PAPER_DELTA_RULE_CONFIG = dict(hidden_size=2304, num_hidden_layers=18, num_heads=16, head_dim=128, expand_v=1.0,
                               vocab_size=32000, max_position_embeddings=4096)


def fla_settings(config: dict, defaults: dict, source: str = "config.json") -> dict:
    """fla config.json -> the fields a reference model needs: `defaults` (the fla config class's defaults) updated
    by the file, `attn` parsed per layer, the MLP width resolved; features the reference path lacks are refused."""
    s = {**defaults, **{k: v for k, v in config.items() if k in defaults or k == "attn"}}
    if config.get("attnres_block_size") is not None:
        raise ConfigError(f"{source}: attnres_block_size={config['attnres_block_size']} (attention residuals) is not "
                          "supported by the reference path; only standard pre-norm residual blocks are")
    if s.get("hidden_act", "swish") != "swish":
        raise ConfigError(f"{source}: hidden_act={s['hidden_act']!r} is not supported; the MLP must be SwiGLU "
                          "('swish')")
    for field in ("hidden_size", "num_hidden_layers", "vocab_size"):
        value = s.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{source}: field {field!r} must be a positive integer; got {value!r}")
    s["intermediate_size"] = swiglu_width(s["hidden_size"], s.get("hidden_ratio"), s.get("intermediate_size"))
    s["attn_layers"] = parse_attn_section(s.get("attn"), s["num_hidden_layers"], source)
    return s


def parse_attn_section(attn, num_layers: int, source: str = "config.json") -> dict[int, dict]:
    """fla's `attn` config section (a dict or a list of dicts: layers, num_heads, num_kv_heads, qkv_bias,
    window_size, rope_theta) -> {layer index: attention settings with defaults filled}."""
    if attn is None:
        return {}
    specs = [attn] if isinstance(attn, dict) else attn
    if not isinstance(specs, list):
        raise ConfigError(f"{source}: 'attn' must be a dict or a list of dicts; got {attn!r}")
    layers: dict[int, dict] = {}
    for spec in specs:
        if not isinstance(spec, dict) or "layers" not in spec or "num_heads" not in spec:
            raise ConfigError(f"{source}: every 'attn' entry needs 'layers' and 'num_heads'; got {spec!r}")
        settings = dict(num_heads=spec["num_heads"], num_kv_heads=spec.get("num_kv_heads") or spec["num_heads"],
                        qkv_bias=bool(spec.get("qkv_bias", False)), window_size=spec.get("window_size"),
                        rope_theta=float(spec.get("rope_theta", 10000.0)))
        if spec.get("qk_norm"):
            raise ConfigError(f"{source}: attn qk_norm is not supported by the reference path")
        for i in spec["layers"]:
            if not isinstance(i, int) or not 0 <= i < num_layers or i in layers:
                raise ConfigError(f"{source}: attn layer index {i!r} is out of range [0, {num_layers}) or repeated")
            layers[i] = settings
    return layers


def build_mixer_stack(settings: dict, make_mixer, config: Any = None) -> MixerStackLM:
    """fla's block layout from parsed settings: layer i is SlidingWindowAttention when settings['attn_layers'] names
    it, else make_mixer(i); each wrapped as PreNormBlock(RMSNorm, mixer, RMSNorm, SwiGLUMLP)."""
    d, eps = settings["hidden_size"], settings["norm_eps"]
    blocks = []
    for i in range(settings["num_hidden_layers"]):
        spec = settings["attn_layers"].get(i)
        mixer = SlidingWindowAttention(d, layer_idx=i, **spec) if spec is not None else make_mixer(i)
        mlp = SwiGLUMLP(d, settings["intermediate_size"])
        blocks.append(PreNormBlock(RMSNorm(d, eps), mixer, RMSNorm(d, eps), mlp))
    return MixerStackLM(config if config is not None else settings, settings["vocab_size"], d, blocks,
                        RMSNorm(d, eps), tie_word_embeddings=bool(settings.get("tie_word_embeddings", False)))


def keep_fp32(module: nn.Module, names: Sequence[str] = ("A_log", "dt_bias", "D")) -> nn.Module:
    """Put decay parameters back to fp32 after module.to(dtype) (they feed exp / softplus)."""
    for sub in module.modules():
        for name in names:
            p = getattr(sub, name, None)
            if isinstance(p, nn.Parameter):
                p.data = p.data.float()
    return module


FORCE_REFERENCE_ENV = "HARNESS_FORCE_REFERENCE"  # =1: use the pure-torch reference path even where fla would run


class FLAFamilyBase(ModelFamily):
    """A family whose checkpoints are fla-format HF folders (config.json + safetensors) of one fla model class.

    Subclasses set: upstream_class (e.g. "GatedDeltaNetForCausalLM"), upstream_config_class, defaults (the fla
    config class's __init__ defaults, so a config.json that omits a field means what fla means), paper_config and
    tiny_config (dicts in fla's field names); and implement make_mixer(settings, layer_idx) and
    mixer_state_floats(settings). Loading: fla's own model on CUDA when fla (and, for hybrids, flash-attn) imports,
    else the pure-torch reference (same parameter names, gdn2's Triton kernels on CUDA, torch chunkwise on CPU).
    """

    upstream_module = "fla.models"
    upstream_class = ""
    upstream_config_class = ""
    defaults: dict = {}
    paper_config: dict = {}
    tiny_config: dict = {}

    # ---------------------------------------------------------------- config and sizes
    def settings(self, config: dict, source: str = "config.json") -> dict:
        return fla_settings(config, self.defaults, source)

    def make_mixer(self, settings: dict, layer_idx: int) -> nn.Module:
        raise NotImplementedError

    def mixer_state_floats(self, settings: dict) -> int:
        raise NotImplementedError

    def state_floats_per_layer(self, config: dict) -> int:
        return self.mixer_state_floats(self.settings(config))

    # ---------------------------------------------------------------- backends
    def upstream_unavailable(self, device: torch.device, config: dict | None = None) -> str | None:
        """Why fla's own model cannot run here (None: it can)."""
        import importlib
        import os

        if device.type != "cuda":
            return "fla's kernels need CUDA"
        if os.environ.get(FORCE_REFERENCE_ENV) == "1":
            return f"{FORCE_REFERENCE_ENV}=1"
        try:
            importlib.import_module(self.upstream_module)
        except Exception as err:  # not installed, or broken against this torch/triton
            return f"fla is not importable ({type(err).__name__}: {err})"
        if config is not None and config.get("attn"):
            try:
                importlib.import_module("flash_attn")
            except Exception:
                return "flash-attn is not installed (fla's Attention layer needs it)"
        return None

    def upstream_note(self, device: torch.device) -> str:
        """Extra words about the upstream backend on this device (e.g. a known kernel restriction)."""
        return ""

    def backend_for(self, device: torch.device, config: dict | None = None) -> str:
        reason = self.upstream_unavailable(device, config)
        if reason is None:
            import fla

            note = self.upstream_note(device)
            return f"fla {getattr(fla, '__version__', '?')} Triton kernels ({self.upstream_class})" + (
                f"; {note}" if note else "")
        kernels = "gdn2 Triton kernels (ours)" if device.type == "cuda" else "gdn2 torch chunkwise (ours)"
        return f"torch reference + {kernels}; upstream unavailable: {reason}"

    def backend(self, device: torch.device) -> str:
        return self.backend_for(device, None)

    # ---------------------------------------------------------------- builders
    def build_reference(self, config: dict, source: str = "config.json") -> MixerStackLM:
        settings = self.settings(config, source)
        return build_mixer_stack(settings, lambda i: self.make_mixer(settings, i), config=dict(config))

    def build_upstream(self, config: dict) -> nn.Module:
        import importlib

        module = importlib.import_module(self.upstream_module)
        config_class = getattr(module, self.upstream_config_class)
        model_class = getattr(module, self.upstream_class)
        skip = {"architectures", "model_type", "transformers_version", "torch_dtype", "dtype"}
        return model_class(config_class(**{k: v for k, v in config.items() if k not in skip}))

    # ---------------------------------------------------------------- loading
    def load(self, source: str, device: torch.device, dtype: torch.dtype, tokenizer: str | None):
        from pathlib import Path

        from harness.checkpoint import load_tokenizer, load_weights_strict, read_state_dict, resolve_source
        from harness.model import EvalModel
        from harness.registry import read_config

        folder = resolve_source(source)
        config = read_config(folder)
        settings = self.settings(config, str(folder / "config.json"))
        tok = load_tokenizer(folder, tokenizer)
        state = read_state_dict(folder)
        if settings.get("tie_word_embeddings") and "lm_head.weight" not in state and \
                "model.embeddings.weight" in state:
            state["lm_head.weight"] = state["model.embeddings.weight"]
        reason = self.upstream_unavailable(device, config)
        if reason is None:
            lm = self.build_upstream(config)
        else:
            with torch.device("meta"):
                lm = self.build_reference(config, str(folder / "config.json"))
            lm = lm.to_empty(device="cpu")
            if lm.tie_word_embeddings:
                lm.lm_head.weight = lm.model.embeddings.weight
        load_weights_strict(lm, state, str(folder))
        lm = keep_fp32(lm.to(device=device, dtype=dtype).eval())
        full_attention = any(s["window_size"] is None for s in settings["attn_layers"].values())
        attn = settings["attn_layers"]
        info = {"hybrid_attention_layers": sorted(attn)} if attn else {}
        return EvalModel(
            name=Path(source).name or source, family=self.name, lm=lm, tokenizer=tok, device=device, dtype=dtype,
            source=source, backend=self.backend_for(device, config), state_floats=self.mixer_state_floats(settings),
            max_length=settings.get("max_position_embeddings") if full_attention else None,
            trained_length=settings.get("max_position_embeddings"), info=info,
            # our delta-rule mixers mask left padding exactly (tests/test_baselines_fla.py); fla's own models and the
            # hybrids' attention layers are not checked for it, so they prefill each prompt alone
            masks_left_padding=isinstance(lm, MixerStackLM) and lm.masks_left_padding,
        )

    # ---------------------------------------------------------------- conformance (harness/doctor.py)
    def conformance_variants(self) -> list[str]:
        return list(self.conformance_configs())

    def conformance_configs(self) -> dict[str, dict]:
        """Named tiny configs the doctor checks: the plain model, and a hybrid with sliding-window attention."""
        hybrid = {**self.tiny_config, "attn": {"layers": [1], "num_heads": 4, "window_size": 48, "rope_theta": 10000.0}}
        return {"": dict(self.tiny_config), "hybrid": hybrid}

    def conformance_models(self, device: torch.device, variant: str = "") -> tuple[nn.Module, nn.Module]:
        """(upstream_lm, reference_lm) on `device`, fp32, identical random weights (norm weights perturbed so they
        are tested too). Raises harness.doctor.ConformanceSkipped when the upstream cannot run here."""
        from harness.checkpoint import load_weights_strict
        from harness.doctor import ConformanceSkipped

        config = self.conformance_configs()[variant]
        reason = self.upstream_unavailable(device, config)
        if reason is not None:
            raise ConformanceSkipped(reason)
        torch.manual_seed(0)
        upstream = self.build_upstream(config)
        perturb_unit_weights(upstream)
        reference = self.build_reference(config)
        load_weights_strict(reference, upstream.state_dict(), f"{self.upstream_class} (random init)")
        return (upstream.to(device=device, dtype=torch.float32).eval(),
                reference.to(device=device, dtype=torch.float32).eval())


@torch.no_grad()
def perturb_unit_weights(module: nn.Module, scale: float = 0.1, seed: int = 1) -> None:
    """Add noise to 1-D parameters other than decay parameters (norm weights start at 1 and biases at 0, which
    would hide a mix-up between them)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.dim() == 1 and not name.endswith(("A_log", "dt_bias", ".D")):
            p.add_(scale * torch.randn(p.shape, generator=gen).to(p.dtype))


# ------------------------------------------------------------------------------------------ tiny checkpoints
def write_checkpoint_folder(folder, config: dict, state: dict[str, torch.Tensor], tokenizer=None,
                            weights: str = "model.safetensors") -> Path:
    """Write an HF-format folder: config.json, the weights (model.safetensors, or pytorch_model.bin when
    weights ends in .bin) and, when `tokenizer` names a tokenizer folder, its files. For tests and examples:
    `write_checkpoint_folder(tmp, family.tiny_config, lm.state_dict(), BPE_4K)`."""
    import json
    import shutil
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}  # clone: tied weights share storage
    if weights.endswith(".bin"):
        torch.save(tensors, folder / weights)
    else:
        from safetensors.torch import save_file

        save_file(tensors, str(folder / weights), metadata={"format": "pt"})
    if tokenizer is not None:
        for f in Path(tokenizer).iterdir():
            if f.is_file():
                shutil.copy(f, folder / f.name)
    return folder
