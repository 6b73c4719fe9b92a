"""Decoding several prefilled samples as one batch: their per-sample caches stacked along the batch axis.

EvalModel prefills each prompt on its own (no padding ever enters a recurrent state), then decodes all of them
together one token per step; only models that mask left padding exactly (EvalModel.masks_left_padding: our GDN-2,
Gated DeltaNet, KDA, Mamba-2 and Mamba-3 models without attention layers) prefill a batch together on CUDA and skip
the stacking. This module turns a list of batch-1 caches into one batched cache and back:

    batch = stack_caches([cache_a, cache_b], lengths=[17, 40])   # None: this cache type cannot be stacked
    out = lm(input_ids=next_ids [B, 1], past_key_values=batch.cache, use_cache=True, **batch.step_kwargs())
    batch.advance(); batch.keep([0])                              # rows that stopped drop out

Cache types:
- RecurrentCache (our models and every reference path): per-layer state trees, tensors concatenated on dim 0;
  non-tensor leaves (e.g. an attention layer's position) must be equal across the samples.
- fla's FLACache (fla's own models on CUDA): per-layer state dicts, the same rule; a layer holding attention keys
  needs equal token counts (its RoPE offset is the layer's count).
- transformers' DynamicCache (the transformer family): keys and values left-padded to the longest prompt, with an
  attention mask that hides the padding and per-row position ids, so each row sees exactly its own tokens.

Samples whose caches cannot share a batch (signature() differs) are decoded in separate groups by EvalModel.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
import torch.nn.functional as F


class Unstackable(ValueError):
    """Caches whose structure or non-tensor values differ; they are decoded in separate groups."""


# ------------------------------------------------------------------------------------------ trees of tensors
def tree_signature(obj: Any) -> Any:
    """A hashable description of a nested state: structure, tensor dtype and shape without the batch axis, and
    every non-tensor value. Two trees stack iff their signatures are equal."""
    if isinstance(obj, torch.Tensor):
        return ("tensor", obj.dtype, tuple(obj.shape[1:]))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return (type(obj).__name__,) + tuple((f.name, tree_signature(getattr(obj, f.name)))
                                             for f in dataclasses.fields(obj))
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__,) + tuple(tree_signature(item) for item in obj)
    if isinstance(obj, dict):
        return ("dict",) + tuple((k, tree_signature(v)) for k, v in sorted(obj.items()))
    if obj is None or isinstance(obj, (int, float, bool, str)):
        return ("value", obj)
    raise Unstackable(f"cannot stack a cache holding a {type(obj).__name__}")


def stack_trees(trees: Sequence[Any]) -> Any:
    """Trees of identical signature -> one tree whose tensors are the inputs' concatenated on dim 0."""
    first = trees[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(trees), 0)
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        return dataclasses.replace(first, **{f.name: stack_trees([getattr(t, f.name) for t in trees])
                                             for f in dataclasses.fields(first) if f.init})
    if isinstance(first, (list, tuple)):
        return type(first)(stack_trees([t[i] for t in trees]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: stack_trees([t[k] for t in trees]) for k in first}
    return first


def select_rows(obj: Any, rows: torch.Tensor) -> Any:
    """The tree with every tensor reduced to the given batch rows (index_select on dim 0)."""
    from gdn2.cache import map_tensors

    return map_tensors(obj, lambda t: t.index_select(0, rows.to(t.device)))


# ------------------------------------------------------------------------------------------ batched caches
class DecodeBatch:
    """A batched cache plus what each decoding step must pass besides it (see the module docstring)."""

    def __init__(self, cache: Any):
        self.cache = cache

    def step_kwargs(self) -> dict:
        """Extra keyword arguments of the next one-token forward call."""
        return {}

    def advance(self) -> None:
        """Called after each one-token forward call."""

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only these batch rows (in this order)."""
        raise NotImplementedError


class RecurrentBatch(DecodeBatch):
    """Stacked RecurrentCache states. seen_tokens becomes the longest sample's count: recurrent mixers never read
    it, and an attention layer carries its own position in its state (equal across a batch by signature)."""

    def keep(self, rows: Sequence[int]) -> None:
        index = torch.tensor(list(rows), dtype=torch.long)
        self.cache.states = [select_rows(s, index) for s in self.cache.states]


class FLABatch(DecodeBatch):
    """Stacked fla FLACache layer states."""

    def keep(self, rows: Sequence[int]) -> None:
        index = torch.tensor(list(rows), dtype=torch.long)
        for layer in self.cache.layers:
            layer.state = select_rows(layer.state, index)


class PaddedKVBatch(DecodeBatch):
    """transformers DynamicCache rows left-padded to a common length; mask [B, S] marks real key slots and
    positions [B] the next token's position in each row."""

    def __init__(self, cache: Any, mask: torch.Tensor, positions: torch.Tensor):
        super().__init__(cache)
        self.mask, self.positions = mask, positions

    def step_kwargs(self) -> dict:
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], 1)
        return {"attention_mask": self.mask, "position_ids": self.positions[:, None]}

    def advance(self) -> None:
        self.positions = self.positions + 1

    def keep(self, rows: Sequence[int]) -> None:
        index = torch.tensor(list(rows), dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions = self.mask[index], self.positions[index]


def _is_fla_cache(cache: Any) -> bool:
    return type(cache).__module__.startswith("fla.") and hasattr(cache, "layers")


def _is_dynamic_kv_cache(cache: Any) -> bool:
    from transformers.cache_utils import DynamicCache, DynamicLayer

    return isinstance(cache, DynamicCache) and all(type(layer) is DynamicLayer for layer in cache.layers)


def cache_signature(cache: Any) -> Any:
    """Caches with equal signatures stack (None: the cache type is not stackable at all)."""
    from gdn2.cache import RecurrentCache

    try:
        if isinstance(cache, RecurrentCache):
            return ("recurrent", tuple(tree_signature(s) for s in cache.states))
        if _is_fla_cache(cache):
            layers = []
            for layer in cache.layers:
                attention = bool(layer.state and layer.state.get("attn_state") is not None)
                layers.append((tree_signature(layer.state), layer.window_size,
                               layer.get_seq_length() if attention else None))
            return ("fla", tuple(layers))
        if _is_dynamic_kv_cache(cache):
            return ("dynamic", len(cache.layers))
    except Unstackable:
        return None
    return None


def stack_caches(caches: Sequence[Any], lengths: Sequence[int]) -> DecodeBatch:
    """Batch-1 caches of one signature (cache_signature) -> one DecodeBatch; lengths: tokens each has seen."""
    from gdn2.cache import RecurrentCache

    first = caches[0]
    signature = cache_signature(first)
    if signature is None or any(cache_signature(c) != signature for c in caches[1:]):
        raise Unstackable("caches of different structure cannot share a batch")
    if isinstance(first, RecurrentCache):
        stacked = RecurrentCache(len(first.states))
        stacked.states = [stack_trees([c.states[i] for c in caches]) for i in range(len(first.states))]
        stacked.seen_tokens = max(c.seen_tokens for c in caches)
        return RecurrentBatch(stacked)
    if _is_fla_cache(first):
        for i, layer in enumerate(first.layers):      # the first cache becomes the batch (its caller drops it)
            layer.state = stack_trees([c.layers[i].state for c in caches])
            layer._seen_tokens = max(c.layers[i]._seen_tokens for c in caches)
        return FLABatch(first)
    return _pad_dynamic_caches(caches, lengths)


def _pad_dynamic_caches(caches: Sequence[Any], lengths: Sequence[int]) -> PaddedKVBatch:
    from transformers.cache_utils import DynamicCache

    longest = max(lengths)
    stacked = DynamicCache()
    for i in range(len(caches[0].layers)):
        keys = [F.pad(c.layers[i].keys, (0, 0, longest - n, 0)) for c, n in zip(caches, lengths, strict=False)]
        values = [F.pad(c.layers[i].values, (0, 0, longest - n, 0)) for c, n in zip(caches, lengths, strict=False)]
        stacked.update(torch.cat(keys, 0), torch.cat(values, 0), i)
    device = caches[0].layers[0].keys.device
    mask = torch.zeros(len(caches), longest, dtype=torch.long, device=device)
    for row, n in enumerate(lengths):
        mask[row, longest - n:] = 1
    return PaddedKVBatch(stacked, mask, torch.tensor(list(lengths), dtype=torch.long, device=device))


def batch_of_equal_lengths(cache: Any, rows: int, length: int) -> DecodeBatch | None:
    """The DecodeBatch over a cache that a forward pass built for `rows` prompts of `length` tokens each (no
    padding); None for a cache type this module does not know."""
    from gdn2.cache import RecurrentCache

    if isinstance(cache, RecurrentCache):
        return RecurrentBatch(cache)
    if _is_fla_cache(cache):
        return FLABatch(cache)
    if _is_dynamic_kv_cache(cache):
        device = cache.layers[0].keys.device
        return PaddedKVBatch(cache, torch.ones(rows, length, dtype=torch.long, device=device),
                             torch.full((rows,), length, dtype=torch.long, device=device))
    return None

