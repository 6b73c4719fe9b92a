"""The small matched models and their training: the training mix (held-out texts, disjoint RULER keys, targets),
the models of every family (matched budget and state, saved in the family's format, loaded by the registry), the
training loop (learns, reproducible from its seed) and the retraining command of a model card (tiny, on CPU)."""
import gzip
import json
import random
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from harness import small_models
from harness.bundled import BPE_4K
from harness.registry import load_model
from harness.train import IGNORE, TrainConfig, learning_rate, train
from tasks import training_mix
from tasks.ruler.words import wonderwords_list

ROOT = Path(__file__).resolve().parents[1]
TINY = small_models.Shape(hidden_size=64, layers=1, mlp_width=64, max_length=128)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A folder of training texts: two plays of the shipped data under names the held-out rule does not match, and
    two files whose names it does (they must not be read)."""
    folder = tmp_path_factory.mktemp("corpus")
    for name, source in (("play_one", "shakespeare_hamlet"), ("play_two", "shakespeare_macbeth")):
        text = gzip.decompress((ROOT / "tasks" / "data" / f"{source}.txt.gz").read_bytes()).decode()
        (folder / f"{name}.txt").write_text(text)
    (folder / "hamlet_gut.txt").write_text("held out " * 1000)
    (folder / "areopagitica.txt").write_text("held out " * 1000)
    return folder


@pytest.fixture(scope="module")
def builder(corpus) -> training_mix.MixBuilder:
    tokenizer = Tokenizer.from_file(str(BPE_4K / "tokenizer.json"))
    return training_mix.MixBuilder(training_mix.MixConfig(seq_len=256), tokenizer,
                                   training_mix.read_corpus(corpus), eos_id=0)


# ------------------------------------------------------------------------------------------ the training mix
def test_held_out_texts_are_not_read(corpus):
    assert sorted(training_mix.read_corpus(corpus)) == ["play_one", "play_two"]


def test_training_keys_are_never_ruler_keys(builder):
    ruler = {w.lower() for f in ("adjectivelist.txt", "nounlist.txt", "verblist.txt") for w in wonderwords_list(f)}
    rng = random.Random(0)
    keys = [builder.draw_atom(rng, "words") for _ in range(2000)]
    assert all(re.fullmatch(r"[a-z]+-[a-z]+", k) for k in keys)
    assert not {part for k in keys for part in k.split("-")} & ruler


def test_rows_are_a_function_of_seed_and_index(builder):
    first = builder.rows(0, 12)
    again = builder.rows(0, 12)
    parallel = training_mix.build_stream(builder, 12, workers=2, block=5)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=False))
    assert np.array_equal(parallel[0], first[0].astype(np.int16))
    assert np.array_equal(parallel[1], first[1].astype(np.int16))


def test_targets_are_next_tokens_except_mqar_and_separators(builder):
    """Text and needle tokens predict the next input token; MQAR documents have targets only at their queries (the
    value of the queried key), and an EOS separator predicts nothing."""
    kinds = set()
    for index in range(40):
        inputs, targets = builder.row(index)
        assert inputs.shape == targets.shape == (256,)
        taken = targets != IGNORE
        next_token = np.append(inputs[1:], -1)
        differs = taken & (targets != next_token)
        if not taken.all():
            kinds.add("retrieval")
            # every target that is not the next token is an MQAR value: in the upper half of the vocabulary,
            # predicted right after its key, and that key appeared earlier in the row followed by this value
            for t in np.flatnonzero(differs[:-1]):
                assert targets[t] >= 4096 // 2
                earlier = np.flatnonzero(inputs[:t] == inputs[t])
                assert any(inputs[e + 1] == targets[t] for e in earlier if e + 1 < t)
        else:
            kinds.add("text")
    assert kinds == {"text", "retrieval"}


def test_needle_documents_carry_their_answer(builder):
    tokenizer = builder.tokenizer
    rng = random.Random(1)
    for _ in range(12):
        ids, targets = builder.needle_document(rng, 600)       # every format fits in 600 tokens
        text = tokenizer.decode(ids)
        assert len(ids) <= 600 and targets[-1] == builder.eos_id and targets[:-1] == ids[1:]
        question = re.search(r"special magic \w+ for ([\w, -]+?) mentioned in the provided text (?:is|are) (.*)\.$",
                             text)
        assert question, text[-200:]
        for key in re.split(r", and |, ", question.group(1)):
            for value in question.group(2).split(", "):
                if f"for {key} is: {value}." in text:
                    break
            else:
                pytest.fail(f"no needle of key {key!r} holds an answered value in {text[-300:]!r}")


def test_answer_targets_train_the_answer_alone(corpus):
    """needle_targets='answer': the loss is on the answer tokens (and the EOS after them) only, each the next input
    token, and they spell the answer that follows the answer prefix."""
    tokenizer = Tokenizer.from_file(str(BPE_4K / "tokenizer.json"))
    config = training_mix.MixConfig(seq_len=256, needle_targets="answer", needle_formats=("single_noise",))
    answers = training_mix.MixBuilder(config, tokenizer, training_mix.read_corpus(corpus), eos_id=0)
    rng = random.Random(2)
    for _ in range(8):
        ids, targets = answers.needle_document(rng, 400)
        taken = [i for i, t in enumerate(targets) if t != IGNORE]
        assert taken == list(range(taken[0], len(ids))) and targets[-1] == answers.eos_id
        assert [targets[i] for i in taken[:-1]] == ids[taken[0] + 1:]
        prompt, answer = tokenizer.decode(ids[:taken[0] + 1]), tokenizer.decode(ids[taken[0] + 1:])
        assert prompt.endswith("mentioned in the provided text is"), prompt[-80:]
        value = re.fullmatch(r" (\d{7})\.", answer)
        assert value and f"is: {value.group(1)}." in prompt


def test_check_documents_hold_their_answer(builder):
    """Needle check documents: the prompt ends with the answer prefix and the answer after it is the value of the
    prompt's needle; the same call gives the same documents."""
    documents = builder.check_documents("single_noise", 200, 5)
    assert documents == builder.check_documents("single_noise", 200, 5) and len(documents) == 5
    for ids, prompt_len in documents:
        prompt, answer = builder.tokenizer.decode(ids[:prompt_len]), builder.tokenizer.decode(ids[prompt_len:])
        assert prompt.endswith("mentioned in the provided text is") and re.fullmatch(r" \d{7}", answer)
        assert f"is: {answer.strip()}." in prompt


