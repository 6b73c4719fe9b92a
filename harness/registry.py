"""Model families: one decorator, one dict, one lookup (built-ins imported lazily, by module path).

    @register_family("kda")
    class KDAFamily(ModelFamily): ...

A model spec is "family=path_or_hub_id", a bare checkpoint path whose config.json names its family, or the name of
a bundled model (harness/bundled.py), optionally followed by options: ",tokenizer=PATH" (for checkpoints that ship
no tokenizer, e.g. state-spaces Mamba folders) and ",bos=true|false" (whether inputs start with BOS; default: the
tokenizer's own rule, as lm-eval's HFLM does). Example: "mamba2=/ckpt/mamba2-1.3b,tokenizer=/ckpt/gpt-neox-20b".
"""
from __future__ import annotations

import difflib
import importlib
import json
import os
from pathlib import Path
from typing import Callable, ClassVar

import torch

from harness.model import EvalModel

# Built-in families, imported only when first asked for (so importing the registry imports no heavy backend).
BUILTIN_FAMILIES: dict[str, str] = {
    "gdn2": "baselines.gdn2",
    "gated_deltanet": "baselines.gated_deltanet",
    "kda": "baselines.kda",
    "mamba2": "baselines.mamba2",
    "mamba3": "baselines.mamba3",
    "transformer": "baselines.transformer",
}
_FAMILIES: dict[str, "ModelFamily"] = {}
_ALIASES: dict[str, str] = {}


class UnknownNameError(KeyError):
    """An unknown family, model or task name; the message lists the known ones and the nearest."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


def unknown_name(kind: str, name: str, known: list[str]) -> UnknownNameError:
    nearest = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean {nearest[0]!r}?" if nearest else ""
    return UnknownNameError(f"unknown {kind} {name!r}.{hint} Known: {', '.join(sorted(known))}")


class ModelFamily:
    """One family of models. Subclasses set the class attributes and implement load().

    name: registry key; model_types / architectures: config.json values this family claims (for bare paths);
    loads_from: where checkpoints come from, in words (for `list models`).
    """

    name: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    architectures: ClassVar[tuple[str, ...]] = ()
    loads_from: ClassVar[str] = ""

    def claims(self, config: dict) -> bool:
        """Whether a checkpoint's config.json belongs to this family."""
        if config.get("model_type") in self.model_types:
            return True
        return any(a in self.architectures for a in config.get("architectures") or [])

    def backend(self, device: torch.device) -> str:
        """Which implementation runs on `device`, in words."""
        raise NotImplementedError

    def state_floats_per_layer(self, config: dict) -> int:
        raise NotImplementedError

    def load(self, source: str, device: torch.device, dtype: torch.dtype, tokenizer: str | None) -> EvalModel:
        raise NotImplementedError


def register_family(name: str, *aliases: str) -> Callable[[type[ModelFamily]], type[ModelFamily]]:
    """Class decorator: register a ModelFamily subclass under `name` (and aliases)."""

    def wrap(cls: type[ModelFamily]) -> type[ModelFamily]:
        if name in _FAMILIES and type(_FAMILIES[name]) is not cls:
            raise ValueError(f"model family {name!r} is already registered by {type(_FAMILIES[name]).__module__}")
        cls.name = name
        _FAMILIES[name] = cls()
        for alias in aliases:
            _ALIASES[alias] = name
        return cls

    return wrap


def family_names() -> list[str]:
    return sorted(set(BUILTIN_FAMILIES) | set(_FAMILIES))


def get_family(name: str) -> ModelFamily:
    name = _ALIASES.get(name, name)
    if name not in _FAMILIES and name in BUILTIN_FAMILIES:
        importlib.import_module(BUILTIN_FAMILIES[name])
    if name not in _FAMILIES:  # maybe an alias of a built-in not imported yet: aliases live in the modules
        for module in BUILTIN_FAMILIES.values():
            try:
                importlib.import_module(module)
            except Exception:  # a broken module must not hide the others; it fails when asked for by name
                pass
        name = _ALIASES.get(name, name)
    if name not in _FAMILIES:
        raise unknown_name("model family", name, family_names() + list(_ALIASES))
    return _FAMILIES[name]


def all_families() -> list[ModelFamily]:
    return [get_family(name) for name in family_names()]


# ------------------------------------------------------------------------------------------ devices and dtypes
def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> cuda if available else cpu; refuses a device this machine lacks."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unsupported device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} requested but only {torch.cuda.device_count()} GPU(s) are visible")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return dev


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' -> bf16 on GPUs that support it, fp32 on CPU; refuses dtypes the device cannot run."""
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    elif dtype in DTYPES:
        resolved = DTYPES[dtype]
    else:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(DTYPES)}")
    if resolved == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("bfloat16 is not supported by this GPU; use --dtype float16 or float32")
    return resolved


