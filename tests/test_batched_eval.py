"""Batched evaluation equals the batch-1 path for every family's CPU reference path (float64): log-likelihoods of
right-padded batches read at each row's real positions, teacher-forced argmax, and greedy generation from stacked
per-sample caches (samples that stop leave the batch); the cache stacking itself, fla's cache included; the runner
stores the same rows at --batch-size 4 as at 1."""
from __future__ import annotations

import sqlite3

import pytest
import torch

from harness.batching import cache_signature, stack_caches
from harness.registry import load_model
from tiny_families import FAMILIES, RTOL, load_tiny, random_ids

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: intra-op threads only contend


@pytest.fixture(scope="module", params=FAMILIES)
def model(request, tmp_path_factory):
    loaded = load_tiny(request.param, tmp_path_factory.mktemp(request.param))
    loaded.segment = 16          # several segments per sequence: the batch carries its cache across them
    loaded.batched_prefill = True    # where the model allows it (our GDN-2), also on the CPU
    return loaded


LENGTHS = [37, 5, 64, 20, 21, 50, 2]


def test_logprobs_of_padded_batches_equal_batch_one(model):
    requests = [(random_ids(n, seed), max(1, n - 1 - seed % 9)) for seed, n in enumerate(LENGTHS)]
    requests[2] = (requests[2][0], 1)                              # scored from the first position on
    alone = model.token_logprobs_many(requests, batch_size=1)
    batched = model.token_logprobs_many(requests, batch_size=3)
    for (lp1, greedy1), (lp3, greedy3), (ids, score_from) in zip(alone, batched, requests, strict=False):
        assert lp3.shape == (len(ids) - score_from,)
        torch.testing.assert_close(lp3, lp1, rtol=RTOL, atol=0)
        assert torch.equal(greedy3, greedy1)


def count_fed_tokens(model, monkeypatch) -> list[int]:
    """The token count (batch x length) of every forward pass the model runs from now on."""
    fed: list[int] = []
    forward = model._forward
    monkeypatch.setattr(model, "_forward", lambda ids, *a, **k: fed.append(ids.numel()) or forward(ids, *a, **k))
    return fed


def test_requests_sharing_a_context_run_it_once_with_the_batch_one_results(model, monkeypatch):
    """Multiple-choice requests (one context, several short continuations) at batch size 4: our GDN-2 (which masks
    left padding) runs each shared context once, left-padded, and scores the continuations from copies of its
    state, feeding fewer tokens than the requests hold; the other families score each request whole. Either way the
    results are the batch-1 path's. Also a one-token continuation, a request scored from its first token and
    requests sharing no context."""
    contexts = [random_ids(n, 400 + i) for i, n in enumerate((30, 30, 12, 12, 25))]
    requests = [(context + random_ids(n, 500 + 10 * c + n), len(context))
                for c, context in enumerate(contexts) for n in (1, 3, 8)]
    requests += [(random_ids(20, 600), 14), (random_ids(9, 601), 1),
                 (contexts[0] + random_ids(4, 602), len(contexts[0]))]
    alone = model.token_logprobs_many(requests, batch_size=1)
    fed = count_fed_tokens(model, monkeypatch)
    shared = model.token_logprobs_many(requests, batch_size=4)
    for (lp1, greedy1), (lp4, greedy4) in zip(alone, shared, strict=True):
        torch.testing.assert_close(lp4, lp1, rtol=RTOL, atol=0)
        assert torch.equal(greedy4, greedy1)
    whole = sum(len(ids) - 1 for ids, _ in requests)      # what scoring each request whole feeds, at the least
    assert (sum(fed) < whole) == model.masks_left_padding
    fed.clear()
    model.share_prefixes = False                            # the switch: every request whole, the same results
    try:
        for (lp4, greedy4), (lp_whole, greedy_whole) in zip(shared, model.token_logprobs_many(requests, batch_size=4),
                                                            strict=True):
            torch.testing.assert_close(lp_whole, lp4, rtol=RTOL, atol=0)
            assert torch.equal(greedy_whole, greedy4)
    finally:
        model.share_prefixes = True
    assert sum(fed) >= whole