class _Guesser(torch.nn.Module):
    """Logits with all mass on the input token + 1 (right wherever a document counts up) or, with echo=True, on the
    input token itself (right where a token repeats): a model whose every prediction is known in advance."""

    def __init__(self, echo: bool = False):
        super().__init__()
        self.echo = echo

    def forward(self, input_ids, past_key_values=None, use_cache=False, logits_to_keep=0):
        guess = input_ids if self.echo else input_ids + 1
        logits = torch.nn.functional.one_hot(guess, 4096).float()[:, -logits_to_keep:]
        return type("Out", (), {"logits": logits, "past_key_values": None})()


def test_answer_exact_match_counts_whole_answers():
    from harness.train import answer_exact_match

    cpu = torch.device("cpu")
    counting = [([5, 6, 7, 8, 9], 3), ([10, 11, 12, 13], 1)]
    # the second answer repeats its last prompt token (echo right); the third is 6 6 8 after a 6 (both wrong at 8)
    documents = counting + [([5, 7, 7, 7, 7], 2), ([5, 6, 6, 6, 8], 2)]
    for batch_size in (1, 3):
        assert answer_exact_match(_Guesser(), counting, cpu, batch_size) == 1.0
        assert answer_exact_match(_Guesser(), documents, cpu, batch_size) == 0.5
        assert answer_exact_match(_Guesser(echo=True), documents, cpu, batch_size) == 0.25


