"""Is `lm_eval:<name>` a task lm-eval knows? Checked before any model loads, with a "did you mean".

    check_lm_eval_task("hellaswag")     # returns quietly
    check_lm_eval_task("hellaswg")      # UnknownNameError: unknown lm-eval task 'hellaswg'. Did you mean 'hellaswag'?

Two tiers, so that a valid name costs well under a second: a scan of the top-level `task:`, `group:` and `tag:`
keys of lm-eval's task YAMLs (and of the offline copies, tasks/lm_eval_yaml) finds most names; a name the scan
misses is looked up in lm-eval's own index (TaskManager, ~15 s to build), whose names are cached on disk per lm-eval
version and include path (GDN2_HARNESS_CACHE, else ~/.cache/gdn2-harness).
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from functools import lru_cache
from pathlib import Path

from harness.registry import UnknownNameError

TOP_KEY = re.compile(r"^(task|group|tag):[ \t]*['\"]?([^'\"#\s\[|>]+)", re.MULTILINE)
TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "tasks" / "lm_eval_yaml"


def _lm_eval_tasks_root() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).resolve().parent / "tasks"


@lru_cache(maxsize=1)
def scanned_names() -> frozenset[str]:
    """Task, group and tag names written as plain top-level values in lm-eval's YAMLs and the offline copies."""
    names: set[str] = set()
    for root in (_lm_eval_tasks_root(), TEMPLATE_DIR):
        for dirpath, _, files in os.walk(root):
            for name in files:
                if name.endswith((".yaml", ".yml")):
                    text = Path(dirpath, name).read_text(encoding="utf-8", errors="replace")
                    names.update(m.group(2) for m in TOP_KEY.finditer(text))
    return frozenset(names)


def _cache_file(include_path: str | None) -> Path:
    import lm_eval

    base = Path(os.environ.get("GDN2_HARNESS_CACHE") or Path.home() / ".cache" / "gdn2-harness")
    key = hashlib.sha1(f"{lm_eval.__version__}|{_lm_eval_tasks_root()}|{include_path}".encode()).hexdigest()[:12]
    return base / f"lm_eval_task_names-{key}.json"


def indexed_names(include_path: str | None) -> frozenset[str]:
    """Every name lm-eval's TaskManager knows (tasks, groups, tags), cached on disk after the first build."""
    cache = _cache_file(include_path)
    try:
        return frozenset(json.loads(cache.read_text()))
    except (OSError, ValueError):
        pass
    from harness.lm_eval_tasks import task_manager

    names = sorted(task_manager(include_path).all_tasks)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(names))
        tmp.replace(cache)
    except OSError:            # a read-only home: the check still works, only slower next time
        pass
    return frozenset(names)


def check_lm_eval_task(name: str, offline: bool = True, catalog: tuple[str, ...] = ()) -> None:
    """Raise UnknownNameError (with the nearest name) unless lm-eval knows `name`. catalog: the paper-table keys
    (lm_eval:<key>) that are always valid; offline: also look in the offline copies' include path."""
    if name in catalog or name in scanned_names():
        return
    include = None
    if offline:
        from harness.lm_eval_tasks import offline_include_path

        include = str(offline_include_path())
    known = indexed_names(include)
    if name in known:
        return
    nearest = difflib.get_close_matches(name, sorted(set(catalog) | known), n=3, cutoff=0.75)
    hint = f" Did you mean {', '.join(repr(f'lm_eval:{n}') for n in nearest)}?" if nearest else ""
    raise UnknownNameError(
        f"unknown lm-eval task 'lm_eval:{name}'.{hint} The paper's columns: "
        f"{', '.join(f'lm_eval:{k}' for k in catalog)}; any task of `lm-eval ls tasks` also works as lm_eval:NAME.")
