"""GDN-2 causal language model (transformers PreTrainedModel; module names follow fla's models).

model.embeddings -> L x [ x += attn(attn_norm(x));  x += mlp(mlp_norm(x)) ] -> model.norm -> lm_head (untied)
where attn is the GDN-2 mixer (gdn2/layer.py) and mlp a SwiGLU MLP. With autograd on, each pre-norm runs with the
linears reading it as one Function (gdn2.fused.rms_norm_linears), which recomputes the normed x in the backward pass.
Decoding carries a GDN2Cache: per layer the fp32 recurrent state [B, Hv, K, V] and the short-conv inputs, O(1) memory
per generated token.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from gdn2.cache import RecurrentCache, check_forward_args, left_padding_mask, run_layers
from gdn2.configuration import GDN2Config
from gdn2.fused import causal_lm_loss, norm_linears, plain, rms_norm, silu_mul, swiglu_down
from gdn2.layer import GatedDeltaNet2, GDN2LayerState

# The GDN-2 model's cache is the shared recurrent cache (one GDN2LayerState per layer); the name stays for users.
GDN2Cache = RecurrentCache


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, computed in fp32 (gdn2.fused.rms_norm: keeps x and 1/rms for the backward)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class SwiGLUMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases (gdn2.fused.swiglu_down: the product is recomputed in the backward)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, norm: RMSNorm | None = None) -> torch.Tensor:
        """x [B, T, d] -> [B, T, d]; norm: the block's pre-norm, applied here to x with gate_proj and up_proj as one
        Function (gdn2.fused.rms_norm_linears: the normed x is recomputed in the backward, not kept)."""
        gate, up = norm_linears(x, norm, (self.gate_proj, self.up_proj))
        if plain(self.down_proj, nn.Linear):
            return swiglu_down(gate, up, self.down_proj.weight)
        return self.down_proj(silu_mul(gate, up))


class GDN2Block(nn.Module):
    """Pre-norm block: x += mixer(norm(x)); x += mlp(norm(x))."""

    def __init__(self, config: GDN2Config, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.attn = GatedDeltaNet2(
            hidden_size=config.hidden_size,
            num_heads=config.num_heads,
            head_dim=config.head_dim,
            expand_v=config.expand_v,
            num_v_heads=config.num_v_heads,
            conv_size=config.conv_size,
            use_short_conv=config.use_short_conv,
            allow_neg_eigval=config.allow_neg_eigval,
            erase_gate=config.erase_gate,
            write_gate=config.write_gate,
            output_gate_activation=config.output_gate_activation,
            norm_eps=config.norm_eps,
            layer_idx=layer_idx,
        )
        self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, state: GDN2LayerState | None, use_cache: bool, token_mask: torch.Tensor | None = None):
        """x [B, T, d] -> (x [B, T, d], the mixer's new state). With autograd on and no token_mask, each pre-norm runs
        inside the mixer and the MLP with the linears reading it (its output is not kept for the backward pass);
        otherwise (inference, left padding) the norms run first, as separate modules."""
        fuse = torch.is_grad_enabled() and token_mask is None
        norm = self.attn_norm if fuse and plain(self.attn_norm, RMSNorm) else None     # wrapped or hooked: as itself
        mixed, new_state = self.attn(x if norm is not None else self.attn_norm(x), state=state, use_cache=use_cache,
                                     token_mask=token_mask, norm=norm)
        x = x + mixed
        norm = self.mlp_norm if fuse and plain(self.mlp_norm, RMSNorm) else None
        return x + self.mlp(x if norm is not None else self.mlp_norm(x), norm=norm), new_state


class GDN2PreTrainedModel(PreTrainedModel):
    config_class = GDN2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GDN2Block"]

    def chunk_recompute_enable(self, enable: bool = True, layers: int | None = None) -> None:
        """GDN-2 mixers keep only their chunk operator's inputs for the backward pass and recompute the operator's
        intermediates there: 30 KB less per token and layer at the 1.3B shapes in bf16, for one more chunk forward
        per layer (lighter than gradient_checkpointing_enable(), which recomputes whole blocks). layers: how many
        mixers do so, from the first (None: all), to trade memory for time between the two ends."""
        mixers = [module for module in self.modules() if isinstance(module, GatedDeltaNet2)]
        count = len(mixers) if layers is None else layers
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= len(mixers):
            raise ValueError(f"chunk_recompute_enable(layers=...) takes a number of mixers from 0 to {len(mixers)} "
                             f"(None: all); got {layers!r}")
        for index, module in enumerate(mixers):
            module.recompute_chunk = enable and index < count

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Embeddings, head and MLP: N(0, initializer_range); mixers keep their own (official) init."""
        if isinstance(module, GatedDeltaNet2):
            module.reset_parameters()
            for sub in module.modules():
                sub._is_hf_initialized = True
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        elif isinstance(module, nn.Linear) and not getattr(module, "_is_hf_initialized", False):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (RMSNorm,)):
            nn.init.ones_(module.weight)


