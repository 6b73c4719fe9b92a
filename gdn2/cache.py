"""The decoding cache of a stack of mixers, and the forward loop every recurrent LM here shares.

RecurrentCache.states[i] is what layer i returned last (None before it ran): for a GDN-2 mixer a GDN2LayerState
(fp32 recurrent state [B, Hv, K, V] + short-conv inputs), for other mixers their own state objects (dataclasses,
tuples or tensors). Memory is O(1) in the sequence length for recurrent layers (O(window) for sliding-window
attention). It subclasses transformers' Cache so generate() and the usual calls accept it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
import torch.nn as nn
from transformers.cache_utils import Cache

# Arguments transformers' generate() passes that a recurrent model has no use for.
GENERATE_KWARGS = frozenset({"position_ids", "cache_position", "return_dict", "output_attentions",
                             "output_hidden_states"})


class RecurrentCache(Cache):
    """One state per layer plus the number of tokens seen."""

    is_compileable = False

    def __init__(self, num_layers: int):
        super().__init__(layers=[])
        self.states: list[Any] = [None] * num_layers
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.seen_tokens

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    def __len__(self) -> int:
        return len(self.states)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layers={len(self.states)}, seen_tokens={self.seen_tokens})"

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select batch rows of every state tensor (beam search)."""
        self.states = [map_tensors(s, lambda t: t.index_select(0, beam_idx.to(t.device))) for s in self.states]

    def state_bytes(self) -> int:
        """Bytes held by every tensor in the cache (constant in the sequence length for recurrent layers)."""
        return sum(t.numel() * t.element_size() for t in tensors_of(self.states))


def tensors_of(obj: Any) -> list[torch.Tensor]:
    """Every tensor inside nested dataclasses / lists / tuples / dicts."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [t for f in dataclasses.fields(obj) for t in tensors_of(getattr(obj, f.name))]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in tensors_of(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in tensors_of(item)]
    return []


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """obj with fn applied to every tensor inside it (same structure)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: map_tensors(getattr(obj, f.name), fn)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(item, fn) for item in obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def check_forward_args(attention_mask: torch.Tensor | None, extra_kwargs: dict) -> None:
    """Refuse what a recurrent LM's forward must not take silently: padded batches (padding would flow into the
    recurrent state) and unknown keyword arguments."""
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise ValueError("padded batches are not supported (padding would enter the recurrent state): run sequences "
                         "of different lengths one by one")
    unknown = set(extra_kwargs) - GENERATE_KWARGS
    if unknown:
        raise TypeError(f"unexpected arguments {sorted(unknown)}")


def left_padding_mask(attention_mask: torch.Tensor | None, num_tokens: int) -> torch.Tensor | None:
    """The [B, num_tokens] token mask (1 = token, 0 = padding) of the current input from an attention mask
    [B, seen + num_tokens], None when nothing is padded. Only left padding is accepted: it is what a recurrent
    state can skip exactly; padding after a token would sit between the prompt and what is generated next."""
    if attention_mask is None or bool(attention_mask.bool().all()):
        return None
    mask = attention_mask.bool()
    if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        raise ValueError("attention_mask has padding after a token (right padding or a hole); a recurrent model "
                         "takes left padding only: pad on the left (tokenizer.padding_side = 'left')")
    if mask.shape[1] < num_tokens:
        raise ValueError(f"attention_mask covers {mask.shape[1]} positions but the input has {num_tokens} tokens")
    return mask[:, mask.shape[1] - num_tokens:]


def run_layers(layers: nn.ModuleList, x: torch.Tensor, cache: RecurrentCache | None, use_cache: bool,
               **layer_kwargs) -> tuple:
    """x [B, T, d] through every layer (layer(x, state, use_cache, **layer_kwargs) -> (x, new_state)), states read
    from and written to `cache` (created when use_cache and None). Returns (x, cache)."""
    if use_cache and cache is None:
        cache = RecurrentCache(len(layers))
    if cache is not None and not isinstance(cache, RecurrentCache):
        raise TypeError(f"past_key_values must be a RecurrentCache; got {type(cache).__name__}")
    for i, layer in enumerate(layers):
        x, new_state = layer(x, cache.states[i] if cache is not None else None, use_cache, **layer_kwargs)
        if use_cache:
            cache.states[i] = new_state
    if use_cache:
        cache.seen_tokens += x.shape[1]
    return x, cache
