"""RULER length targeting with three real offline tokenizers: every sample in [0.9 L, L] tokens (generation budget
included), recounted independently; needles present exactly once at the recorded token depth."""
import pytest

from tasks import get_task
from tasks.offline_tokenizers import OFFLINE_TOKENIZERS
from tasks.ruler import LengthTargetError

ALL_TASKS = ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
             "niah_multikey_3", "niah_multivalue", "niah_multiquery", "niah_mqar_nl", "vt", "cwe", "fwe"]
LONG_TASKS = ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_3", "vt", "cwe",
              "fwe"]
CASES = ([(t, 1024) for t in ALL_TASKS] + [(t, 4096) for t in ALL_TASKS] + [(t, 16384) for t in LONG_TASKS])
TOKENIZERS = ["bpe", "gpt-neox", "mistral"]


@pytest.fixture(scope="module", params=TOKENIZERS)
def tokenizer(request):
    return OFFLINE_TOKENIZERS[request.param]()


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("task_name,length", CASES)
def test_lengths_within_window_and_needles_at_depth(tokenizer, task_name, length):
    task = get_task(task_name)
    samples = task.build_samples(tokenizer, length, num_samples=3, seed=7)
    assert [s.index for s in samples] == [0, 1, 2]
    for s in samples:
        ids = _ids(tokenizer, s.input + s.answer_prefix)
        assert s.input_tokens == len(ids)
        assert s.length == len(ids) + task.max_new_tokens
        assert 0.9 * length <= s.length <= length, (task_name, length, s.length)
        assert s.target_length == length
        if task.family == "niah":
            k = task.knobs
            assert len(s.needle_depth_tokens) == k.num_keys * k.num_needle_v
            assert len(s.outputs) == k.num_needle_q * k.num_needle_v
            for value in s.outputs:  # every reference value sits in exactly one needle
                assert s.input.count(f"is: {value}.") == 1
            for depth in s.needle_depth_tokens:
                window = tokenizer.decode(ids[depth:depth + 4])
                assert "One" in window, (depth, window)
            assert s.needle_depth_tokens == sorted(s.needle_depth_tokens)
        if task.family == "variable_tracking":
            assert len(s.needle_depth_tokens) == 5
            for depth in s.needle_depth_tokens:
                assert "VAR" in tokenizer.decode(ids[depth:depth + 3])


def test_depth_matches_prefix_count():
    """The recorded depth equals RULER's definition (tokens of the text before the needle) up to a boundary merge."""
    tok = OFFLINE_TOKENIZERS["mistral"]()
    for s in get_task("niah_multikey_1").build_samples(tok, 2048, 4, seed=3):
        starts = [i for i in range(len(s.input)) if s.input.startswith("One of the special magic", i)]
        assert len(starts) == 4
        prefix_counts = [len(_ids(tok, s.input[:c])) for c in starts]
        assert all(abs(a - b) <= 1 for a, b in zip(prefix_counts, s.needle_depth_tokens, strict=True))


def test_too_small_length_is_a_clear_error():
    tok = OFFLINE_TOKENIZERS["gpt-neox"]()
    with pytest.raises(LengthTargetError, match="too small"):
        get_task("niah_single_1").build_samples(tok, 160, 2)
    with pytest.raises(LengthTargetError, match="too small"):
        get_task("vt").build_samples(tok, 100, 2)


def test_essay_depths_spread_over_the_context():
    tok = OFFLINE_TOKENIZERS["gpt-neox"]()
    samples = get_task("niah_single_2").build_samples(tok, 4096, 40, seed=1)
    pct = [s.needle_depth_percent[0] for s in samples]
    assert min(pct) < 15 and max(pct) > 80  # depths drawn from 0..100 %


def test_sentencepiece_and_plain_callable_tokenizers_agree_with_fast():
    """The same Mistral tokenizer as a Rust-backed HF object, a SentencePieceProcessor and a bare callable gives
    the same samples (offsets vs prefix counting may move a depth by one token at a boundary)."""
    import sentencepiece as spm

    from tasks.offline_tokenizers import mistral_model_path

    fast = OFFLINE_TOKENIZERS["mistral"]()
    sp = spm.SentencePieceProcessor(model_file=str(mistral_model_path()))
    task = get_task("niah_multikey_1")
    ref = task.build_samples(fast, 2048, 2, seed=4)
    for tok in [sp, lambda text: sp.encode(text)]:
        other = task.build_samples(tok, 2048, 2, seed=4)
        for a, b in zip(ref, other, strict=True):
            assert (a.input, a.length, a.outputs) == (b.input, b.length, b.outputs)
            assert all(abs(x - y) <= 1 for x, y in zip(a.needle_depth_tokens, b.needle_depth_tokens, strict=True))