class GDN2Model(GDN2PreTrainedModel):
    def __init__(self, config: GDN2Config):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([GDN2Block(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.gradient_checkpointing = False      # set by gradient_checkpointing_enable(): recompute each block
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, value):
        self.embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: GDN2Cache | None = None,
        use_cache: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """input_ids [B, T] (or inputs_embeds [B, T, d]). attention_mask [B, seen + T] may mark left padding
        (0s before a row's tokens; what generate() gets from a tokenizer with padding_side='left'): padded positions
        leave every recurrent state and conv input unchanged, so each row computes what it computes alone. Right
        padding is refused (it would sit between a prompt and its continuation)."""
        check_forward_args(None, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        use_cache = self.config.use_cache if use_cache is None else use_cache
        token_mask = left_padding_mask(attention_mask, x.shape[1])
        layer_kwargs = {"token_mask": token_mask} if token_mask is not None else {}
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            if use_cache:
                raise ValueError("gradient checkpointing recomputes blocks in the backward pass and carries no "
                                 "cache: pass use_cache=False")
            for layer in self.layers:           # each block's inputs kept, its inside recomputed in the backward
                x, _ = self._gradient_checkpointing_func(layer.__call__, x, None, False, **layer_kwargs)
        else:
            x, past_key_values = run_layers(self.layers, x, past_key_values, use_cache, **layer_kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x), past_key_values=past_key_values)


class GDN2ForCausalLM(GDN2PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}  # tied only if config says so

    def __init__(self, config: GDN2Config):
        super().__init__(config)
        self.model = GDN2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model builds its own GDN2Cache

    def get_input_embeddings(self):
        return self.model.embeddings

    def set_input_embeddings(self, value):
        self.model.embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: GDN2Cache | None = None,
        use_cache: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits [B, T, vocab] (fp32-upcast is left to the caller); loss when labels [B, T] are given (shifted
        inside, -100 ignored). logits_to_keep > 0 computes only the last that many positions' logits.
        With labels and autograd on (training), the loss is the chunked linear cross-entropy (gdn2.fused) and the
        logits are not formed (None): [tokens, vocab] fp32 logits and their gradient would be the largest
        activations of the step. (Unless lm_head is wrapped or hooked: then it runs as itself, see
        gdn2.fused.plain.)"""
        out = self.model(
            input_ids=input_ids, inputs_embeds=inputs_embeds, past_key_values=past_key_values,
            use_cache=use_cache, attention_mask=attention_mask, **kwargs,
        )
        if labels is not None and logits_to_keep:
            raise ValueError("labels need the logits of every position: pass logits_to_keep=0 with labels")
        hidden = out.last_hidden_state
        if labels is not None and torch.is_grad_enabled() and plain(self.lm_head, nn.Linear):
            loss = causal_lm_loss(hidden, self.lm_head.weight, labels)
            return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=out.past_key_values)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, use_cache=True, **kwargs):
        """Feed only the tokens the cache has not seen yet (the attention mask goes along: left padding is skipped
        exactly, right padding refused)."""
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            input_ids = input_ids[:, past_key_values.get_seq_length():]
            inputs_embeds = None
        inputs = {"past_key_values": past_key_values, "use_cache": use_cache, "attention_mask": attention_mask}
        if inputs_embeds is not None:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids.contiguous()
        if "logits_to_keep" in kwargs:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs
