"""The RULER task table (rows of knobs), and the task object the harness calls.

    task = RULER_TASKS["niah_single_2"]
    samples = task.build_samples(tokenizer, length=4096, num_samples=500, seed=42)
    model_out = generate(sample.prompt, max_new_tokens=sample.max_new_tokens)   # greedy
    score = task.score(model_out, sample)                                        # 0..100
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from ..haystacks import HaystackIdentity, load_essay, needle_identity, noise_identity
from ..tokenization import TokenCounter
from .constants import TOKENS_TO_GENERATE
from .cwe import CWEFamily, CWEKnobs
from .fwe import FWEFamily, FWEKnobs
from .length import LengthTargetError, fit_samples
from .metrics import METRICS, postprocess_pred, score_prediction
from .niah import NiahFamily, NiahKnobs
from .sample import Sample, sample_rng
from .vt import VTFamily, VTKnobs


@dataclass(frozen=True)
class RulerTask:
    """One RULER task: a family, a row of knobs, a generation budget and a metric."""

    name: str
    family: str  # RULER's family name: niah | variable_tracking | common_words_extraction | freq_words_extraction
    knobs: Any
    description: str
    aliases: tuple[str, ...] = ()
    metric: str = "string_match_all"
    kind: str = field(default="generate", init=False)

    @property
    def max_new_tokens(self) -> int:
        return TOKENS_TO_GENERATE[self.family]

    @property
    def haystack_type(self) -> str:
        return getattr(self.knobs, "type_haystack", "none")

    # -- samples ---------------------------------------------------------------------------------------------------
    def build_samples(self, tokenizer: Any, length: int, num_samples: int, seed: int = 42,
                      haystack_file: str | None = None, progress: bool = False) -> list[Sample]:
        """Generate ``num_samples`` samples of ``length`` tokens (input + answer prefix + max_new_tokens, counted
        with ``tokenizer``, in [0.9 * length, length]). Deterministic given (seed, tokenizer, haystack)."""
        if length <= 0 or num_samples < 0:
            raise ValueError(f"length must be > 0 and num_samples >= 0, got length={length}, "
                             f"num_samples={num_samples}")
        counter = tokenizer if isinstance(tokenizer, TokenCounter) else TokenCounter(tokenizer)
        family, identity = self._family(length, seed, haystack_file, counter)
        task = self.name
        fitted = fit_samples(
            family, counter, length, self.max_new_tokens, num_samples,
            sample_rng=lambda i, attempt: sample_rng(task, seed, i, attempt),
            probe_rng=lambda j: sample_rng(task, seed, f"probe{j}"),
            task=task, progress=progress,
        )
        samples = []
        for index, fit in enumerate(fitted):
            d, enc = fit.draft, fit.encoded
            depths = [enc.token_index(c) for c in d.needle_chars]
            token_position_answer = None
            if self.family == "niah":
                pos = d.input.find(d.outputs[0])
                token_position_answer = enc.token_index(pos) if pos >= 0 else None
            samples.append(Sample(
                index=index, input=d.input, outputs=list(d.outputs),
                length=enc.num_tokens + self.max_new_tokens, answer_prefix=d.answer_prefix, task=task,
                max_new_tokens=self.max_new_tokens, target_length=length, input_tokens=enc.num_tokens,
                needle_depth_tokens=depths,
                needle_depth_percent=[round(100.0 * t / enc.num_tokens, 2) for t in depths],
                token_position_answer=token_position_answer,
                haystack=identity.name, haystack_sha256=identity.sha256,
                haystack_units=fit.num_units, seed=seed, metric=self.metric, tokenizer=counter.name,
            ))
        return samples

    def _family(self, length: int, seed: int, haystack_file: str | None, counter: TokenCounter):
        k = self.knobs
        if self.family == "niah":
            if k.type_haystack == "essay":
                essay = load_essay(haystack_file)
                return NiahFamily(k, essay), essay.identity
            return NiahFamily(k), noise_identity() if k.type_haystack == "noise" else needle_identity()
        if self.family == "variable_tracking":
            fam = VTFamily(k)
            fam.prepare(counter, lambda _: sample_rng(self.name, seed, "icl"))
            return fam, noise_identity()
        if self.family == "common_words_extraction":
            extra = load_essay(haystack_file).words if length > 65536 else None
            ident = HaystackIdentity("wonderwords-3.0.1", "", "builtin")
            return CWEFamily(k, length, seed, extra), ident
        if self.family == "freq_words_extraction":
            ident = HaystackIdentity("coded-words", "", "builtin")
            return FWEFamily(k, length, self.max_new_tokens, seed), ident
        raise ValueError(f"unknown RULER family {self.family!r}")

    # -- scoring ---------------------------------------------------------------------------------------------------
    @staticmethod
    def postprocess(prediction: str) -> str:
        return postprocess_pred(prediction)

    def score(self, prediction: str, sample: Sample | dict) -> float:
        """Per-sample score in percent (post-processing included)."""
        refs = sample.outputs if isinstance(sample, Sample) else sample["outputs"]
        return score_prediction(prediction, refs, self.metric)

    def aggregate(self, predictions: Sequence[str], samples: Sequence[Sample | dict]) -> float:
        """RULER's task score (percent, 2 decimals) over post-processed predictions."""
        refs = [s.outputs if isinstance(s, Sample) else s["outputs"] for s in samples]
        return METRICS[self.metric]([postprocess_pred(p) for p in predictions], refs)


