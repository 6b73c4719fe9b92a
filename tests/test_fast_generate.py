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


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: intra-op threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
        with pytest.raises(ValueError, match="RecurrentCache of tensor states"):
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
    for static, moved in zip(tensors_of(step.cache.states), tensors_of(cache.states)):
        torch.testing.assert_close(static, moved, rtol=0, atol=0)
    assert [t.data_ptr() for t in tensors_of(step.cache.states)] == buffers      # written in place, never moved