# ------------------------------------------------------------------------------------------ specs
def read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: a checkpoint folder needs a config.json")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON ({err}); the file is corrupt or truncated") from err


SPEC_OPTIONS = ("tokenizer", "bos")


def split_spec(spec: str) -> tuple[str, dict[str, str]]:
    """"base,tokenizer=T,bos=false" -> ("base", {"tokenizer": "T", "bos": "false"}). Only the known option names
    after the last commas are split off, so a path with commas in it stays whole."""
    base, options = spec, {}
    while True:
        head, sep, tail = base.rpartition(",")
        key, eq, value = tail.partition("=")
        if not (sep and eq and key.strip() in SPEC_OPTIONS):
            break
        if not value.strip():
            raise ValueError(f"model spec {spec!r}: option {key.strip()!r} has no value")
        options.setdefault(key.strip(), value.strip())
        base = head
    if "bos" in options and options["bos"].lower() not in ("true", "false"):
        raise ValueError(f"model spec {spec!r}: bos={options['bos']!r}; use bos=true or bos=false")
    return base, options


def _looks_like_path(text: str) -> bool:
    return os.sep in text or text.startswith((".", "~"))


def parse_spec(spec: str) -> tuple[str, str]:
    """-> (family, source). "family=source" | bare local path (family from its config.json) | bundled name.
    Spec options (",tokenizer=..."), if any, must be split off first (split_spec)."""
    from harness import bundled

    if "=" in spec:
        family, source = spec.split("=", 1)
        get_family(family)  # fail early on a wrong family name
        if not source:
            raise ValueError(f"model spec {spec!r} names no checkpoint: use {family}=PATH_OR_HUB_ID")
        return family, source
    if spec in bundled.BUNDLED:
        entry = bundled.BUNDLED[spec]
        return entry.family, str(entry.folder) if entry.folder is not None else spec
    path = Path(spec).expanduser()
    if path.is_dir():
        config = read_config(path)
        for family in all_families():
            if family.claims(config):
                return family.name, spec
        raise ValueError(
            f"{path / 'config.json'} (model_type={config.get('model_type')!r}, "
            f"architectures={config.get('architectures')}) matches no family; pass 'family=PATH' with one of "
            f"{', '.join(family_names())}"
        )
    if os.path.exists(spec):
        raise ValueError(f"{spec!r} is a file; pass the checkpoint folder that holds config.json")
    if _looks_like_path(spec):
        raise FileNotFoundError(f"model path {spec!r} does not exist; pass an existing checkpoint folder, "
                                "family=PATH, or a bundled name (`run_eval.py list models`)")
    raise unknown_name("model", spec, list(bundled.BUNDLED) + [f"{f}=PATH" for f in family_names()])


def check_spec(spec: str, tokenizer: str | None = None) -> None:
    """Everything about a spec that can be checked without loading it: options, family or bundled name, that a
    local path exists (hub ids are checked when loaded), that a named tokenizer path exists."""
    from harness import bundled

    base, options = split_spec(spec)
    family, source = parse_spec(base)
    is_hub_id = source.count("/") == 1 and not source.startswith((".", "/", "~"))
    if "=" in base and not (Path(source).expanduser().exists() or is_hub_id or source in bundled.BUNDLED):
        raise FileNotFoundError(f"model spec {spec!r}: checkpoint folder {source!r} does not exist (and it is not "
                                "a hub id 'org/name')")
    tok = options.get("tokenizer", tokenizer)
    if tok and (_looks_like_path(tok) or Path(tok).expanduser().exists()):
        from harness.checkpoint import check_tokenizer_path

        check_tokenizer_path(tok)


def load_model(spec: str, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
               tokenizer: str | None = None, allow_longer_context: bool = False, name: str | None = None) -> EvalModel:
    """Load a model spec into an EvalModel on `device` in `dtype`. tokenizer: an explicit tokenizer folder/file,
    used when the spec names none (",tokenizer=..." in the spec wins)."""
    from harness import bundled

    base, options = split_spec(spec)
    family_name, source = parse_spec(base)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    model = get_family(family_name).load(source, dev, dt, options.get("tokenizer", tokenizer))
    model.allow_longer_context = allow_longer_context
    if base in bundled.BUNDLED and bundled.BUNDLED[base].folder is not None:
        model.name = base
        model.info["bundled"] = bundled.BUNDLED[base].description
    if "bos" in options:
        model.add_bos = options["bos"].lower() == "true"
    if name:
        model.name = name
    return model
