"""Checkpoint files: resolve a local folder or hub id, read weights and tokenizers, load with named errors."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def resolve_source(source: str) -> Path:
    """A local checkpoint folder, or a hub id downloaded through huggingface_hub (needs network)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{source!r} is a file; pass the checkpoint folder that holds config.json")
    if source.count("/") != 1 or source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"checkpoint folder {source!r} does not exist (and it is not a hub id 'org/name')")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model", "*.txt"]))
    except Exception as err:  # offline, unknown repo, auth: say which and what to do
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        reason = "HF_HUB_OFFLINE=1 is set" if offline else f"{type(err).__name__}: {err}"
        raise FileNotFoundError(
            f"could not fetch hub id {source!r} ({reason}). On a machine without network, download the checkpoint "
            f"elsewhere (e.g. `hf download {source} --local-dir DIR`) and pass the local folder: family=DIR"
        ) from err


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder (safetensors preferred, sharded or not; else pytorch_model.bin)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    def load_one(file: Path) -> dict[str, torch.Tensor]:
        if not file.is_file():
            raise FileNotFoundError(f"weight file {file} is missing")
        try:
            if file.suffix == ".safetensors":
                return load_file(str(file))
            return torch.load(file, map_location="cpu", weights_only=True)
        except (SafetensorError, RuntimeError, EOFError, OSError, ValueError) as err:
            raise ValueError(f"weight file {file} is corrupt or truncated ({type(err).__name__}: {err})") from err

    for name in WEIGHT_FILES:
        file = folder / name
        if not file.is_file():
            continue
        if name.endswith(".index.json"):
            try:
                index = json.loads(file.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise ValueError(f"{file} is not a valid shard index ({err})") from err
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(index.values())):
                state.update(load_one(folder / shard))
            return state
        state = load_one(file)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]  # training checkpoints that wrap the weights
        return state
    raise FileNotFoundError(f"no weights in {folder}: expected one of {', '.join(WEIGHT_FILES)}")


def load_weights_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `module`; any missing, unexpected or mis-shaped tensor is an error naming the tensors."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape)
    )
    if missing or unexpected or mis_shaped:
        def show(items):
            return ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")
        parts = [f"missing: {show(missing)}" if missing else "",
                 f"unexpected: {show(unexpected)}" if unexpected else "",
                 f"shape mismatch: {show(mis_shaped)}" if mis_shaped else ""]
        raise ValueError(
            f"weights in {source} do not match the model built from its config ("
            + "; ".join(p for p in parts if p) + "). Check that config.json belongs to these weights."
        )
    module.load_state_dict(state, strict=True)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def check_tokenizer_path(path: str) -> None:
    """FileNotFoundError / ValueError unless a local tokenizer path is a folder holding tokenizer files or a
    tokenizer.json-style file (hub ids and other non-paths are checked when loaded)."""
    target = Path(path).expanduser()
    if not target.exists():
        raise FileNotFoundError(f"tokenizer {path!r} does not exist; pass a tokenizer folder or tokenizer.json")
    if target.is_file() and target.suffix != ".json":
        raise ValueError(f"tokenizer {path!r} is a {target.suffix or 'suffix-less'} file; pass a tokenizer folder "
                         "or a tokenizer.json")
    if target.is_dir() and not any((target / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {path}; pass a tokenizer "
                                "folder or a tokenizer.json")


def load_tokenizer(folder: Path | None, explicit: str | None):
    """An HF tokenizer from `explicit` (folder or tokenizer.json) or the checkpoint folder."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    target = Path(explicit).expanduser() if explicit else folder
    if target is None:
        raise ValueError("no tokenizer: the checkpoint has none; pass one with --tokenizer PATH")
    if target.is_file() and target.suffix == ".json":
        return PreTrainedTokenizerFast(tokenizer_file=str(target))
    if not target.exists():
        raise FileNotFoundError(f"tokenizer path {target} does not exist")
    has_tokenizer = any((target / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
    if not has_tokenizer:
        raise FileNotFoundError(
            f"no tokenizer files (tokenizer.json, tokenizer.model, tokenizer_config.json) in {target}; "
            "pass one with --tokenizer PATH"
        )
    if _names_fast_tokenizer(target):
        return PreTrainedTokenizerFast.from_pretrained(str(target))
    return AutoTokenizer.from_pretrained(str(target))


def _names_fast_tokenizer(folder: Path) -> bool:
    """True for a folder with a tokenizer.json whose tokenizer_config.json names PreTrainedTokenizerFast (the bundled
    models, our trained tokenizers). That class is loaded directly: AutoTokenizer would first read config.json, and a
    model_type transformers does not know (gdn2, fla's) makes it log a misleading "model of type" warning."""
    config = folder / "tokenizer_config.json"
    if not (folder / "tokenizer.json").is_file() or not config.is_file():
        return False
    return json.loads(config.read_text()).get("tokenizer_class") == "PreTrainedTokenizerFast"
