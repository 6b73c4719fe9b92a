"""GDN-2 (ours): HF-format folders of our GDN2ForCausalLM, fla-format GatedDeltaNet2 folders, official lit_gpt
checkpoints, and the bundled models.

Formats
- our folders (model_type "gdn2", GDN2Config field names; config.json + safetensors): GDN2ForCausalLM.
- fla-format folders (fla's field names: hidden_ratio, attn_mode, fuse_*...; model_type "gated_deltanet2" or
  architectures GatedDeltaNet2ForCausalLM, or a "gdn2" config carrying fla-only fields). Weights trained with fla's
  GatedDeltaNet2 layer use a SIGMOID output gate; our GDN2Config has the same parameter names and an
  output_gate_activation switch, so they load into GDN2ForCausalLM exactly. fla 0.6.0 ships the layer but no
  config class, so a field the file omits takes KDAConfig's default (the closest fla class; norm_eps 1e-6).
  A config with an fla `attn` section builds a hybrid: GDN-2 mixers interleaved with sliding-window attention.
- lit_gpt checkpoints of the official training code (a .pth file, or a folder holding one, without config.json):
  converted on the fly by baselines.gdn2_lit_gpt (GDN-2 and swa_gdn2 hybrids; also a CLI that writes an HF folder).
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
import torch.nn as nn

from baselines.gdn2_hybrid import build_hybrid
from harness.checkpoint import load_tokenizer, load_weights_strict, read_state_dict, resolve_source
from harness.model import EvalModel
from harness.registry import ModelFamily, read_config, register_family

# fla-only config fields: their presence marks a config written by fla (or its trainer) rather than by GDN2Config.
FLA_ONLY_FIELDS = ("hidden_ratio", "attn_mode", "fuse_norm", "fuse_swiglu", "fuse_cross_entropy",
                   "fuse_linear_cross_entropy", "use_l2warp", "conv_bias", "attn", "attnres_block_size")
FLA_MODEL_TYPES = ("gated_deltanet2",)
FLA_ARCHITECTURES = ("GatedDeltaNet2ForCausalLM",)
# Defaults of an fla GDN-2 config (fla 0.6.0 has none: KDAConfig's, with the fla layer's sigmoid output gate).
FLA_GDN2_DEFAULTS = dict(
    attn_mode="chunk", hidden_size=2048, expand_v=1.0, use_short_conv=True, allow_neg_eigval=False, conv_size=4,
    head_dim=128, num_heads=16, num_v_heads=None, max_position_embeddings=2048, hidden_ratio=4,
    intermediate_size=None, hidden_act="swish", num_hidden_layers=24, norm_eps=1e-6, attn=None,
    tie_word_embeddings=False, vocab_size=32000, conv_bias=False, output_gate_activation="sigmoid",
    bos_token_id=1, eos_token_id=2, pad_token_id=None, initializer_range=0.02,
)


def is_fla_config(config: dict) -> bool:
    """Whether a config.json was written in fla's convention (see FLA_ONLY_FIELDS)."""
    return (config.get("model_type") in FLA_MODEL_TYPES
            or any(a in FLA_ARCHITECTURES for a in config.get("architectures") or [])
            or any(field in config for field in FLA_ONLY_FIELDS))


def gdn2_config_fields(config: dict, source: str = "config.json") -> tuple[dict, dict[int, dict]]:
    """config.json -> (GDN2Config keyword arguments, {layer: sliding-window attention settings} for hybrids)."""
    from baselines.common import ConfigError, fla_settings, gate_activation

    if not is_fla_config(config):
        skip = {"architectures", "model_type", "transformers_version", "torch_dtype", "dtype"}
        return {k: v for k, v in config.items() if k not in skip}, {}
    s = fla_settings(config, FLA_GDN2_DEFAULTS, source)
    if s["conv_bias"]:
        raise ConfigError(f"{source}: conv_bias=true is not supported (GDN-2's short convolutions have no bias)")
    fields = {k: s[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "head_dim",
                                "expand_v", "num_v_heads", "intermediate_size", "conv_size", "use_short_conv",
                                "allow_neg_eigval", "norm_eps", "max_position_embeddings", "tie_word_embeddings",
                                "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range")}
    fields["output_gate_activation"] = gate_activation(s["output_gate_activation"])
    # Tied embeddings load as an untied head holding the same values (GDN2ForCausalLM is built untied).
    fields["tie_word_embeddings"] = False
    return fields, s["attn_layers"]


