"""Task registry: names and aliases -> task objects, built lazily (importing ``tasks`` imports no task module).

    from tasks import get_task, list_tasks
    task = get_task("s_niah_1")              # the paper's name works too; case and "-" vs "_" do not matter
    samples = task.build_samples(tokenizer, length=4096, num_samples=500, seed=42)
    task.score(prediction, samples[0])       # 0..100

Generative tasks (kind "generate": the RULER rows) expose build_samples / score / aggregate / postprocess and
max_new_tokens. The token-level MQAR task (kind "token") exposes build_samples / score on token ids (tasks.mqar).
Add a family with ``register_task("name", "alias", loader="package.module:attribute")`` or the decorator form.
"""
from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable

_RULER = "tasks.ruler.task:RULER_TASKS"
# canonical name -> (loader "module:attribute[.key]", aliases)
_REGISTRY: dict[str, tuple[str | Callable[[], Any], tuple[str, ...]]] = {
    "niah_single_1": (_RULER, ("s_niah_1",)),
    "niah_single_2": (_RULER, ("s_niah_2",)),
    "niah_single_3": (_RULER, ("s_niah_3",)),
    "niah_multikey_1": (_RULER, ("mk_niah_1",)),
    "niah_multikey_2": (_RULER, ()),
    "niah_multikey_3": (_RULER, ()),
    "niah_multivalue": (_RULER, ()),
    "niah_multiquery": (_RULER, ()),
    "niah_mqar_nl": (_RULER, ("mqar_nl",)),
    "vt": (_RULER, ("variable_tracking",)),
    "cwe": (_RULER, ("common_words_extraction",)),
    "fwe": (_RULER, ("freq_words_extraction",)),
    "mqar": ("tasks.mqar:MQAR_TASK", ("zoology_mqar",)),
}
_CACHE: dict[str, Any] = {}


class UnknownTaskError(KeyError):
    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def _alias_table() -> dict[str, str]:
    table = {}
    for canonical, (_, aliases) in _REGISTRY.items():
        table[canonical] = canonical
        for alias in aliases:
            table[_normalise(alias)] = canonical
    return table


def register_task(name: str, *aliases: str, loader: str | Callable[[], Any] | None = None):
    """Register a task under ``name`` (and aliases). ``loader`` is "module:attribute" (lazy) or a callable
    returning the task; without it, use as a decorator on a zero-argument factory."""

    def add(factory):
        key = _normalise(name)
        if key in _alias_table():
            raise ValueError(f"task name {name!r} is already registered")
        _REGISTRY[key] = (factory, tuple(aliases))
        return factory

    return add(loader) if loader is not None else add


def list_tasks() -> dict[str, list[str]]:
    """Canonical task names -> their aliases."""
    return {name: list(aliases) for name, (_, aliases) in _REGISTRY.items()}


def resolve_name(name: str) -> str:
    """Canonical name for ``name`` or an alias; UnknownTaskError with the known names and the nearest match."""
    table = _alias_table()
    key = _normalise(name)
    if key in table:
        return table[key]
    close = difflib.get_close_matches(key, list(table), n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    known = ", ".join(f"{n} ({', '.join(a)})" if a else n for n, a in list_tasks().items())
    raise UnknownTaskError(f"unknown task {name!r}.{hint} Known tasks (aliases): {known}")


def get_task(name: str) -> Any:
    """The task object registered under ``name`` (an alias or the canonical name)."""
    canonical = resolve_name(name)
    if canonical not in _CACHE:
        loader, _ = _REGISTRY[canonical]
        if callable(loader):
            task = loader()
        else:
            module_name, attr = loader.split(":")
            obj = getattr(importlib.import_module(module_name), attr)
            task = obj[canonical] if isinstance(obj, dict) else obj
        _CACHE[canonical] = task
    return _CACHE[canonical]


__all__ = ["get_task", "list_tasks", "resolve_name", "register_task", "UnknownTaskError"]
