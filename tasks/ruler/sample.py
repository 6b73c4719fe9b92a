"""The sample record: RULER's flat format (index, input, outputs, length, answer_prefix) plus our extras."""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

RULER_KEYS = ("index", "input", "outputs", "length", "length_w_model_temp", "answer_prefix", "token_position_answer")


@dataclass
class Sample:
    """One evaluation request and its references.

    length: tokens of ``input + answer_prefix`` (model's tokenizer, no special tokens) + ``max_new_tokens``; this is
    RULER's ``length`` field, and target_length * 0.9 <= length <= target_length.
    needle_depth_tokens: for each needle in document order, the index of the token (in input + answer_prefix)
    holding the needle's first character; needle_depth_percent = 100 * that / input_tokens.
    """

    index: int
    input: str
    outputs: list[str]
    length: int
    answer_prefix: str
    task: str
    max_new_tokens: int
    target_length: int
    input_tokens: int
    needle_depth_tokens: list[int]
    needle_depth_percent: list[float]
    token_position_answer: int | None
    haystack: str
    haystack_sha256: str
    haystack_units: int
    seed: int
    metric: str
    tokenizer: str
    extra: dict = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        """What the model is fed (base models, no chat template): input + answer_prefix."""
        return self.input + self.answer_prefix

    @property
    def references(self) -> list[str]:
        return self.outputs

    def to_record(self) -> dict:
        """A flat JSON-able dict, RULER's keys first (``length_w_model_temp`` = ``length``: no model template)."""
        data = asdict(self)
        extra = data.pop("extra")
        record = {
            "index": self.index,
            "input": self.input,
            "outputs": list(self.outputs),
            "length": self.length,
            "length_w_model_temp": self.length,
            "answer_prefix": self.answer_prefix,
        }
        if self.token_position_answer is not None:
            record["token_position_answer"] = self.token_position_answer
        for key, value in data.items():
            if key not in record and key != "token_position_answer":
                record[key] = value
        record.update(extra)
        return record

    @classmethod
    def from_record(cls, record: dict) -> "Sample":
        known = set(cls.__dataclass_fields__)
        kwargs = {k: v for k, v in record.items() if k in known and k != "extra"}
        kwargs.setdefault("token_position_answer", None)
        extra = {k: v for k, v in record.items() if k not in known and k not in RULER_KEYS}
        return cls(**kwargs, extra=extra)


def sample_rng(task: str, seed: int, index: int | str, attempt: int = 0) -> random.Random:
    """The random stream of one sample. Seeded from a string (hashed with SHA-512 by ``random``), so it is the same
    in every process and on every platform, and independent of the tokenizer."""
    return random.Random(f"ruler|{task}|{seed}|{index}|{attempt}")