def build_from_folder(folder: Path) -> nn.Module:
    """Our GDN2ForCausalLM (or the hybrid stack for an fla config with `attn`) from config.json + weights, loaded
    strictly (named errors on any mismatch)."""
    config = read_config(folder)
    lm = build_model(config, str(folder / "config.json"), meta=True)
    state = read_state_dict(folder)
    if config.get("tie_word_embeddings") and "lm_head.weight" not in state and "model.embeddings.weight" in state:
        state["lm_head.weight"] = state["model.embeddings.weight"]
    load_weights_strict(lm, state, str(folder))
    return lm


def build_model(config: dict, source: str = "config.json", meta: bool = False) -> nn.Module:
    """An uninitialised-or-random model for a config.json dict (meta=True: parameters allocated, not initialised)."""
    from gdn2 import GDN2Config, GDN2ForCausalLM

    fields, attn_layers = gdn2_config_fields(config, source)
    gdn2_config = GDN2Config(**fields)
    with torch.device("meta") if meta else contextlib.nullcontext():
        lm = GDN2ForCausalLM(gdn2_config) if not attn_layers else build_hybrid(gdn2_config, attn_layers)
    if meta:
        lm = lm.to_empty(device="cpu")
        if gdn2_config.tie_word_embeddings and not attn_layers:
            lm.lm_head.weight = lm.model.embeddings.weight   # to_empty gives each name its own storage
    return lm


LIT_GPT_SUFFIXES = (".pth", ".pt", ".ckpt")


def is_lit_gpt_source(source: str) -> bool:
    """A lit_gpt checkpoint: a .pth/.pt/.ckpt file, or a folder without config.json that holds one."""
    path = Path(source).expanduser()
    if path.is_file():
        return path.suffix in LIT_GPT_SUFFIXES
    return path.is_dir() and not (path / "config.json").exists() and any(
        f.suffix in LIT_GPT_SUFFIXES for f in path.iterdir())


