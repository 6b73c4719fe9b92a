"""tasks/perplexity.py: corpus and position-bucketed perplexity agree with each other and are segment-invariant."""
import math

import pytest

from harness.lm_eval_tasks import aggregate_perplexity, lm_eval_task
from harness.registry import load_model
from tasks.perplexity import bucketed_perplexity, corpus_perplexity, corpus_text


@pytest.fixture(scope="module")
def model():
    return load_model("gdn2-tiny-random", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def text():
    return corpus_text("macbeth")[:3000]


def test_one_bucket_equals_plain_perplexity(model, text):
    plain = corpus_perplexity(model, text)
    one = bucketed_perplexity(model, text, bucket=10 ** 6)
    assert one.tokens == plain.tokens and one.bucket_tokens == [plain.tokens]
    assert one.nll_sum == pytest.approx(plain.nll_sum, rel=1e-9)
    assert one.token_perplexity == pytest.approx(plain.token_perplexity, rel=1e-9)
    assert one.words == plain.words and one.word_perplexity == pytest.approx(plain.word_perplexity, rel=1e-9)


def test_buckets_sum_to_the_total(model, text):
    res = bucketed_perplexity(model, text, bucket=32, max_length=128)
    ids = model.encode(text)
    assert res.sequences == len(ids) // 128 and len(res.bucket_nll) == 4
    assert res.bucket_tokens == [32 * res.sequences] * 4
    assert sum(res.bucket_nll) == pytest.approx(res.nll_sum, rel=1e-12)
    # the same sequences with one bucket per sequence give the same total
    whole = bucketed_perplexity(model, text, bucket=128, max_length=128)
    assert whole.nll_sum == pytest.approx(res.nll_sum, rel=1e-9)
    # each sequence is an independent document conditioned on the prefix token
    first = corpus_perplexity(model, model.decode(ids[:128]))
    assert first.tokens == 128
    # words: those of the text scored, each counted once (not once more per sequence boundary)
    scored = model.decode(ids[:128 * res.sequences])
    assert res.words == len(scored.split()) and res.bytes == len(scored.encode("utf-8"))


def test_segments_carry_state_exactly(model, text):
    """Memory-safety: scoring in segments of 37 tokens (state carried) equals one 4096-token segment."""
    small = corpus_perplexity(model, text, segment=37)
    big = corpus_perplexity(model, text, segment=4096)
    assert small.nll_sum == pytest.approx(big.nll_sum, rel=1e-5)
    assert math.isfinite(small.bits_per_byte)


def test_perplexity_cell_rows_aggregate_to_the_corpus_number(model):
    task = lm_eval_task("ppl:macbeth", offline=True, bucket=128)
    assert task.name == "ppl:macbeth" and task.uses_length
    samples = task.samples(model, 256, num_samples=3, seed=0)
    rows = [task.evaluate(model, s) for s in samples]
    agg = aggregate_perplexity(rows)
    ids = model.encode(corpus_text("macbeth"))[:3 * 256]
    direct = bucketed_perplexity(model, ids, bucket=128, max_length=256)
    assert agg["token_perplexity"] == pytest.approx(direct.token_perplexity, rel=1e-9)
    assert [b["perplexity"] for b in agg["buckets"]] == pytest.approx(direct.bucket_perplexity(), rel=1e-9)
    # the rows' words add up to the words of the text they cover, as the direct computation counts them
    assert sum(r.metrics["words"] for r in rows) == direct.words == len(model.decode(ids).split())
    assert agg["word_perplexity"] == pytest.approx(direct.word_perplexity, rel=1e-9)
    with pytest.raises(ValueError, match="fewer than one sequence"):
        task.samples(model, 10 ** 7, num_samples=1, seed=0)
