"""MQAR (Zoology-style multi-query associative recall): structure, power-law placement, determinism, scoring."""
import numpy as np
import pytest

from tasks import get_task
from tasks.mqar import IGNORE_INDEX, MQAR_TASK, mqar_accuracy, mqar_arrays, mqar_batches, sample_seed


def test_structure_keys_values_queries():
    V, T, K = 1000, 256, 16
    inputs, labels = mqar_arrays(64, T, V, K, seed=3)
    assert inputs.shape == labels.shape == (64, T) and inputs.dtype == labels.dtype == np.int64
    for x, y in zip(inputs, labels, strict=True):
        keys, values = x[0:2 * K:2], x[1:2 * K:2]
        assert len(set(keys)) == K and len(set(values)) == K
        assert ((keys >= 1) & (keys < V // 2)).all() and ((values >= V // 2) & (values < V)).all()
        pos = np.flatnonzero(y != IGNORE_INDEX)
        assert len(pos) == K and (pos >= 2 * K).all() and ((pos - 2 * K) % 2 == 0).all()
        pair = dict(zip(keys.tolist(), values.tolist(), strict=True))
        assert sorted(x[pos].tolist()) == sorted(keys.tolist())  # each key queried exactly once
        for p in pos:
            assert y[p] == pair[x[p]]  # the label after a query is its key's value
        assert (x >= 0).all() and (x < V).all()


def test_power_law_favours_short_gaps():
    T, K = 1024, 8
    inputs, labels = mqar_arrays(400, T, 4096, K, power_a=0.01, seed=0)
    gaps = (np.argwhere(labels != IGNORE_INDEX)[:, 1] - 2 * K) // 2
    space = (T - 2 * K) // 2
    assert np.median(gaps) < space / 8  # uniform placement would give ~space / 2
    # gap 0 gets probability a * 1^(a-1) / sum ~ 0.07 per draw, far above uniform 1/space
    assert (gaps == 0).mean() > 5 / space


def test_non_query_filler():
    inputs, labels = mqar_arrays(4, 128, 500, 4, seed=1, random_non_queries=False)
    region = inputs[:, 8:]
    assert set(np.unique(region[labels[:, 8:] == IGNORE_INDEX])) <= set(np.unique(inputs[:, 0:8:2])) | {0}


def test_deterministic_and_batches_reproducible():
    a = mqar_arrays(8, 128, 512, 8, seed=5)
    b = mqar_arrays(8, 128, 512, 8, seed=5)
    c = mqar_arrays(8, 128, 512, 8, seed=6)
    assert all((x == y).all() for x, y in zip(a, b, strict=True)) and not (a[0] == c[0]).all()
    s1, s2 = mqar_batches(4, 64, 256, 4, seed=1), mqar_batches(4, 64, 256, 4, seed=1)
    for _ in range(3):
        (x1, y1), (x2, y2) = next(s1), next(s2)
        assert (x1 == x2).all() and (y1 == y2).all()
    first, second = next(mqar_batches(4, 64, 256, 4, seed=1)), next(s1)
    assert not (first[0] == second[0]).all()


def test_accuracy_at_query_positions_only():
    inputs, labels = mqar_arrays(2, 64, 256, 4, seed=0)
    pred = np.where(labels == IGNORE_INDEX, 0, labels)
    assert mqar_accuracy(pred, labels) == 100.0
    wrong_one = pred.copy()
    wrong_one[0, np.flatnonzero(labels[0] != IGNORE_INDEX)[0]] = 1
    assert mqar_accuracy(wrong_one, labels) == pytest.approx(100 * 7 / 8)
    assert mqar_accuracy(pred[:, :-1], labels) == 100.0  # [N, T-1] predictions work too


def test_task_interface():
    task = get_task("mqar")
    assert task is MQAR_TASK and task.kind == "token"
    samples = task.build_samples(vocab_size=2048, length=512, num_samples=3, seed=0, num_kv_pairs=16)
    s = samples[0]
    assert len(s.input_ids) == 512 and len(s.query_positions) == 16 == len(s.target_ids)
    pred = [0] * 511
    for p, t in zip(s.query_positions[:4], s.target_ids[:4], strict=True):
        pred[p] = t
    score, detail = task.score(pred, s.to_record())
    assert score == 25.0 and detail["correct"] == 4 and detail["num_queries"] == 16
    assert task.build_samples(2048, 512, 3, seed=0, num_kv_pairs=16)[2] == samples[2]


def test_sample_i_does_not_depend_on_the_number_of_samples():
    few = MQAR_TASK.build_samples(vocab_size=512, length=128, num_samples=2, seed=7)
    many = MQAR_TASK.build_samples(vocab_size=512, length=128, num_samples=6, seed=7)
    assert many[:2] == few
    assert len({tuple(s.input_ids) for s in many}) == 6          # distinct sequences, not one repeated
    assert [s.index for s in many] == list(range(6)) and all(s.seed == 7 for s in many)
    # sample i is mqar_arrays of one sequence at its own seed, so the samples a result store holds stay reproducible
    inputs, labels = mqar_arrays(1, 128, 512, 8, seed=int(np.random.SeedSequence([7, 3]).generate_state(1)[0]))
    assert many[3].sample_seed == sample_seed(7, 3) and many[3].input_ids == inputs[0].tolist()
    assert many[3].target_ids == labels[0][labels[0] != IGNORE_INDEX].tolist()
    other_seed = MQAR_TASK.build_samples(vocab_size=512, length=128, num_samples=2, seed=8)
    assert other_seed[0].input_ids != few[0].input_ids


def test_errors_are_clear():
    with pytest.raises(ValueError, match="too short"):
        mqar_arrays(1, 30, 1000, 8)
    with pytest.raises(ValueError, match="too small"):
        mqar_arrays(1, 256, 10, 8)


def test_adapter_refuses_unknown_options_before_any_model_loads():
    from harness.task_adapters import resolve_task

    assert resolve_task("mqar", {"num_kv_pairs": 16}).options == {"num_kv_pairs": 16}
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['num_kv_pair'\]"):
        resolve_task("mqar", {"num_kv_pair": 16})
