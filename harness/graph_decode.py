"""Fast greedy decoding of recurrent LMs: every state in buffers allocated once, one CUDA graph per step.

A recurrent model's decoding step reads and writes a fixed set of tensors (per layer: the recurrent state and the
short-conv inputs), so after prefill the step can be recorded once and replayed: one launch of the whole graph per
token instead of Python and a few dozen kernel launches per layer.

    step = StaticStep(lm, cache, batch=B)            # copies the prefilled states into static buffers
    step.capture()                                    # CUDA only; without it, run() executes the same step eagerly
    step.ids.copy_(next_ids[:, None]); logits = step.run()    # [B, vocab], a static tensor (read it before next run)

Applies to RecurrentCache models whose per-layer states are tensors only and keep their shapes across a step
(every recurrent family here; not the sliding-window hybrids, whose attention state grows and carries a position).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from gdn2.cache import RecurrentCache, map_tensors, tensors_of

# Greedy generations shorter than this run the plain step: capturing costs a few eager steps.
MIN_TOKENS_FOR_GRAPH = 16


def static_step_possible(cache: Any) -> bool:
    """Whether cache is a RecurrentCache whose every state is a tree of tensors (no positions or other values that
    a recorded step would freeze)."""
    return isinstance(cache, RecurrentCache) and all(s is not None and _tensors_only(s) for s in cache.states)


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


class StaticStep:
    """One greedy decoding step of `lm` over static buffers: ids [B, 1] in, logits [B, vocab] out, the cache's
    states updated in place (the step's new states are copied into the buffers they came from)."""

    def __init__(self, lm: torch.nn.Module, cache: RecurrentCache):
        if not static_step_possible(cache):
            raise ValueError("a static decoding step needs a RecurrentCache of tensor states "
                             "(see static_step_possible)")
        self.lm = lm
        self.cache = RecurrentCache(len(cache.states))
        self.cache.states = [map_tensors(s, lambda t: t.clone(memory_format=torch.contiguous_format))
                             for s in cache.states]
        self.cache.seen_tokens = cache.seen_tokens
        self.buffers = tensors_of(self.cache.states)
        self.static_states = list(self.cache.states)
        batch = self.buffers[0].shape[0]
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=self.buffers[0].device)
        self.logits: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None

    def _step(self, cache: RecurrentCache, buffers: list[torch.Tensor], static_states: list) -> torch.Tensor:
        out = self.lm(input_ids=self.ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        new = tensors_of(cache.states)
        if [t.shape for t in new] != [t.shape for t in buffers]:
            raise ValueError("a decoding step changed the shape of the cached states; "
                             "it cannot run from static buffers")
        for buffer, tensor in zip(buffers, new):
            if tensor.data_ptr() != buffer.data_ptr():
                buffer.copy_(tensor)
        cache.states = list(static_states)
        return out.logits[:, -1]

    def capture(self, warmup: int = 2) -> None:
        """Record the step in a CUDA graph: a few eager steps first (on copies of the states, so kernels compile and
        autotune outside the capture and the real states do not move), then the capture on the real buffers."""
        scratch = RecurrentCache(len(self.static_states))
        scratch_states = [map_tensors(s, lambda t: t.clone()) for s in self.static_states]
        scratch.states = list(scratch_states)
        scratch_buffers = tensors_of(scratch_states)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._step(scratch, scratch_buffers, scratch_states)
        torch.cuda.current_stream().wait_stream(side)
        seen = self.cache.seen_tokens
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step(self.cache, self.buffers, self.static_states)
        self.cache.seen_tokens = seen                   # the capture ran the Python once but moved no state

    def run(self) -> torch.Tensor:
        """Advance every row by the token in self.ids; returns the logits [B, vocab] of the next token."""
        if self.graph is None:
            return self._step(self.cache, self.buffers, self.static_states)
        self.graph.replay()
        self.cache.seen_tokens += 1
        return self.logits
