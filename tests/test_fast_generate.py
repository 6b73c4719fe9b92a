"""The static decoding step (harness/graph_decode.py) on the CPU: greedy tokens from static buffers equal the plain
path for every recurrent family, batched and alone; the states it leaves equal the plain path's; caches it cannot
run (sliding-window hybrids, KV caches) fall back to the plain path. The CUDA graph capture itself runs on the GPU
(benchmarks/bench_models.py --only decode checks it against the plain path)."""
from __future__ import annotations

import pytest
import torch

from gdn2.cache import tensors_of
from harness.graph_decode import StaticStep, static_step_possible
from tiny_families import load_tiny, random_ids

RECURRENT = ["gdn2", "gated_deltanet", "kda", "mamba2", "mamba3"]


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: intra-op threads only contend


@pytest.fixture(scope="module", params=RECURRENT + ["kda-hybrid", "transformer"])
def model(request, tmp_path_factory):
    return load_tiny(request.param, tmp_path_factory.mktemp(request.param))


def test_static_step_gives_the_plain_greedy_tokens(model):
    prompts = [random_ids(n, 500 + n) for n in (19, 7, 40)]
    model.static_decode = False
    plain = [model.generate_ids(p, 10) for p in prompts]
    plain_stop = [model.generate_ids(p, 10, stop_ids=[plain[0][3]]) for p in prompts]
    model.static_decode = True
    try:
        assert [model.generate_ids(p, 10) for p in prompts] == plain
        assert model.generate_ids_many(prompts, 10, batch_size=3) == plain
        assert model.generate_ids_many(prompts, 10, stop_ids=[plain[0][3]], batch_size=3) == plain_stop
    finally:
        model.static_decode = None
    cache = model._prefill(prompts[0], None)[1]
    assert static_step_possible(cache) == (model.family in ("gdn2", "gated_deltanet", "kda", "mamba2", "mamba3")
                                           and "attn" not in (model.lm.config if isinstance(model.lm.config, dict)
                                                              else {}))


def test_static_step_states_and_logits_equal_the_plain_step(model):
    logits, cache = model._prefill(random_ids(23, 9), None)
    if not static_step_possible(cache):
        with pytest.raises(ValueError, match="of tensor states"):
            StaticStep(model.lm, cache)
        return
    step = StaticStep(model.lm, cache)
    buffers = [t.data_ptr() for t in step.buffers]
    with torch.no_grad():
        for token in (5, 99, 1234):
            plain = model.lm(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True,
                             logits_to_keep=1)
            cache = plain.past_key_values
            step.ids.fill_(token)
            static_logits = step.run()
            torch.testing.assert_close(static_logits, plain.logits[:, -1], rtol=0, atol=0)
    for static, moved in zip(tensors_of(step.cache.states), tensors_of(cache.states), strict=False):
        torch.testing.assert_close(static, moved, rtol=0, atol=0)
    assert [t.data_ptr() for t in tensors_of(step.cache.states)] == buffers      # written in place, never moved


class FlaStyleLM(torch.nn.Module):
    """A two-layer recurrent LM keeping its states in fla's FLACache the way fla's layers do (update() with a
    recurrent_state and a conv_state, offset = tokens): conv over the last 4 inputs, then h <- 0.9 h + tanh(conv)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = torch.nn.Embedding(50, 8), torch.nn.Linear(8, 50)

    def forward(self, input_ids, past_key_values=None, use_cache=True, logits_to_keep=0):
        from types import SimpleNamespace

        from fla.models.cache_utils import FLACache

        cache = past_key_values if past_key_values is not None else FLACache()
        x = self.embed(input_ids)
        B, T, _ = x.shape
        for layer in range(2):
            state = cache[layer] if len(cache) > layer else None
            h = state["recurrent_state"] if state else x.new_zeros(B, 8)
            conv = state["conv_state"] if state else x.new_zeros(B, 8, 3)
            outputs = []
            for t in range(T):
                window = torch.cat([conv, x[:, t, :, None]], -1)
                h = 0.9 * h + torch.tanh(window.mean(-1))
                conv = window[..., 1:]
                outputs.append(h)
            x = torch.stack(outputs, 1)
            cache.update(recurrent_state=h, conv_state=conv, layer_idx=layer, offset=T)
        return SimpleNamespace(logits=self.head(x[:, -logits_to_keep:]), past_key_values=cache)


def test_static_step_runs_fla_caches():
    pytest.importorskip("fla.models.cache_utils")
    from harness.model import EvalModel

    lm = FlaStyleLM().eval()
    model = EvalModel(name="fla-style", family="kda", lm=lm, tokenizer=None, device=torch.device("cpu"),
                      dtype=torch.float32, source="test", backend="test", state_floats=8)
    prompts = [[3, 7, 9, 11, 2], [4, 4, 8], [1, 2, 3, 4, 5, 6, 7]]
    model.static_decode = False
    plain = [model.generate_ids(p, 8) for p in prompts]
    model.static_decode = True
    assert [model.generate_ids(p, 8) for p in prompts] == plain
    assert model.generate_ids_many(prompts, 8, batch_size=3) == plain
    with torch.no_grad():
        _, cache = model._prefill(prompts[0], None)
        step = StaticStep(lm, cache)
        buffers = [t.data_ptr() for t in step.buffers]
        for token in (5, 6, 7):
            plain_step = lm(torch.tensor([[token]]), past_key_values=cache, logits_to_keep=1)
            step.ids.fill_(token)
            torch.testing.assert_close(step.run(), plain_step.logits[:, -1], rtol=0, atol=0)
    assert [t.data_ptr() for t in tensors_of(step.static_states)] == buffers
    assert step.cache.get_seq_length() == cache.get_seq_length() == 8