def test_a_shared_context_short_against_its_continuations_is_not_run_apart(model, monkeypatch):
    """Two long continuations of a short context (piqa's shape) would save under SHARED_PREFIX_SAVING of the tokens:
    each request is scored whole, by every family."""
    from harness.model import SHARED_PREFIX_SAVING

    requests = [(random_ids(6, 700 + i) + random_ids(30, 800 + 10 * i + j), 6) for i in range(4) for j in range(2)]
    saved = 4 * 5
    assert saved < SHARED_PREFIX_SAVING * sum(len(ids) - 1 for ids, _ in requests)
    fed = count_fed_tokens(model, monkeypatch)
    model.token_logprobs_many(requests, batch_size=4)
    assert sum(fed) >= sum(len(ids) - 1 for ids, _ in requests)


def test_scoring_positions_in_small_groups_equals_one_group(model, monkeypatch):
    """_score_spans bounds its fp32 copy of the logits by scoring SCORE_POSITIONS positions at a time: groups of a
    few positions (spans split across groups, spans longer than a group alone) give the same numbers bit for bit."""
    import harness.model

    requests = [(random_ids(n, 300 + seed), max(1, n // 3)) for seed, n in enumerate(LENGTHS)]
    whole = model.token_logprobs_many(requests, batch_size=4)
    monkeypatch.setattr(harness.model, "SCORE_POSITIONS", 5)
    for (lp, greedy), (lp5, greedy5) in zip(whole, model.token_logprobs_many(requests, batch_size=4), strict=True):
        assert torch.equal(lp5, lp) and torch.equal(greedy5, greedy)


def test_stop_strings_on_the_tail_find_what_the_whole_text_holds():
    """StopStrings decodes only the last ids each step; on the bundled byte-level BPE it first says stop at the
    same length as the whole-text check, over random generations and stop strings of 1 to 12 characters taken from
    the decoded text (so each is hit), most of them first hit past the tail's length."""
    import random

    from harness.bundled import BPE_4K
    from harness.checkpoint import load_tokenizer
    from harness.model import StopStrings

    tokenizer = load_tokenizer(None, str(BPE_4K))
    decode = lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)  # noqa: E731
    rng = random.Random(0)
    hits = 0
    for trial in range(12):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(120)]
        text = decode(ids)
        start = rng.randrange(len(text) // 2, len(text) - 12)
        stops = [text[start:start + 1 + trial], "\n\n"]
        check = StopStrings(decode, stops)
        first_whole = next(n for n in range(1, len(ids) + 1) if any(s in decode(ids[:n]) for s in stops))
        first_tail = next(n for n in range(1, len(ids) + 1) if check(ids[:n]))
        assert first_tail == first_whole, trial
        hits += first_whole > check.tail
    assert hits > 6


def test_teacher_forced_argmax_of_batches_equals_batch_one(model):
    sequences = [random_ids(n, 100 + seed) for seed, n in enumerate(LENGTHS)]
    assert model.next_token_argmax_many(sequences, batch_size=4) == model.next_token_argmax_many(sequences,
                                                                                                batch_size=1)


def test_greedy_generation_of_stacked_caches_equals_batch_one(model):
    prompts = [random_ids(n, 200 + seed) for seed, n in enumerate([30, 9, 30, 41, 17])]
    alone = [model.generate_ids(p, max_new_tokens=12) for p in prompts]
    assert model.generate_ids_many(prompts, 12, batch_size=5) == alone
    # A stop token from the middle of one sample's output: that sample leaves the batch early, the others go on.
    stop = alone[3][4]
    alone = [model.generate_ids(p, max_new_tokens=12, stop_ids=[stop]) for p in prompts]
    assert len(alone[3]) == 4
    assert model.generate_ids_many(prompts, 12, stop_ids=[stop], batch_size=3) == alone
    stop_when = lambda generated: len(generated) >= 2 and generated[-1] == generated[-2]  # noqa: E731
    alone = [model.generate_ids(p, max_new_tokens=12, stop_when=stop_when) for p in prompts]
    assert model.generate_ids_many(prompts, 12, stop_when=stop_when, batch_size=5) == alone


def test_prompts_of_one_length_prefill_as_one_batch(model, monkeypatch):
    """Prompts of one length prefill as one batch without padding, for every family (the transformer's cache too),
    and decode to the batch-1 tokens; the spy sees one prefill of all three."""
    prompts = [random_ids(24, 700 + seed) for seed in range(3)]
    alone = [model.generate_ids(p, max_new_tokens=6) for p in prompts]
    calls = []
    together = model._prefill_equal_lengths
    monkeypatch.setattr(model, "_prefill_equal_lengths",
                        lambda ps, segment: calls.append(len(ps)) or together(ps, segment))
    assert model.generate_ids_many(prompts, 6, batch_size=3) == alone
    assert calls == [3]


def test_text_level_calls_batch_through_model_batch_size(model):
    model.batch_size = 1
    requests = [("The quick brown", " fox"), ("A", " longer continuation here"), ("", " empty context")]
    texts = ["one short text", "a second, somewhat longer text to score"]
    one = (model.loglikelihood(requests), model.loglikelihood_rolling(texts), model.generate(["Once", "Then we"], 6))
    model.batch_size = 3
    try:
        many = (model.loglikelihood(requests), model.loglikelihood_rolling(texts),
                model.generate(["Once", "Then we"], 6))
    finally:
        model.batch_size = 1
    for (lp1, g1), (lp3, g3) in zip(one[0], many[0], strict=False):
        assert abs(lp1 - lp3) <= RTOL * abs(lp1) and g1 == g3
    assert all(abs(a - b) <= RTOL * abs(a) for a, b in zip(one[1], many[1], strict=False))
    assert one[2] == many[2]


# ------------------------------------------------------------------------------ cache stacking
def test_stacking_groups_only_compatible_caches(model):
    """Recurrent caches stack whatever the prompt lengths; an attention layer's cache (hybrid) only at equal
    positions; transformers' KV cache always (left-padded with a mask)."""
    caches = [model._prefill(random_ids(n, 300 + n), None)[1] for n in (20, 33, 33)]
    signatures = [cache_signature(c) for c in caches]
    assert None not in signatures and signatures[1] == signatures[2]
    hybrid = "attn" in (model.lm.config if isinstance(model.lm.config, dict) else {})
    assert (signatures[0] == signatures[1]) == (not hybrid)


def test_stacked_cache_holds_each_sample_in_its_row(model):
    """Recurrent states: row i is sample i's state exactly. KV caches: row i is sample i's keys and values,
    left-padded, with the padding masked out and the next position that sample's own."""
    from gdn2.cache import tensors_of

    lengths = [31, 31] if model.family != "transformer" else [20, 31]    # equal lengths: hybrids stack too
    first, second = (model._prefill(random_ids(n, 400 + i), None)[1] for i, n in enumerate(lengths))
    batch = stack_caches([first, second], lengths)
    if model.family == "transformer":
        for stacked, alone in ((batch.cache.layers[0].keys, first.layers[0].keys),
                               (batch.cache.layers[1].values, first.layers[1].values)):
            assert torch.equal(stacked[0:1, :, 11:], alone) and not stacked[0, :, :11].any()
        assert torch.equal(batch.cache.layers[0].keys[1:2], second.layers[0].keys)
        assert batch.mask.tolist() == [[0] * 11 + [1] * 20, [1] * 31] and batch.positions.tolist() == [20, 31]
        batch.keep([1])
        assert torch.equal(batch.cache.layers[0].keys, second.layers[0].keys) and batch.positions.tolist() == [31]
        return
    for i, part in enumerate((first, second)):
        for stacked, alone in zip(tensors_of(batch.cache.states), tensors_of(part.states), strict=False):
            assert torch.equal(stacked[i:i + 1], alone)
    batch.keep([1])
    for stacked, alone in zip(tensors_of(batch.cache.states), tensors_of(second.states), strict=False):
        assert torch.equal(stacked, alone)


def test_fla_cache_stacks_and_keeps_rows():
    cache_utils = pytest.importorskip("fla.models.cache_utils")

    def fla_cache(seed, seen):
        g = torch.Generator().manual_seed(seed)
        cache = cache_utils.FLACache()
        for layer in range(2):
            cache.update(recurrent_state=torch.randn(1, 2, 4, 4, generator=g),
                         conv_state=tuple(torch.randn(1, 8, 3, generator=g) for _ in range(3)),
                         layer_idx=layer, offset=seen)
        return cache

    caches = [fla_cache(seed, seen) for seed, seen in ((0, 10), (1, 25), (2, 7))]
    expected = [[dict(c[i]) for i in range(2)] for c in caches]
    assert len({cache_signature(c) for c in caches}) == 1
    batch = stack_caches(caches, [10, 25, 7])
    for layer in range(2):
        state = batch.cache[layer]
        for row in range(3):
            assert torch.equal(state["recurrent_state"][row:row + 1], expected[row][layer]["recurrent_state"])
            for got, want in zip(state["conv_state"], expected[row][layer]["conv_state"], strict=False):
                assert torch.equal(got[row:row + 1], want)
    batch.keep([2, 0])
    assert torch.equal(batch.cache[1]["recurrent_state"], torch.cat([expected[2][1]["recurrent_state"],
                                                                     expected[0][1]["recurrent_state"]]))


# ------------------------------------------------------------------------------ the runner
def test_runner_batch_size_stores_the_batch_one_rows(tmp_path):
    from harness.runner import CellPlan, Plan, SweepRunner
    from harness.store import ResultsStore

    tiny = load_model("gdn2-tiny-random", device="cpu")
    stored = {}
    for batch_size in (1, 4):
        plan = Plan(models=["gdn2-tiny-random"], cells=[CellPlan("niah_single_1", [512]), CellPlan("mqar", [128])],
                    samples=5, device="cpu", batch_size=batch_size)
        with ResultsStore(tmp_path / str(batch_size)) as store:
            summary = SweepRunner(plan, store, progress=False, log=lambda m: None, loader=lambda spec: tiny).run()
        assert [(c.ok, c.failed) for c in summary.cells] == [(5, 0), (5, 0)]
        conn = sqlite3.connect(tmp_path / str(batch_size) / "results.sqlite")
        stored[batch_size] = conn.execute("SELECT task, length, sample_index, status, score, prediction FROM samples "
                                          "ORDER BY task, length, sample_index").fetchall()
        conn.close()
    assert len(stored[1]) == 10 and stored[4] == stored[1]


def test_lm_eval_plugin_batch_size_gives_the_batch_one_results():
    from lm_eval.api.instance import Instance

    from harness.lm_eval_plugin import HarnessLM

    def instances(kind, args):
        return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args]

    pairs = [("Who's there?", " Nay, answer me"), ("Stand, and unfold", " yourself."), ("", " Long live the king"),
             ("You come most carefully upon", " your hour.")]
    texts = ["'Tis now struck twelve; get thee to bed, Francisco.", "For this relief much thanks."]
    prompts = [("Who's there?", {"until": ["\n"], "max_gen_toks": 8}), ("Stand", {"until": ["."], "max_gen_toks": 5}),
               ("Nay, answer me", {"until": ["\n"], "max_gen_toks": 8})]
    outputs = {}
    for batch_size in (1, 3):
        lm = HarnessLM(model=load_model("gdn2-tiny-random", device="cpu"), batch_size=batch_size, max_length=8)
        assert lm.describe()["batch_size"] == batch_size
        outputs[batch_size] = (lm.loglikelihood(instances("loglikelihood", pairs)),
                               lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(t,) for t in texts])),
                               lm.generate_until(instances("generate_until", prompts)))
    # fp32 model: summation order at 1e-7 level
    for (lp1, g1), (lp3, g3) in zip(outputs[1][0], outputs[3][0], strict=True):
        assert abs(lp1 - lp3) <= 1e-5 * abs(lp1) and g1 == g3
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(outputs[1][1], outputs[3][1], strict=False))
    assert outputs[3][2] == outputs[1][2] and len(outputs[1][2]) == 3
    runner_model = load_model("gdn2-tiny-random", device="cpu")
    runner_model.batch_size = 4                       # what the runner sets from --batch-size
    assert HarnessLM(model=runner_model).describe()["batch_size"] == 4       # kept when lm-eval names none
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        HarnessLM(model=runner_model, batch_size=0)