def test_copy_documents_repeat_a_window(builder):
    """A copy document is a window written twice; the loss is on the second copy after its first token, and each
    target is the next input token."""
    rng = random.Random(3)
    for size in (64, 200, 255):
        ids, targets = builder.copy_document(rng, size)
        half = size // 2
        assert len(ids) == len(targets) == 2 * half and ids[:half] == ids[half:]
        assert targets[:half] == [IGNORE] * half
        assert targets[half:] == ids[half + 1:] + [builder.eos_id]


def test_random_copy_documents_repeat_random_tokens(corpus):
    tokenizer = Tokenizer.from_file(str(BPE_4K / "tokenizer.json"))
    config = training_mix.MixConfig(seq_len=256, copy_source="random")
    random_copies = training_mix.MixBuilder(config, tokenizer, training_mix.read_corpus(corpus), eos_id=0)
    rng = random.Random(4)
    first, _ = random_copies.copy_document(rng, 200)
    second, targets = random_copies.copy_document(rng, 200)
    assert first[:100] == first[100:] and second[:100] == second[100:] and first[:100] != second[:100]
    assert targets == [IGNORE] * 100 + second[101:] + [0]
    assert 0 not in first and min(first) >= 1 and max(first) < 4096 and len(set(first)) > 80


def test_row_fill_documents_leaves_text_only_where_no_document_fits(corpus):
    """With row_fill "documents", text follows a retrieval row's last document only where fewer than MIN_DOC_TOKENS
    places are left; with "text", a needle too long for the room ends some rows' documents early."""
    tokenizer = Tokenizer.from_file(str(BPE_4K / "tokenizer.json"))
    books = training_mix.read_corpus(corpus)

    def text_tails(fill: str) -> list[int]:
        config = training_mix.MixConfig(seq_len=512, text_share=0.0, mqar_share=0.1, copy_share=0.1, row_fill=fill)
        builder = training_mix.MixBuilder(config, tokenizer, books, eos_id=0)
        ends = [np.flatnonzero(builder.row(i)[0] == 0) for i in range(40)]   # EOS after each document
        return [512 - 1 - int(end[-1]) if len(end) else 512 for end in ends]

    assert max(text_tails("documents")) < training_mix.MIN_DOC_TOKENS
    assert max(text_tails("text")) >= training_mix.MIN_DOC_TOKENS


def test_copy_warmup_rows_hold_copy_documents_only(corpus):
    """The first copy_warmup_rows rows are copy documents (each input half repeated, EOS between); later rows are the
    mix's, the same as without a warm-up."""
    tokenizer = Tokenizer.from_file(str(BPE_4K / "tokenizer.json"))
    books = training_mix.read_corpus(corpus)
    common = dict(seq_len=256, copy_source="random", row_fill="documents")
    warm = training_mix.MixBuilder(training_mix.MixConfig(copy_warmup_rows=3, **common), tokenizer, books, eos_id=0)
    plain = training_mix.MixBuilder(training_mix.MixConfig(**common), tokenizer, books, eos_id=0)
    for index in range(3):
        inputs, targets = warm.row(index)
        ends = np.flatnonzero(inputs == 0)
        starts = np.concatenate([[0], ends[:-1] + 1])
        for start, end in zip(starts, ends, strict=True):
            half = (end - start) // 2
            assert (end - start) % 2 == 0 and np.array_equal(inputs[start:start + half], inputs[start + half:end])
            assert np.array_equal(targets[start + half:end - 1], inputs[start + half + 1:end])
        assert 256 - 1 - ends[-1] < training_mix.MIN_DOC_TOKENS
    for index in range(3, 6):
        assert all(np.array_equal(a, b) for a, b in zip(warm.row(index), plain.row(index), strict=True))


