"""Models that ship with the project, by name. Files live in folders beside this module.

- `<model>-small` (one per entry of harness/small_models.py): small matched models of every family trained here
  (scripts/train_small.py), each a real checkpoint folder in its family's format with a model card (README.md) and
  its training record (training.json). Small-scale: they compare families with each other, not with the paper.
- `gdn2-tiny-random`: a 2-layer GDN-2 initialised randomly with a fixed seed; plumbing only (every suite runs end to
  end), its scores are chance-level by construction.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
BPE_4K = HERE / "bpe-4k"
SMALL_SUFFIX = "-small"


@dataclass(frozen=True)
class BundledModel:
    family: str
    description: str
    folder: Path | None = None          # a real checkpoint folder
    random_config: str | None = None    # else: a named config of the family, random init
    config_overrides: tuple = ()
    tokenizer: Path = BPE_4K
    seed: int = 0


def _small_models() -> dict[str, BundledModel]:
    """The trained small models whose folders are present (harness/small_models.py names them)."""
    from harness.small_models import SMALL_MODELS

    found = {}
    for model, (family, _, description) in SMALL_MODELS.items():
        folder = HERE / (model + SMALL_SUFFIX)
        if (folder / "config.json").is_file():
            found[folder.name] = BundledModel(family=family, folder=folder, tokenizer=folder,
                                              description=f"{description}, small-scale, trained here "
                                                          f"(model card: {folder.name}/README.md)")
    return found


BUNDLED: dict[str, BundledModel] = {
    **_small_models(),
    "gdn2-tiny-random": BundledModel(
        family="gdn2",
        description="2-layer GDN-2 (d=128, 2 heads of 32), random init (seed 0), bundled 4K BPE; chance-level scores",
        random_config="gdn2-tiny",
        config_overrides=(("vocab_size", 4096), ("bos_token_id", 0), ("eos_token_id", 0)),
    ),
}
SMALL_MODEL_NAMES: tuple[str, ...] = tuple(name for name in BUNDLED if name.endswith(SMALL_SUFFIX))