class FailingBatchTask:
    """Its batches fail (out of memory or an error); alone, sample 2 fails and the others pass."""

    uses_length = True
    name = "failing_batch"

    def __init__(self, oom: bool = False):
        self.oom, self.batch_calls = oom, 0

    def samples(self, model, length, num_samples, seed):
        from harness.eval_task import Sample

        return [Sample(index=i, payload={"i": i}) for i in range(num_samples)]

    def evaluate(self, model, sample):
        from harness.eval_task import SampleResult

        if sample.index == 2:
            raise ValueError("sample 2 cannot be scored")
        return SampleResult(index=sample.index, score=100.0, prediction=str(sample.index))

    def evaluate_batch(self, model, samples):
        self.batch_calls += 1
        raise RuntimeError("CUDA out of memory (batch)" if self.oom else "the batch failed")


@pytest.mark.parametrize("oom", [False, True])
def test_runner_reruns_a_failed_batch_one_sample_at_a_time(tmp_path, oom, monkeypatch):
    from harness import task_adapters
    from harness.runner import CellPlan, Plan, SweepRunner
    from harness.store import ResultsStore

    task = FailingBatchTask(oom)
    monkeypatch.setattr(task_adapters, "resolve_task", lambda name, options=None, offline=True: task)
    tiny = load_model("gdn2-tiny-random", device="cpu")
    plan = Plan(models=["gdn2-tiny-random"], cells=[CellPlan("failing_batch", [16])], samples=5, device="cpu",
                batch_size=3)
    with ResultsStore(tmp_path) as store:
        summary = SweepRunner(plan, store, progress=False, log=lambda m: None, loader=lambda spec: tiny).run()
    assert task.batch_calls == 2 and [(c.ok, c.failed) for c in summary.cells] == [(4, 1)]
    conn = sqlite3.connect(tmp_path / "results.sqlite")
    rows = conn.execute("SELECT sample_index, status, error_kind, error FROM samples ORDER BY sample_index").fetchall()
    conn.close()
    assert [(i, status) for i, status, _, _ in rows] == [(0, "ok"), (1, "ok"), (2, "error"), (3, "ok"), (4, "ok")]
    assert rows[2][2] == "exception" and "sample 2 cannot be scored" in rows[2][3]


