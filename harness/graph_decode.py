"""Fast greedy decoding of recurrent LMs: every state in buffers allocated once, one CUDA graph per step.

A recurrent model's decoding step reads and writes a fixed set of tensors (per layer: the recurrent state and the
short-conv inputs), so after prefill the step can be recorded once and replayed: one launch of the whole graph per
token instead of Python and a few dozen kernel launches per layer.

    step = StaticStep(lm, cache, batch=B)            # copies the prefilled states into static buffers
    step.capture()                                    # CUDA only; without it, run() executes the same step eagerly
    step.ids.copy_(next_ids[:, None]); logits = step.run()    # [B, vocab], a static tensor (read it before next run)

Applies to RecurrentCache models (ours and the reference paths) and fla's models (FLACache) whose per-layer states
are tensors only and keep their shapes across a step: every recurrent family here, not the sliding-window hybrids,
whose attention state grows and carries a position.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from gdn2.cache import RecurrentCache, map_tensors, tensors_of

# Greedy generations shorter than this run the plain step: capturing costs a few eager steps.
MIN_TOKENS_FOR_GRAPH = 16


def static_step_possible(cache: Any) -> bool:
    """Whether a cache can decode from static buffers: a RecurrentCache (our models and the reference paths) or fla's
    FLACache (fla's models) whose every state is a tree of tensors, without attention keys (they grow) or values a
    recorded step would freeze (an attention layer's position)."""
    if isinstance(cache, RecurrentCache):
        return all(s is not None and _tensors_only(s) for s in cache.states)
    if _is_fla_cache(cache):
        return all(layer.state is not None and layer.state.get("attn_state") is None and _tensors_only(layer.state)
                   for layer in cache.layers)
    return False


def _tensors_only(obj: Any) -> bool:
    if obj is None or isinstance(obj, torch.Tensor):
        return True
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return all(_tensors_only(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    if isinstance(obj, (list, tuple)):
        return all(_tensors_only(item) for item in obj)
    if isinstance(obj, dict):
        return all(_tensors_only(item) for item in obj.values())
    return False


def _is_fla_cache(cache: Any) -> bool:
    return type(cache).__module__.startswith("fla.") and hasattr(cache, "layers")


# ------------------------------------------------------------------------------------------ the two cache types
def _states(cache: Any) -> list:
    """The per-layer state trees of a cache."""
    return list(cache.states) if isinstance(cache, RecurrentCache) else [layer.state for layer in cache.layers]


def _set_states(cache: Any, states: list) -> None:
    """Point the cache at these state trees (fresh containers each time: a model may mutate its state dicts)."""
    fresh = [map_tensors(s, lambda t: t) for s in states]
    if isinstance(cache, RecurrentCache):
        cache.states = fresh
    else:
        for layer, state in zip(cache.layers, fresh, strict=False):
            layer.state = state


def _cache_like(cache: Any, states: list) -> Any:
    """A new cache of cache's type and token count holding these state trees."""
    if isinstance(cache, RecurrentCache):
        out = RecurrentCache(len(states))
        out.seen_tokens = cache.seen_tokens
    else:
        out = type(cache).from_legacy_cache(tuple(dict(s) for s in states), seen_tokens=cache.get_seq_length())
    _set_states(out, states)
    return out


def _count_token(cache: Any, tokens: int = 1) -> None:
    """What a step's Python would have added to the cache's token counters (a graph replay runs no Python)."""
    if isinstance(cache, RecurrentCache):
        cache.seen_tokens += tokens
    else:
        for layer in cache.layers:
            layer._seen_tokens += tokens


class StaticStep:
    """One greedy decoding step of `lm` over static buffers: ids [B, 1] in, logits [B, vocab] out, the cache's
    states updated in place (the step's new states are copied into the buffers they came from)."""

    def __init__(self, lm: torch.nn.Module, cache: Any):
        if not static_step_possible(cache):
            raise ValueError("a static decoding step needs a RecurrentCache or FLACache of tensor states "
                             "(see static_step_possible)")
        self.lm = lm
        self.static_states = [map_tensors(s, lambda t: t.clone(memory_format=torch.contiguous_format))
                              for s in _states(cache)]
        self.cache = _cache_like(cache, self.static_states)
        self.buffers = tensors_of(self.static_states)
        self.ids = torch.zeros(self.buffers[0].shape[0], 1, dtype=torch.long, device=self.buffers[0].device)
        self.logits: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None

    def _step(self, cache: Any, static_states: list, buffers: list[torch.Tensor]) -> torch.Tensor:
        out = self.lm(input_ids=self.ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        new = tensors_of(_states(out.past_key_values))
        if [t.shape for t in new] != [t.shape for t in buffers]:
            raise ValueError("a decoding step changed the shape of the cached states; "
                             "it cannot run from static buffers")
        for buffer, tensor in zip(buffers, new, strict=False):
            if tensor.data_ptr() != buffer.data_ptr():
                buffer.copy_(tensor)
        _set_states(cache, static_states)
        return out.logits[:, -1]

    def capture(self, warmup: int = 2) -> None:
        """Record the step in a CUDA graph: a few eager steps first (on copies of the states, so kernels compile and
        autotune outside the capture and the real states do not move), then the capture on the real buffers."""
        scratch_states = [map_tensors(s, lambda t: t.clone()) for s in self.static_states]
        scratch = _cache_like(self.cache, scratch_states)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._step(scratch, scratch_states, tensors_of(scratch_states))
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step(self.cache, self.static_states, self.buffers)
        _count_token(self.cache, -1)                    # the capture ran the Python once but moved no state

    def run(self) -> torch.Tensor:
        """Advance every row by the token in self.ids; returns the logits [B, vocab] of the next token."""
        if self.graph is None:
            return self._step(self.cache, self.static_states, self.buffers)
        self.graph.replay()
        _count_token(self.cache)
        return self.logits