def test_mix_shares_and_formats_are_checked():
    with pytest.raises(ValueError, match="copy_warmup_rows"):
        training_mix.MixConfig(copy_warmup_rows=-1)
    with pytest.raises(ValueError, match="row_fill"):
        training_mix.MixConfig(row_fill="copies")
    with pytest.raises(ValueError, match="mqar_share \\+ copy_share"):
        training_mix.MixConfig(mqar_share=0.6, copy_share=0.5)
    with pytest.raises(ValueError, match="copy_source"):
        training_mix.MixConfig(copy_source="book")
    with pytest.raises(ValueError, match="needle_targets"):
        training_mix.MixConfig(needle_targets="answers")
    with pytest.raises(ValueError, match="single_noise"):
        training_mix.MixConfig(needle_formats=("single_nois",))


# ------------------------------------------------------------------------------------------ the models
def test_models_match_budget_and_state():
    shape = small_models.Shape()
    counts, states = {}, {}
    for name in small_models.SMALL_MODELS:
        matched = small_models.matched_shape(name, shape)
        lm, config = small_models.build(name, matched, on_meta=True)
        counts[name] = small_models.count_params(lm)[0]
        states[name] = small_models.state_floats_per_layer(name, config)
    reference = counts["gdn2"]
    assert all(abs(c - reference) / reference < 0.01 for c in counts.values()), counts
    assert {s for n, s in states.items() if n != "transformer"} == {64 * shape.hidden_size}
    assert states["transformer"] == 0


@pytest.mark.parametrize("name", list(small_models.SMALL_MODELS))
def test_saved_model_loads_through_the_registry(tmp_path, name):
    """The folder written in the family's format loads by its bare path and gives the logits of the trained module
    with its weights rounded to bf16 (what the checkpoint stores); the tied head is stored once."""
    torch.manual_seed(0)
    lm, config = small_models.build(name, small_models.matched_shape(name, TINY))
    folder = small_models.save(tmp_path / name, lm, config, BPE_4K)
    from safetensors import safe_open
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    with torch.no_grad():
        for p in lm.parameters():
            if p.dim() >= 2:
                p.copy_(p.to(torch.bfloat16).float())
    model = load_model(str(folder), device="cpu", dtype="float32")
    assert model.family == small_models.SMALL_MODELS[name][0]
    assert model.num_params(non_embedding=False) == small_models.count_params(lm)[0]
    ids = torch.randint(1, 4096, (2, 150), generator=torch.Generator().manual_seed(0))
    lm.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.lm(input_ids=ids).logits.float(), lm(input_ids=ids).logits.float(),
                                   rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------ training
def test_learning_rate_schedule():
    config = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert learning_rate(0, config) == pytest.approx(0.1)
    assert learning_rate(9, config) == pytest.approx(1.0)
    assert learning_rate(99, config) == pytest.approx(0.1)
    assert 0.1 < learning_rate(50, config) < 1.0


def repeating_stream() -> tuple[np.ndarray, np.ndarray]:
    """64 rows of one short counting pattern (1..32 repeated): inputs and next-token targets [64, 128]."""
    pattern = np.tile(np.arange(1, 33), 5)[:129]
    return np.tile(pattern[:-1], (64, 1)).astype(np.int16), np.tile(pattern[1:], (64, 1)).astype(np.int16)


def test_training_learns_and_is_reproducible():
    """On a stream that repeats one short pattern the loss falls far below chance (log 4096 = 8.3); the same seed
    gives the same losses, another seed other ones."""
    inputs, targets = repeating_stream()

    def run(seed):
        torch.manual_seed(seed)
        lm, _ = small_models.build("transformer", small_models.matched_shape("transformer", TINY))
        return train(lm, inputs, targets, TrainConfig(steps=30, batch_size=2, lr=1e-2, warmup_steps=3,
                                                      log_every=10), torch.device("cpu"))

    first, again, other = run(0), run(0), run(1)
    assert first.losses[0][1] > 5.0 and first.final_loss < 1.0, (first.losses, first.final_loss)
    assert first.losses == again.losses and first.final_loss == again.final_loss
    assert other.losses != first.losses