def test_our_gdn2_prefills_a_batch_together_left_padded(model):
    """Our GDN2ForCausalLM (no attention layers) prefills the prompts of a batch as one left-padded batch, with the
    attention mask, in segments (batched_prefill True; None: on CUDA only); every other family prefills each prompt
    alone. The tokens equal the batch-1 path either way (test_greedy_generation_of_stacked_caches_equals_batch_one)."""
    calls = []
    forward, alone, together = model._forward, model._prefill, model._prefill_left_padded

    def spy_forward(ids, cache, keep, **kwargs):
        calls.append(("forward", tuple(ids.shape), "attention_mask" in kwargs))
        return forward(ids, cache, keep, **kwargs)

    def spy_alone(prompt, segment):
        calls.append(("alone", len(prompt)))
        return alone(prompt, segment)

    def spy_together(prompts, segment):
        calls.append(("together", [len(p) for p in prompts]))
        return together(prompts, segment)

    def prefills(batched_prefill):
        calls.clear()
        model.batched_prefill = batched_prefill
        model.generate_ids_many(prompts, 3, batch_size=3)
        return [call for call in calls if call[0] != "forward"]

    prompts = [random_ids(n, 300 + seed) for seed, n in enumerate([40, 9, 33])]
    each_alone = [("alone", 9), ("alone", 33), ("alone", 40)]
    model._forward, model._prefill, model._prefill_left_padded = spy_forward, spy_alone, spy_together
    try:
        assert model.masks_left_padding == (model.family != "transformer"
                                            and not model.info.get("hybrid_attention_layers"))
        if model.masks_left_padding:
            assert prefills(True) == [("together", [40, 33, 9])]          # length_groups orders by length
            assert calls[1:4] == [("forward", (3, 16), True), ("forward", (3, 16), True), ("forward", (3, 8), True)]
        else:
            assert sorted(prefills(True)) == each_alone
        assert sorted(prefills(None)) == each_alone                          # None: on CUDA only
        assert sorted(prefills(False)) == each_alone
    finally:
        del model._forward, model._prefill, model._prefill_left_padded
        model.batched_prefill = True
