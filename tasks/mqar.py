"""Multi-query associative recall (MQAR), Zoology-style (Arora et al. 2023, HazyResearch/zoology), torch-free.

A sequence of T tokens over a vocabulary of V ids:

    k_1 v_1 k_2 v_2 ... k_K v_K | x x k_a x x x k_b x ... (query region)

- keys are drawn without replacement from [1, V/2), values without replacement from [V/2, V) (disjoint halves);
- the K key-value pairs fill the first 2K positions;
- each key is queried once in the rest of the sequence, at an even offset 2*g from the end of the pairs, with the
  gaps g drawn without replacement from range((T - 2K) // 2) with probability proportional to a * g'^(a - 1),
  g' = g + 1, a = power_a = 0.01 (a power law that favours short gaps, as in Zoology);
- every other position of the query region is a random id from [0, V) (``random_non_queries``; else 0);
- labels[t] = the value of the key at position t for query positions, -100 elsewhere (next-token targets, already
  shifted: the model must output labels[t] after reading inputs[0..t]).

Accuracy is measured only at the query positions (argmax of the next-token distribution == the value).

The same generator serves evaluation (``MQAR_TASK.build_samples`` / ``score``, one record per sequence; sample i is
drawn from its own seed ``sample_seed(seed, i)``, so it does not depend on how many samples are asked for) and
training (``mqar_arrays`` / ``mqar_batches``: numpy int64 arrays [N, T], pass them to torch.from_numpy).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

import numpy as np

IGNORE_INDEX = -100


def _check(seq_len: int, vocab_size: int, num_kv_pairs: int) -> None:
    if num_kv_pairs < 1:
        raise ValueError(f"num_kv_pairs must be >= 1, got {num_kv_pairs}")
    if seq_len < 4 * num_kv_pairs:
        raise ValueError(f"seq_len {seq_len} is too short for {num_kv_pairs} key-value pairs: MQAR needs "
                         f"seq_len >= 4 * num_kv_pairs = {4 * num_kv_pairs} (pairs, then one query slot per key)")
    if vocab_size // 2 - 1 < num_kv_pairs:
        raise ValueError(f"vocab_size {vocab_size} is too small for {num_kv_pairs} distinct keys and values "
                         f"(keys come from [1, V/2), values from [V/2, V))")


def _choose_without_replacement(rng: np.random.Generator, n_rows: int, population: int, k: int,
                                log_weights: np.ndarray | None = None) -> np.ndarray:
    """[n_rows, k] indices into range(population), distinct per row, in selection order. With ``log_weights``,
    successive sampling proportional to exp(log_weights) (Gumbel top-k: the same law as numpy's
    choice(replace=False, p=...)); without, uniform."""
    scores = rng.random((n_rows, population))
    if log_weights is not None:
        scores = log_weights[None, :] - np.log(-np.log(np.clip(scores, 1e-300, None)))
    else:
        scores = -scores
    if k < population:
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        top = np.tile(np.arange(population), (n_rows, 1))
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def mqar_arrays(num_examples: int, seq_len: int, vocab_size: int, num_kv_pairs: int = 8, power_a: float = 0.01,
                seed: int = 0, random_non_queries: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels), both int64 [num_examples, seq_len]; labels are IGNORE_INDEX except at query positions."""
    _check(seq_len, vocab_size, num_kv_pairs)
    rng = np.random.default_rng(seed)
    n, k = num_examples, num_kv_pairs
    half = vocab_size // 2
    keys = 1 + _choose_without_replacement(rng, n, half - 1, k)  # [n, k] in [1, half)
    values = half + _choose_without_replacement(rng, n, vocab_size - half, k)  # [n, k] in [half, V)
    context = 2 * k
    space = (seq_len - context) // 2
    gap_ids = np.arange(1, space + 1, dtype=np.float64)
    log_p = np.log(power_a) + (power_a - 1) * np.log(gap_ids)
    gaps = _choose_without_replacement(rng, n, space, k, log_weights=log_p)  # [n, k]

    inputs = np.zeros((n, seq_len), dtype=np.int64)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    query_pos = context + 2 * gaps
    rows = np.arange(n)[:, None]
    if random_non_queries:
        filler = rng.integers(0, vocab_size, size=(n, seq_len - context), dtype=np.int64)
        inputs[:, context:] = filler
    inputs[rows, query_pos] = keys
    labels = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
    labels[rows, query_pos] = values
    return inputs, labels


