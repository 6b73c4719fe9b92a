"""Models that ship with the project, by name. Files live in folders beside this module.

A bundled entry either names a folder here holding a real checkpoint (config.json + weights + tokenizer), or, until
trained weights are bundled, a named config initialised randomly with a fixed seed: such a model is honest plumbing
(every suite runs end to end) and its scores are chance-level by construction.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
BPE_4K = HERE / "bpe-4k"


@dataclass(frozen=True)
class BundledModel:
    family: str
    description: str
    folder: Path | None = None          # a real checkpoint folder
    random_config: str | None = None    # else: a named config of the family, random init
    config_overrides: tuple = ()
    tokenizer: Path = BPE_4K
    seed: int = 0


BUNDLED: dict[str, BundledModel] = {
    "gdn2-tiny-random": BundledModel(
        family="gdn2",
        description="2-layer GDN-2 (d=128, 2 heads of 32), random init (seed 0), bundled 4K BPE; chance-level scores",
        random_config="gdn2-tiny",
        config_overrides=(("vocab_size", 4096), ("bos_token_id", 0), ("eos_token_id", 0)),
    ),
}