def test_stop_after_replays_a_deadline_stop():
    """stop_after=N stops where a deadline stopped (a log point) with the schedule of the full step count: the same
    weights as a run whose deadline had passed, other weights than a schedule set for N steps."""
    inputs, targets = repeating_stream()

    def run(steps, **stop):
        torch.manual_seed(0)
        lm, _ = small_models.build("transformer", small_models.matched_shape("transformer", TINY))
        result = train(lm, inputs, targets, TrainConfig(steps=steps, batch_size=2, lr=1e-2, warmup_steps=3,
                                                        log_every=5), torch.device("cpu"), **stop)
        return result, torch.cat([p.detach().flatten() for p in lm.parameters()])

    (replayed, w_replayed), (deadline, w_deadline) = run(20, stop_after=5), run(20, deadline=0.0)
    (short, w_short) = run(5)
    assert replayed.steps_done == deadline.steps_done == 5 and replayed.losses == deadline.losses
    assert torch.equal(w_replayed, w_deadline) and not torch.equal(w_replayed, w_short)
    with pytest.raises(ValueError, match="multiple of log_every"):
        run(20, stop_after=7)


def test_retraining_command_reproduces_the_card(tmp_path, corpus, monkeypatch):
    """train_small.py writes a full folder; running the command its card records (tiny, on CPU) gives the same
    final loss and the same weights."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import train_small

    flags = ["--corpus", str(corpus), "--models", "gdn2", "--steps", "3", "--batch-size", "2", "--seq-len", "128",
             "--hidden-size", "64", "--layers", "1", "--mlp-width", "64", "--workers", "1", "--device", "cpu",
             "--text-share", "0.25", "--copy-share", "0.3", "--copy-source", "random", "--needle-targets", "answer",
             "--needle-formats", "single_noise", "single_essay", "--needle-check-every", "2",
             "--needle-check-docs", "2"]
    assert train_small.main(flags + ["--out", str(tmp_path / "a")]) == 0
    folder = tmp_path / "a" / "gdn2-small"
    record = json.loads((folder / "training.json").read_text())
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                                  "training.json", "loss.png", "README.md"}
    assert record["command"] in (folder / "README.md").read_text()
    assert ("--copy-share 0.3 --copy-source random --needle-targets answer --needle-formats single_noise "
            "single_essay") in record["command"]
    assert record["stream"]["mix"]["copy_share"] == 0.3
    assert list(record["stream"]["mix"]["needle_formats"]) == ["single_noise", "single_essay"]
    checks = record["result"]["needle_checks"]
    assert [step for step, _ in checks] == [2, 3]
    assert all(set(found) == {"single_noise@64", "single_noise@128", "single_essay@128", "multikey_essay@128"} and
               all(0.0 <= v <= 1.0 for v in found.values()) for _, found in checks)
    assert "needle-check" not in record["command"]     # a check does not change the run
    assert "copy documents, random tokens written twice (30%" in " ".join((folder / "README.md").read_text().split())
    command = shlex.split(record["command"])[2:]
    command[command.index("--corpus") + 1] = str(corpus)
    assert train_small.main(command + ["--workers", "1", "--device", "cpu", "--out", str(tmp_path / "b")]) == 0
    again = json.loads((tmp_path / "b" / "gdn2-small" / "training.json").read_text())
    assert again["result"]["final_loss"] == record["result"]["final_loss"]
    assert again["stream"]["stream_sha256"] == record["stream"]["stream_sha256"]
    assert (tmp_path / "b" / "gdn2-small" / "model.safetensors").read_bytes() == (
        folder / "model.safetensors").read_bytes()
    from harness.train import code_fingerprint
    assert again["software"]["code_sha256"] == record["software"]["code_sha256"] == code_fingerprint(ROOT)
    assert f"code sha256 `{record['software']['code_sha256']}`" in (folder / "README.md").read_text()


def test_code_fingerprint_follows_python_sources_only(tmp_path):
    """Same sources, same fingerprint; an edited .py file changes it; other files and __pycache__ do not."""
    import shutil

    from harness.train import code_fingerprint
    a = tmp_path / "a"
    for folder in ("gdn2", "harness", "tasks"):
        (a / folder / "sub").mkdir(parents=True)
        (a / folder / "sub" / "m.py").write_text(f"X = '{folder}'\n")
    shutil.copytree(a, tmp_path / "b")
    first = code_fingerprint(a)
    assert len(first) == 16 and first == code_fingerprint(tmp_path / "b")
    (a / "tasks" / "notes.md").write_text("not code")
    (a / "gdn2" / "__pycache__").mkdir()
    (a / "gdn2" / "__pycache__" / "m.py").write_text("cached")
    assert code_fingerprint(a) == first
    (a / "harness" / "sub" / "m.py").write_text("X = 'edited'\n")
    edited = code_fingerprint(a)
    assert edited != first
    (a / "harness" / "sub" / "m.py").rename(a / "harness" / "m.py")      # the same content at another path
    assert code_fingerprint(a) not in (first, edited)


def test_pick_steps_fits_the_slowest_model():
    sys.path.insert(0, str(ROOT / "scripts"))
    from train_small import pick_steps

    def probe(seconds_per_step):      # compiled by the first log point, then 25 s at the barrier
        elapsed = [5.0, 30.0 + 10 * seconds_per_step, 30.0 + 20 * seconds_per_step, 30.0 + 30 * seconds_per_step]
        losses = [[10, 9.0], [20, 8.0], [30, 7.0], [40, 6.0]]
        return {"result": {"losses": losses, "extra": {"elapsed_at_log": elapsed}}}

    # 0.8 * 100 s / 0.05 s per step = 1600 steps for the slowest
    assert pick_steps({"a": probe(0.01), "b": probe(0.05)}, budget=100, cap=5000) == 1600
    assert pick_steps({"a": probe(0.01)}, budget=100, cap=3000) == 3000


def test_probes_wait_for_each_other_at_the_barrier(tmp_path):
    """A probe that arrives first waits until every sibling has arrived (so all time their steps together); a
    missing sibling ends the wait at the timeout instead of hanging."""
    import threading

    sys.path.insert(0, str(ROOT / "scripts"))
    from train_small import wait_at_barrier

    (tmp_path / "count").write_text("2")
    released = []
    first = threading.Thread(target=lambda: released.append(wait_at_barrier(tmp_path, "a", timeout=30)))
    first.start()
    first.join(timeout=0.5)
    assert first.is_alive() and not released            # alone at the barrier: still waiting
    assert wait_at_barrier(tmp_path, "b", timeout=30)
    first.join(timeout=5)
    assert released == [True]
    (tmp_path / "count").write_text("4")                 # a, b, c arrive; the fourth never does
    assert wait_at_barrier(tmp_path, "c", timeout=0.2) is False


def test_card_digest_covers_the_rows_trained_on(builder):
    """A --parallel run builds the stream for its step cap; the card's digest is over the rows its steps read, the
    digest the retrain command's own (shorter) stream gets."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import train_small

    inputs, targets = training_mix.build_stream(builder, 12)
    description = {"rows": 12, "stream_sha256": training_mix.stream_digest(inputs, targets)}
    narrowed = train_small.rows_trained_on(description, inputs, targets, 6)
    assert narrowed["rows"] == 6
    assert narrowed["stream_sha256"] == training_mix.stream_digest(*training_mix.build_stream(builder, 6))
    assert narrowed["stream_sha256"] != description["stream_sha256"]
    assert train_small.rows_trained_on(description, inputs, targets, 12) is description
