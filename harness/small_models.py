"""Matched small models of every family, built from the registry's own model code and saved in each family's
checkpoint format (what scripts/train_small.py trains and harness/bundled ships).

Every model has the same backbone: `layers` pre-norm blocks of (token mixer, SwiGLU MLP), RMSNorm, embeddings
tied to the LM head, width `hidden_size`, and the same parameter budget: each model's MLP width is the one that
brings its parameter count closest to GDN-2's (`matched_shape`). The recurrent mixers hold the same state per
layer, 64 * hidden_size floats:

| name | family | mixer | state per layer |
|---|---|---|---|
| gdn2 | gdn2 | GDN-2: H = d/64 heads, K = V = 64, channel-wise erase (K) and write (V) gates | H K V |
| gdn2-scalar-erase | gdn2 | as gdn2, erase gate one per head (paper Table 5 "w-only") | H K V |
| gdn2-scalar-write | gdn2 | as gdn2, write gate one per head (paper Table 5 "b-only") | H K V |
| gated_deltanet | gated_deltanet | Gated DeltaNet: scalar decay and beta per head, K = V = 64 | H K V |
| kda | kda | KDA: channel-wise decay, beta per head, K = V = 64 | H K V |
| mamba2 | mamba2 | Mamba-2: expand 2, head dim 64, d_state 32 | 2d x 32 |
| mamba3 | mamba3 | Mamba-3 SISO: expand 2, head dim 64, d_state 32 | 2d x 32 |
| transformer | transformer | Llama attention, d/64 heads of 64, RoPE | KV cache: 2 d per token |

Formats: gdn2 our HF folders; gated_deltanet / kda fla's; mamba2 / mamba3 mamba-ssm's MambaLMHeadModel (the one
format of theirs with an MLP per block); transformer HF Llama. A checkpoint is config.json + model.safetensors
(bf16; the tied LM head is not stored) + the tokenizer files.

Initialisation is one rule for every family (fla's): embeddings and every linear layer N(0, 0.02), biases 0, the
projections that write to the residual stream scaled by 1/sqrt(2 * layers); each mixer's own parameters (decay
rates, dt biases, D, convolutions) keep the initialisation its constructor gives them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

INIT_STD = 0.02
RESIDUAL_OUTPUTS = ("o_proj", "out_proj", "down_proj", "fc2")   # linear layers that write the residual stream
TIED_HEAD = "lm_head.weight"    # every format's name of the head; tied to the embeddings, so not stored


@dataclass(frozen=True)
class Shape:
    """The shared backbone. state per recurrent layer = 64 * hidden_size floats (head/state dims fixed below)."""

    hidden_size: int = 128
    layers: int = 4
    mlp_width: int = 192
    vocab_size: int = 4096
    max_length: int = 1024          # training context (the transformer's max_position_embeddings)
    head_dim: int = 64
    bos_token_id: int = 0
    eos_token_id: int = 0

    def __post_init__(self):
        if self.hidden_size % self.head_dim or self.mlp_width % 8:
            raise ValueError(f"hidden_size must be a multiple of {self.head_dim} and mlp_width of 8; got {self}")

    @property
    def heads(self) -> int:
        return self.hidden_size // self.head_dim

    @property
    def mamba_state_size(self) -> int:
        """d_state of the Mamba mixers that matches the delta-rule state: 2d * N = (d/64) * 64 * 64."""
        return self.heads * self.head_dim * self.head_dim // (2 * self.hidden_size)


def _gdn2(shape: Shape, erase_gate: str = "channel", write_gate: str = "channel") -> dict:
    return dict(model_type="gdn2", architectures=["GDN2ForCausalLM"], vocab_size=shape.vocab_size,
                hidden_size=shape.hidden_size, num_hidden_layers=shape.layers, num_heads=shape.heads,
                head_dim=shape.head_dim, intermediate_size=shape.mlp_width, erase_gate=erase_gate,
                write_gate=write_gate, max_position_embeddings=shape.max_length, tie_word_embeddings=True,
                bos_token_id=shape.bos_token_id, eos_token_id=shape.eos_token_id)


def _fla_delta(shape: Shape, model_type: str, architecture: str) -> dict:
    return dict(model_type=model_type, architectures=[architecture], vocab_size=shape.vocab_size,
                hidden_size=shape.hidden_size, num_hidden_layers=shape.layers, num_heads=shape.heads,
                head_dim=shape.head_dim, expand_v=1.0, intermediate_size=shape.mlp_width, norm_eps=1e-5,
                max_position_embeddings=shape.max_length, tie_word_embeddings=True,
                bos_token_id=shape.bos_token_id, eos_token_id=shape.eos_token_id)


def _mamba_ssm(shape: Shape, layer: str) -> dict:
    return dict(d_model=shape.hidden_size, n_layer=shape.layers, d_intermediate=shape.mlp_width,
                vocab_size=shape.vocab_size, pad_vocab_size_multiple=8, rms_norm=True, residual_in_fp32=True,
                fused_add_norm=True, tie_embeddings=True,
                ssm_cfg=dict(layer=layer, d_state=shape.mamba_state_size, headdim=shape.head_dim, expand=2),
                attn_layer_idx=[], attn_cfg={})


def _llama(shape: Shape) -> dict:
    return dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=shape.vocab_size,
                hidden_size=shape.hidden_size, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                num_key_value_heads=shape.heads, intermediate_size=shape.mlp_width, rms_norm_eps=1e-5,
                max_position_embeddings=shape.max_length, tie_word_embeddings=True, rope_theta=10000.0,
                bos_token_id=shape.bos_token_id, eos_token_id=shape.eos_token_id)


# name -> (family, config builder, one line for tables)
SMALL_MODELS: dict[str, tuple[str, Callable[[Shape], dict], str]] = {
    "gdn2": ("gdn2", _gdn2, "GDN-2 (channel erase + channel write)"),
    "gdn2-scalar-erase": ("gdn2", lambda s: _gdn2(s, erase_gate="scalar"), "GDN-2, scalar erase gate (w-only)"),
    "gdn2-scalar-write": ("gdn2", lambda s: _gdn2(s, write_gate="scalar"), "GDN-2, scalar write gate (b-only)"),
    "gated_deltanet": ("gated_deltanet", lambda s: _fla_delta(s, "gated_deltanet", "GatedDeltaNetForCausalLM"),
                       "Gated DeltaNet"),
    "kda": ("kda", lambda s: _fla_delta(s, "kda", "KDAForCausalLM"), "KDA"),
    "mamba2": ("mamba2", lambda s: _mamba_ssm(s, "Mamba2"), "Mamba-2"),
    "mamba3": ("mamba3", lambda s: _mamba_ssm(s, "Mamba3"), "Mamba-3 (SISO)"),
    "transformer": ("transformer", _llama, "Transformer (Llama)"),
}


def small_config(name: str, shape: Shape) -> dict:
    """config.json of small model `name` (see SMALL_MODELS) at `shape`."""
    if name not in SMALL_MODELS:
        raise KeyError(f"unknown small model {name!r}; known: {', '.join(SMALL_MODELS)}")
    return SMALL_MODELS[name][1](shape)


def matched_shape(name: str, reference: Shape, reference_model: str = "gdn2") -> Shape:
    """`reference` with the MLP width that brings model `name`'s parameter count closest to the reference model's
    (the budget is matched by MLP width, 3 * hidden_size * layers parameters per unit; the Mamba MLPs move in steps
    of 128, mamba-ssm's rule)."""
    if name == reference_model:
        return reference
    target = count_params(build(reference_model, reference, on_meta=True)[0])[0]
    step = 128 if SMALL_MODELS[name][0] in ("mamba2", "mamba3") else 8
    narrowest = dataclasses.replace(reference, mlp_width=step)
    own = count_params(build(name, narrowest, on_meta=True)[0])[0]
    per_unit = 3 * reference.hidden_size * reference.layers
    width = step + (target - own) / per_unit
    return dataclasses.replace(reference, mlp_width=max(step, step * round(width / step)))


def build(name: str, shape: Shape, on_meta: bool = False) -> tuple[nn.Module, dict]:
    """(randomly initialised causal LM, its config.json dict), fp32 on CPU, built by the family's own code
    (on_meta: parameters on the meta device, uninitialised: for counting)."""
    config = small_config(name, shape)
    with torch.device("meta") if on_meta else contextlib.nullcontext():
        lm = _build_family(name, config)
    if not on_meta:
        initialise(lm, shape.layers)
    return lm, config


def _build_family(name: str, config: dict) -> nn.Module:
    family = SMALL_MODELS[name][0]
    if family == "gdn2":
        from baselines.gdn2 import build_model
        lm = build_model(config)
    elif family in ("gated_deltanet", "kda"):
        from harness.registry import get_family
        lm = get_family(family).build_reference(config)
    elif family == "mamba2":
        from baselines.mamba2 import build_mamba2, mamba2_configs
        lm = build_mamba2(mamba2_configs(config))
    elif family == "mamba3":
        from baselines.mamba3 import build_mamba3, mamba3_configs
        lm = build_mamba3(mamba3_configs(config))
    else:
        from baselines.transformer import build_llama
        lm = build_llama(config)
    return lm


@torch.no_grad()
def initialise(lm: nn.Module, num_layers: int, std: float = INIT_STD) -> None:
    """The one initialisation rule (module docstring): linears and embeddings N(0, std), residual outputs scaled."""
    for name, module in lm.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            scale = 1.0 / math.sqrt(2 * num_layers) if name.rsplit(".", 1)[-1] in RESIDUAL_OUTPUTS else 1.0
            nn.init.normal_(module.weight, std=std * scale)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


def checkpoint_state(lm: nn.Module, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores: the format's names, the tied head left out, floating tensors in `dtype`
    except the decay parameters that the loaders keep in fp32 (stored fp32)."""
    state = {}
    for key, tensor in lm.state_dict().items():
        if key == TIED_HEAD:
            continue
        if key.startswith("backbone.embeddings."):          # mamba-ssm's name (the loader renames it back)
            key = "backbone.embedding." + key[len("backbone.embeddings."):]
        keep_fp32 = key.rsplit(".", 1)[-1] in ("A_log", "dt_bias", "D", "B_bias", "C_bias")
        state[key] = tensor.detach().to("cpu", torch.float32 if keep_fp32 else dtype).contiguous().clone()
    return state


def save(folder: str | Path, lm: nn.Module, config: dict, tokenizer_dir: str | Path) -> Path:
    """Write config.json, model.safetensors and the tokenizer files of `tokenizer_dir` into `folder`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(checkpoint_state(lm), str(folder / "model.safetensors"), metadata={"format": "pt"})
    for file in Path(tokenizer_dir).iterdir():
        if file.name == "tokenizer.json":   # written compact: the same tokenizer in 40% of the bytes
            compact = json.dumps(json.loads(file.read_text(encoding="utf-8")), separators=(",", ":"),
                                 ensure_ascii=False)
            (folder / file.name).write_text(compact, encoding="utf-8")
        elif file.is_file() and file.name.startswith("tokenizer"):
            shutil.copy(file, folder / file.name)
    return folder


def count_params(lm: nn.Module) -> tuple[int, int]:
    """(all parameters, non-embedding parameters); a tied head counts once, with the embeddings."""
    unique = {id(p): p for p in lm.parameters()}
    total = sum(p.numel() for p in unique.values())
    embedding = sum(m.weight.numel() for m in lm.modules() if isinstance(m, nn.Embedding))
    return total, total - embedding


def state_floats_per_layer(name: str, config: dict) -> int:
    """Recurrent state floats per layer of small model `name` (0 for the transformer), as the registry counts."""
    from harness.registry import get_family
    return get_family(SMALL_MODELS[name][0]).state_floats_per_layer(config)