def _niah(name: str, haystack: str, k_type: str, v_type: str, k: int = 1, v: int = 1, q: int = 1,
          description: str = "", aliases: tuple[str, ...] = ()) -> RulerTask:
    return RulerTask(name, "niah", NiahKnobs(haystack, k_type, v_type, k, v, q), description, aliases)


# The table: RULER scripts/synthetic.yaml, plus the natural-language multi-key row (ours).
_ROWS = [
    _niah("niah_single_1", "noise", "words", "numbers", description="S-NIAH-1 (passkey): number in noise",
          aliases=("s_niah_1",)),
    _niah("niah_single_2", "essay", "words", "numbers", description="S-NIAH-2: number in essay",
          aliases=("s_niah_2",)),
    _niah("niah_single_3", "essay", "words", "uuids", description="S-NIAH-3: uuid in essay",
          aliases=("s_niah_3",)),
    _niah("niah_multikey_1", "essay", "words", "numbers", k=4, description="MK-NIAH-1: 4 keys in essay",
          aliases=("mk_niah_1",)),
    _niah("niah_multikey_2", "needle", "words", "numbers", description="MK-NIAH-2: haystack of distractor needles"),
    _niah("niah_multikey_3", "needle", "uuids", "uuids", description="MK-NIAH-3: uuid keys among distractors"),
    _niah("niah_multivalue", "essay", "words", "numbers", v=4, description="MV-NIAH: 4 values for one key"),
    _niah("niah_multiquery", "essay", "words", "numbers", q=4, description="MQ-NIAH: 4 keys queried at once"),
    _niah("niah_mqar_nl", "essay", "words", "numbers", k=16, q=4,
          description="ours: natural-language MQAR, 16 key-value needles in essay, 4 queried",
          aliases=("mqar_nl",)),
    RulerTask("vt", "variable_tracking", VTKnobs(), "variable tracking: 1 chain, 4 hops, noise",
              ("variable_tracking",)),
    RulerTask("cwe", "common_words_extraction", CWEKnobs(), "common words: 10 words x30 among x3",
              ("common_words_extraction",)),
    RulerTask("fwe", "freq_words_extraction", FWEKnobs(), "frequent coded words, zeta alpha 2.0",
              ("freq_words_extraction",)),
]
RULER_TASKS: dict[str, RulerTask] = {t.name: t for t in _ROWS}

__all__ = ["RulerTask", "RULER_TASKS", "LengthTargetError"]