def sample_seed(seed: int, index: int) -> int:
    """The seed of evaluation sample ``index`` of a cell seeded ``seed`` (numpy SeedSequence of (seed, index))."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def mqar_batches(batch_size: int, seq_len: int, vocab_size: int, num_kv_pairs: int = 8, power_a: float = 0.01,
                 seed: int = 0, random_non_queries: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """An endless stream of training batches; batch i uses the seed sequence (seed, 1, i), so it is reproducible
    and its seeds differ from the evaluation samples' (``sample_seed``: the sequence (seed, index))."""
    step = 0
    while True:
        batch_seed = np.random.SeedSequence([seed, 1, step]).generate_state(1)[0]
        yield mqar_arrays(batch_size, seq_len, vocab_size, num_kv_pairs, power_a, int(batch_seed),
                          random_non_queries)
        step += 1


def mqar_accuracy(predicted_next_ids: np.ndarray, labels: np.ndarray) -> float:
    """Percent of query positions (labels != IGNORE_INDEX) where the predicted next id equals the label.
    ``predicted_next_ids``: [N, T] (or [N, T-1]: the last position is never a query) argmax ids."""
    predicted = np.asarray(predicted_next_ids)
    labels = np.asarray(labels)[..., : predicted.shape[-1]]
    mask = labels != IGNORE_INDEX
    if not mask.any():
        raise ValueError("no query positions in labels")
    return float((predicted[mask] == labels[mask]).mean() * 100.0)


@dataclass
class MQARSample:
    """One MQAR sequence. query_positions[i]: the position of the i-th queried key (in order of position);
    target_ids[i]: the value the model must predict right after it. seed: the cell's seed; sample_seed: the seed
    this sequence was drawn from (``sample_seed(seed, index)``)."""

    index: int
    input_ids: list[int]
    query_positions: list[int]
    target_ids: list[int]
    length: int
    vocab_size: int
    num_kv_pairs: int
    power_a: float
    seed: int
    sample_seed: int
    task: str = "mqar"

    def to_record(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MQARTask:
    """MQAR behind the task interface. ``build_samples`` makes one sequence per sample; ``score`` takes the
    greedy next-token ids (pred[t] = argmax after reading inputs[0..t]) and returns (percent correct, detail)."""

    name: str = "mqar"
    kind: str = "token"
    description: str = "Zoology MQAR: K key-value pairs, each key queried once (power-law gaps); accuracy at queries"
    num_kv_pairs: int = 8
    power_a: float = 0.01
    random_non_queries: bool = True
    metric: str = "query_accuracy"

    def config(self) -> dict:
        return {"num_kv_pairs": self.num_kv_pairs, "power_a": self.power_a,
                "random_non_queries": self.random_non_queries}

    @staticmethod
    def check_options(num_kv_pairs: int | None = None, power_a: float | None = None) -> None:
        """ValueError naming a bad option value, before any sample is built (suite cells' options)."""
        if num_kv_pairs is not None and (isinstance(num_kv_pairs, bool) or not isinstance(num_kv_pairs, int)
                                         or num_kv_pairs < 1):
            raise ValueError(f"mqar option num_kv_pairs must be a whole number >= 1, got {num_kv_pairs!r}")
        if power_a is not None and (isinstance(power_a, bool) or not isinstance(power_a, (int, float))
                                    or not power_a > 0):
            raise ValueError(f"mqar option power_a must be a number > 0, got {power_a!r}")

    def build_samples(self, vocab_size: int, length: int, num_samples: int, seed: int = 0,
                      num_kv_pairs: int | None = None, power_a: float | None = None) -> list[MQARSample]:
        """``length`` is the sequence length T. ``num_kv_pairs`` defaults to the task's (8). Sample i is drawn
        from ``sample_seed(seed, i)`` alone: the same whatever ``num_samples`` is."""
        k = self.num_kv_pairs if num_kv_pairs is None else int(num_kv_pairs)
        a = self.power_a if power_a is None else float(power_a)
        samples = []
        for index in range(num_samples):
            own_seed = sample_seed(seed, index)
            inputs, labels = mqar_arrays(1, length, vocab_size, k, a, own_seed, self.random_non_queries)
            pos = np.flatnonzero(labels[0] != IGNORE_INDEX)
            samples.append(MQARSample(index, inputs[0].tolist(), pos.tolist(), labels[0, pos].tolist(), length,
                                      vocab_size, k, a, seed, own_seed))
        return samples

    def score(self, predicted_next_ids: Sequence[int], sample: MQARSample | dict) -> tuple[float, dict]:
        record = sample.to_record() if isinstance(sample, MQARSample) else sample
        positions, targets = record["query_positions"], record["target_ids"]
        predicted = [int(predicted_next_ids[p]) if p < len(predicted_next_ids) else -1 for p in positions]
        correct = sum(int(p == t) for p, t in zip(predicted, targets, strict=True))
        return 100.0 * correct / len(targets), {"predicted": predicted, "correct": correct,
                                                 "num_queries": len(targets)}


MQAR_TASK = MQARTask()
