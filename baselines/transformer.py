"""Transformer reference: Llama-style HF folders (config.json + safetensors) through transformers' LlamaForCausalLM.

Runs on CPU and GPU alike (transformers' own code; SDPA attention). The hard context limit is the config's
max_position_embeddings: EvalModel refuses longer inputs unless the user opts in with allow_longer_context.

For the doctor, `reference_from_llama` rebuilds a Llama as a MixerStackLM of baselines.common pieces (full causal
SlidingWindowAttention with RoPE, SwiGLU MLP, RMSNorm): the check that transformers and our attention layer, which
the hybrids use, compute the same thing.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from harness.registry import ModelFamily, register_family

LLAMA_TYPES = ("llama",)


def _config_without_meta(config: dict) -> dict:
    skip = {"architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path"}
    return {k: v for k, v in config.items() if k not in skip}


def llama_config(config: dict, source: str = "config.json"):
    """transformers LlamaConfig from a config.json dict (refuses non-Llama model types, naming the value)."""
    from transformers import LlamaConfig

    model_type = config.get("model_type")
    if model_type not in LLAMA_TYPES:
        raise ValueError(f"{source}: model_type={model_type!r} is not a Llama-style model; the transformer family "
                         f"loads model_type in {LLAMA_TYPES}")
    fields = _config_without_meta(config)
    fields.pop("model_type", None)
    return LlamaConfig(**fields)


def build_llama(config: dict, source: str = "config.json") -> nn.Module:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(llama_config(config, source))


def rope_theta(hf_config) -> float:
    params = getattr(hf_config, "rope_parameters", None) or {}
    if params.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type={params.get('rope_type')!r} (RoPE scaling) is not supported by the reference")
    return float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


def reference_from_llama(hf_model: nn.Module) -> nn.Module:
    """The same network as a MixerStackLM of baselines.common pieces, weights copied (doctor's conformance)."""
    from baselines.common import MixerStackLM, PreNormBlock, RMSNorm, SlidingWindowAttention, SwiGLUMLP

    c = hf_model.config
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise ValueError("attention_bias / mlp_bias Llamas are not supported by the reference")
    if getattr(c, "head_dim", None) not in (None, c.hidden_size // c.num_attention_heads):
        raise ValueError("head_dim != hidden_size / num_attention_heads is not supported by the reference")
    blocks = [PreNormBlock(RMSNorm(c.hidden_size, c.rms_norm_eps),
                           SlidingWindowAttention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
                                                  window_size=None, rope_theta=rope_theta(c), layer_idx=i),
                           RMSNorm(c.hidden_size, c.rms_norm_eps), SwiGLUMLP(c.hidden_size, c.intermediate_size))
              for i in range(c.num_hidden_layers)]
    ref = MixerStackLM(c.to_dict(), c.vocab_size, c.hidden_size, blocks, RMSNorm(c.hidden_size, c.rms_norm_eps),
                       tie_word_embeddings=bool(c.tie_word_embeddings))
    renames = {"model.embed_tokens.": "model.embeddings.", ".self_attn.": ".attn.",
               ".input_layernorm.": ".attn_norm.", ".post_attention_layernorm.": ".mlp_norm."}
    state = {}
    for name, tensor in hf_model.state_dict().items():
        for old, new in renames.items():
            name = name.replace(old, new)
        state[name] = tensor
    ref.load_state_dict(state, strict=True)
    return ref


@register_family("transformer", "llama")
class TransformerFamily(ModelFamily):
    model_types = LLAMA_TYPES
    architectures = ("LlamaForCausalLM",)
    loads_from = "Llama-style HF folders (config.json + safetensors) via transformers.LlamaForCausalLM"
    paper_config = dict(model_type="llama", hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                        num_key_value_heads=16, intermediate_size=5632, vocab_size=32000, max_position_embeddings=4096)
    tiny_config = dict(model_type="llama", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=256, vocab_size=512, max_position_embeddings=512,
                       rms_norm_eps=1e-5, tie_word_embeddings=False)

    def backend(self, device: torch.device) -> str:
        return f"transformers LlamaForCausalLM (sdpa) on {device.type}"

    def state_floats_per_layer(self, config: dict) -> int:
        return 0  # attention keeps a KV cache that grows with the context, no fixed recurrent state

    def kv_floats_per_token_per_layer(self, config: dict) -> int:
        heads = config.get("num_attention_heads", 32)
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        return 2 * kv_heads * head_dim

    def load(self, source: str, device: torch.device, dtype: torch.dtype, tokenizer: str | None):
        from harness.checkpoint import load_tokenizer, load_weights_strict, read_state_dict, resolve_source
        from harness.model import EvalModel
        from harness.registry import read_config

        folder = resolve_source(source)
        config = read_config(folder)
        lm = build_llama(config, str(folder / "config.json"))
        tok = load_tokenizer(folder, tokenizer)
        state = read_state_dict(folder)
        if lm.config.tie_word_embeddings and "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        load_weights_strict(lm, state, str(folder))
        lm = lm.to(device=device, dtype=dtype).eval()
        return EvalModel(
            name=Path(source).name or source, family=self.name, lm=lm, tokenizer=tok, device=device, dtype=dtype,
            source=source, backend=self.backend(device), state_floats=0,
            max_length=int(lm.config.max_position_embeddings), trained_length=int(lm.config.max_position_embeddings),
            info={"kv_cache_floats_per_token_per_layer": self.kv_floats_per_token_per_layer(config)},
        )

    def conformance_models(self, device: torch.device, variant: str = ""):
        """(transformers LlamaForCausalLM, the same weights as a baselines.common MixerStackLM), fp32 on device."""
        torch.manual_seed(0)
        upstream = build_llama(self.tiny_config)
        from baselines.common import perturb_unit_weights

        perturb_unit_weights(upstream)
        reference = reference_from_llama(upstream)
        return (upstream.to(device=device, dtype=torch.float32).eval(),
                reference.to(device=device, dtype=torch.float32).eval())
