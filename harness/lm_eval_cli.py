"""lm-eval's own command line with this project's models registered (the plain `lm_eval` script cannot see them).

    python -m harness.lm_eval_cli --model harness --model_args spec=gdn2-tiny-random,device=cpu --tasks piqa
    python -m harness.lm_eval_cli --model harness --model_args spec=gdn2-tiny-random \
        --tasks piqa_olmoeval,arc_easy_olmoeval --include_path tasks/lm_eval_yaml --limit 20

Everything is lm-eval's CLI (`run`, `ls`, `validate`, every flag). One addition: `--include_path tasks/lm_eval_yaml`
(the folder of offline YAML templates) is replaced by the folder those templates render to on this machine (their
include: and data paths filled in; harness.lm_eval_tasks.offline_include_path), and `--offline` is shorthand for
that include path plus HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "tasks" / "lm_eval_yaml"


def rewrite_argv(argv: list[str]) -> list[str]:
    """Substitute the rendered offline folder for the template folder; expand --offline."""
    from harness.lm_eval_tasks import offline_include_path

    out: list[str] = []
    rendered = False
    offline = "--offline" in argv
    argv = [a for a in argv if a != "--offline"]
    i = 0
    while i < len(argv):
        arg = argv[i]
        value = None
        if arg == "--include_path" and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
        elif arg.startswith("--include_path="):
            value, i = arg.split("=", 1)[1], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        if Path(value).resolve() == TEMPLATE_DIR:
            value = str(offline_include_path())
            rendered = True
        out += ["--include_path", value]
    if offline and "--include_path" in out and not rendered:
        raise SystemExit("--offline adds the rendered tasks/lm_eval_yaml folder as --include_path, and lm-eval honours "
                         "only one: put your own YAMLs there or drop --offline")
    if offline:
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        os.environ["HF_HUB_OFFLINE"] = "1"
        if not rendered:
            out += ["--include_path", str(offline_include_path())]
    return out


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    import harness.lm_eval_plugin  # noqa: F401  (registers the "harness" model with lm-eval)

    sys.argv = [sys.argv[0]] + rewrite_argv(sys.argv[1:])
    cli_evaluate()


if __name__ == "__main__":
    main()
