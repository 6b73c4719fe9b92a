"""GDN-2 (ours): HF-format folders of our GDN2ForCausalLM, and the bundled models.

One module for the whole family: how checkpoints load, which backend runs, the recurrent state size.
"""
from __future__ import annotations

from pathlib import Path

import torch

from harness.checkpoint import load_tokenizer, load_weights_strict, read_state_dict, resolve_source
from harness.model import EvalModel
from harness.registry import ModelFamily, read_config, register_family


@register_family("gdn2", "gated_deltanet2")
class GDN2Family(ModelFamily):
    model_types = ("gdn2",)
    architectures = ("GDN2ForCausalLM",)
    loads_from = "HF folders of gdn2.GDN2ForCausalLM (config.json + safetensors); bundled models"

    def backend(self, device: torch.device) -> str:
        return "triton (ours)" if device.type == "cuda" else "torch chunkwise (ours)"

    def state_floats_per_layer(self, config: dict) -> int:
        from gdn2 import GDN2Config

        return GDN2Config(**_config_fields(config)).state_floats_per_layer()

    def load(self, source: str, device: torch.device, dtype: torch.dtype, tokenizer: str | None) -> EvalModel:
        from harness import bundled

        if source in bundled.BUNDLED:
            return self._load_bundled(source, bundled.BUNDLED[source], device, dtype, tokenizer)
        folder = resolve_source(source)
        lm = build_from_folder(folder)
        return self._wrap(source, lm, load_tokenizer(folder, tokenizer), device, dtype)

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
        lm = lm.to(device=device, dtype=dtype).eval()
        for module in lm.modules():   # decay parameters stay fp32 (they feed exp/softplus)
            for name in ("A_log", "dt_bias"):
                if hasattr(module, name):
                    getattr(module, name).data = getattr(module, name).data.float()
        config = lm.config
        return EvalModel(
            name=Path(source).name or source, family=self.name, lm=lm, tokenizer=tokenizer, device=device,
            dtype=dtype, source=source, backend=self.backend(device),
            state_floats=config.state_floats_per_layer(), max_length=None,
            trained_length=config.max_position_embeddings,
        )


def _config_fields(config: dict) -> dict:
    """config.json minus the keys transformers adds on save."""
    skip = {"architectures", "model_type", "transformers_version", "torch_dtype", "dtype"}
    return {k: v for k, v in config.items() if k not in skip}


def build_from_folder(folder: Path):
    """GDN2ForCausalLM from config.json + weights, loaded strictly (named errors on any mismatch)."""
    from gdn2 import GDN2Config, GDN2ForCausalLM

    config = GDN2Config(**_config_fields(read_config(folder)))
    with torch.device("meta"):
        lm = GDN2ForCausalLM(config)
    lm = lm.to_empty(device="cpu")
    state = read_state_dict(folder)
    load_weights_strict(lm, state, str(folder))
    return lm