@register_family("gdn2", "gated_deltanet2")
class GDN2Family(ModelFamily):
    model_types = ("gdn2",) + FLA_MODEL_TYPES
    architectures = ("GDN2ForCausalLM",) + FLA_ARCHITECTURES
    loads_from = ("HF folders of gdn2.GDN2ForCausalLM; fla-format GatedDeltaNet2 folders (sigmoid gate, hybrids "
                  "via attn); official lit_gpt .pth checkpoints (GDN-2, swa hybrids); bundled models")
    paper_config = dict(model_type="gdn2", vocab_size=32000, hidden_size=2304, num_hidden_layers=18, num_heads=16,
                        head_dim=128, intermediate_size=6208, max_position_embeddings=4096)

    def backend(self, device: torch.device) -> str:
        return "gdn2 Triton kernels (ours)" if device.type == "cuda" else "gdn2 torch chunkwise (ours)"

    def state_floats_per_layer(self, config: dict) -> int:
        from gdn2 import GDN2Config

        return GDN2Config(**gdn2_config_fields(config)[0]).state_floats_per_layer()

    def load(self, source: str, device: torch.device, dtype: torch.dtype, tokenizer: str | None) -> EvalModel:
        from harness import bundled

        if source in bundled.BUNDLED:
            return self._load_bundled(source, bundled.BUNDLED[source], device, dtype, tokenizer)
        if is_lit_gpt_source(source):
            from baselines.gdn2_lit_gpt import convert_lit_gpt_checkpoint, find_lit_gpt_file

            file = find_lit_gpt_file(Path(source).expanduser())
            lm = convert_lit_gpt_checkpoint(file)
            model = self._wrap(source, lm, load_tokenizer(_tokenizer_folder(file.parent, tokenizer), tokenizer),
                               device, dtype)
            model.info["converted_from"] = f"lit_gpt checkpoint {file}"
            return model
        folder = resolve_source(source)
        config = read_config(folder)
        lm = build_from_folder(folder)
        model = self._wrap(source, lm, load_tokenizer(folder, tokenizer), device, dtype)
        if is_fla_config(config):
            model.info["checkpoint_format"] = "fla GatedDeltaNet2 (output gate: %s)" % (
                lm.config.output_gate_activation)
        return model

    def _load_bundled(self, name, entry, device, dtype, tokenizer) -> EvalModel:
        from gdn2 import GDN2ForCausalLM, named_config

        if entry.folder is not None:
            lm = build_from_folder(entry.folder)
        else:
            torch.manual_seed(entry.seed)
            lm = GDN2ForCausalLM(named_config(entry.random_config, **dict(entry.config_overrides)))
        model = self._wrap(name, lm, load_tokenizer(entry.tokenizer, tokenizer), device, dtype)
        model.info["bundled"] = entry.description
        return model

    def _wrap(self, source: str, lm, tokenizer, device, dtype) -> EvalModel:
        from baselines.common import SlidingWindowAttention, keep_fp32
        from gdn2 import GDN2ForCausalLM

        lm = keep_fp32(lm.to(device=device, dtype=dtype).eval(), names=("A_log", "dt_bias"))
        config = lm.config
        attention = [m for m in lm.modules() if isinstance(m, SlidingWindowAttention)]
        full_attention = any(m.window_size is None for m in attention)
        info = {"hybrid_attention_layers": [m.layer_idx for m in attention]} if attention else {}
        return EvalModel(
            name=Path(source).name or source, family=self.name, lm=lm, tokenizer=tokenizer, device=device,
            dtype=dtype, source=source, backend=self.backend(device),
            state_floats=config.state_floats_per_layer(),
            max_length=config.max_position_embeddings if full_attention else None,
            trained_length=config.max_position_embeddings, info=info,
            # GDN2ForCausalLM masks left padding exactly (tests/test_gdn2_padding.py); attention layers are not
            # checked for it, so hybrids prefill each prompt alone
            masks_left_padding=isinstance(lm, GDN2ForCausalLM) and not attention,
        )

    # ---------------------------------------------------------------- conformance (harness/doctor.py)
    tiny_config = dict(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_heads=2, head_dim=32,
                       intermediate_size=256, output_gate_activation="sigmoid", norm_eps=1e-5)

    def conformance_models(self, device: torch.device, variant: str = ""):
        """(our GDN2ForCausalLM with each mixer replaced by fla's GatedDeltaNet2 layer (fla's Triton kernels),
        our GDN2ForCausalLM (our kernels)); same random weights, sigmoid output gate as fla's layer, fp32."""
        from baselines.common import perturb_unit_weights
        from gdn2 import GDN2Config, GDN2ForCausalLM
        from harness.doctor import ConformanceSkipped

        if device.type != "cuda":
            raise ConformanceSkipped("fla's GDN-2 kernels need CUDA")
        try:
            from fla.layers.gdn2 import GatedDeltaNet2 as FLAGatedDeltaNet2
        except Exception as err:
            raise ConformanceSkipped(f"fla.layers.gdn2 is not importable ({type(err).__name__}: {err})") from err
        torch.manual_seed(0)
        config = GDN2Config(**self.tiny_config)
        reference = GDN2ForCausalLM(config)
        perturb_unit_weights(reference)
        upstream = copy.deepcopy(reference)
        for block in upstream.model.layers:
            ours = block.attn
            theirs = FLAGatedDeltaNet2(hidden_size=config.hidden_size, expand_v=config.expand_v,
                                       head_dim=config.head_dim, num_heads=config.num_heads,
                                       num_v_heads=config.num_v_heads, use_short_conv=config.use_short_conv,
                                       allow_neg_eigval=config.allow_neg_eigval, conv_size=config.conv_size,
                                       layer_idx=0, norm_eps=config.norm_eps)
            theirs.load_state_dict(ours.state_dict(), strict=True)
            block.attn = FLALayerAdapter(theirs)
        return (upstream.to(device=device, dtype=torch.float32).eval(),
                reference.to(device=device, dtype=torch.float32).eval())


class FLALayerAdapter(nn.Module):
    """An fla token-mixer layer behind our mixer protocol: forward(x, state, use_cache) -> (y, state), where the
    state is a one-layer fla Cache (the wrapped layer must have layer_idx 0)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states: torch.Tensor, state=None, use_cache: bool = False):
        from fla.models.utils import Cache

        if use_cache and state is None:
            state = Cache()
        out = self.layer(hidden_states, past_key_values=state, use_cache=use_cache)
        return out[0], (state if use_cache else None)


def _tokenizer_folder(folder: Path, explicit: str | None) -> Path | None:
    """The checkpoint's folder when it holds tokenizer files (or an explicit tokenizer is given), else None
    (load_tokenizer then says to pass --tokenizer)."""
    if explicit:
        return folder
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    return folder if any((folder / n).is_file() for n in names) else None
