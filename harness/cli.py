"""The command line: `python run_eval.py <command> ...` (run_eval.py only calls main()).

    python run_eval.py                                   # the quick suite on the bundled model, then its report
    python run_eval.py run --suite paper-table3 --models gdn2=/ckpt/gdn2-1.3b --output runs/t3
    python run_eval.py run --models gdn2-tiny-random --tasks niah_single_1 mqar --lengths 1k 2k --samples 8
    python run_eval.py report runs/t3                    # tables (md, tex, csv), plots, exports
    python run_eval.py list models|tasks|suites
    python run_eval.py generate --task niah_single_1 --length 2k --samples 5 --tokenizer offline:bpe
    python run_eval.py bench kernels|ruler|models [-- args for the benchmark script]
    python run_eval.py doctor
    torchrun --nproc-per-node 4 run_eval.py run ...      # samples of every cell sharded across the ranks
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = {"kernels": "benchmarks/bench_kernels.py", "ruler": "benchmarks/bench_ruler_generate.py",
              "models": "benchmarks/bench_models.py"}
DEFAULT_OUTPUT = Path("runs") / "default"

EPILOG = """\
Start here:
  python run_eval.py                        run the quick suite (bundled random-init model, < 1 min on CPU)
  python run_eval.py list suites            named plans: quick, paper-table2, paper-table3, paper-table4
  python run_eval.py run --suite paper-table3 --models gdn2=PATH --output runs/t3
  python run_eval.py report runs/t3         tables in the paper's layout, plots, CSV/Parquet/JSON exports

A rerun of the same command resumes: stored samples are skipped (results live in <output>/results.sqlite).
Command help: python run_eval.py <command> --help
"""


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Raw descriptions (examples keep their lines); '(default: X)' only where a default says something."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, [], argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_eval.py", formatter_class=Formatter, epilog=EPILOG,
        description="Evaluate linear-attention LMs (GDN-2 and baselines) on RULER, MQAR, perplexity and lm-eval "
                    "suites across context lengths; store every sample; report in the GDN-2 paper's layout.")
    sub = parser.add_subparsers(dest="command", metavar="command")

    run = sub.add_parser("run", formatter_class=Formatter, help="run a sweep: models x tasks x context lengths",
                         description=textwrap.dedent("""\
        Run a sweep into an output folder. Give a named suite (--suite), or tasks and lengths (--tasks, --lengths),
        or neither (the quick suite). Every scored sample is committed to <output>/results.sqlite at once; a rerun
        skips what is stored, so a killed sweep resumes where it stopped. Failures (out of memory after retrying
        with smaller segments, NaN/Inf logits, exceptions) are stored as rows and the sweep goes on.

        examples:
          run_eval.py run --suite paper-table3 --models gdn2=/ckpt/gdn2 kda=/ckpt/kda --output runs/t3
          run_eval.py run --models gdn2-tiny-random --tasks s_niah_1 mqar --lengths 1k 2k 4k --samples 20
          run_eval.py run --suite paper-table2 --models gdn2=/ckpt/gdn2 --limit 100 --device cuda
          torchrun --nproc-per-node 8 run_eval.py run --suite paper-table3 --models gdn2=/ckpt/gdn2"""))
    plan = run.add_argument_group("what to run")
    plan.add_argument("--suite", help="named suite (`list suites`) or a path to a suite .yaml; default: quick "
                                      "when no --tasks are given")
    plan.add_argument("--models", nargs="+", metavar="SPEC",
                      help="model specs: a bundled name (gdn2-tiny-random), family=PATH (gdn2=/ckpt/x) or a "
                           "checkpoint folder; default: the suite's models")
    plan.add_argument("--tasks", nargs="+", metavar="TASK",
                      help="task names (`list tasks`); replaces the suite's tasks")
    plan.add_argument("--lengths", nargs="+", metavar="L", help="context lengths (1024, 4k, ...) for length-axis "
                                                                 "tasks; default: the suite's, else 1k 2k")
    plan.add_argument("--samples", type=int, help="samples per cell (RULER/MQAR/ppl; lm-eval: documents); "
                                                  "default: the suite's, else 100 (lm-eval: all documents)")
    plan.add_argument("--seed", type=int, help="seed of the sample generators (default: the suite's, else 0)")
    plan.add_argument("--limit", type=int, help="cap on samples per cell, lm-eval --limit style (quick looks)")
    plan.add_argument("--paper-row", action="append", default=[], metavar="MODEL=SETTING:NAME",
                      help='map a model to a row of the paper for side-by-side deltas, e.g. '
                           '"gdn2-1.3b=recurrent:Gated DeltaNet-2" (repeatable)')
    hw = run.add_argument_group("how to run")
    hw.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    hw.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    hw.add_argument("--batch-size", type=int, default=1,
                    help="samples evaluated together (each prompt prefilled alone, then decoded or scored in "
                         "batches; no padding enters a recurrent state); results equal batch 1's")
    hw.add_argument("--online", action="store_true",
                    help="lm-eval tasks: use lm-eval's own datasets from the HF hub instead of the offline copies")
    hw.add_argument("--allow-longer-context", action="store_true",
                    help="let models with a hard context limit (transformers) run past it instead of failing")
    hw.add_argument("--haystack-file", metavar="PATH",
                    help="essay haystack text for RULER tasks (.txt, .txt.gz, or RULER's PaulGrahamEssays.json); "
                         "default: the public-domain text shipped in tasks/data (not comparable to published numbers)")
    out = run.add_argument_group("output")
    out.add_argument("--output", "-o", help=f"results folder (default: {DEFAULT_OUTPUT} for the quick suite, "
                                            "runs/<suite> for a suite, runs/custom otherwise)")
    out.add_argument("--retry-failed", action="store_true", help="retry samples stored as failures")
    out.add_argument("--no-report", action="store_true", help="skip the report (tables, plots, exports) at the end")
    out.add_argument("--no-progress", action="store_true", help="no progress bars")

    rep = sub.add_parser("report", formatter_class=Formatter, help="tables, plots and exports of a results folder",
                         description="Tables in the paper's layout (Markdown, LaTeX, CSV; the paper's numbers and "
                                     "deltas for models mapped to a paper row), plots (PNG, SVG) and exports "
                                     "(CSV/Parquet per cell, lm-eval-style results JSON) of a results folder.")
    rep.add_argument("output", nargs="?", default=str(DEFAULT_OUTPUT), help="a run's --output folder")
    rep.add_argument("--out", help="where to write the report (default: <output>/report)")
    rep.add_argument("--format", choices=["md", "latex", "csv"], default="md", help="what to print")
    rep.add_argument("--paper-row", action="append", default=[], metavar="MODEL=SETTING:NAME",
                     help="(re)map a model to a paper row before reporting; stored in the results folder")
    rep.add_argument("--no-plots", action="store_true")
    rep.add_argument("--no-exports", action="store_true")

    lst = sub.add_parser("list", formatter_class=Formatter, help="list models, tasks or suites")
    lst.add_argument("what", choices=["models", "tasks", "suites"])
    lst.add_argument("--device", default="cpu", help="device whose backends `list models` describes")

    gen = sub.add_parser("generate", formatter_class=Formatter, help="write a task's samples as JSON lines",
                         description="Generate a task's samples (RULER records, MQAR sequences) without a model.")
    try:
        from tasks.cli import add_generate_arguments

        add_generate_arguments(gen)
        gen.set_defaults(generate_ready=True)
    except ImportError as err:
        gen.set_defaults(generate_ready=False, generate_error=str(err))

    bench = sub.add_parser("bench", formatter_class=Formatter, help="run a benchmark script (kernels, ruler)",
                           description="Runs benchmarks/bench_kernels.py (kernels) or benchmarks/"
                                       "bench_ruler_generate.py (ruler); arguments after the name go to the "
                                       "script (see `run_eval.py bench kernels -- --help`).")
    bench.add_argument("which", choices=sorted(BENCHMARKS))
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark script")

    doc = sub.add_parser("doctor", formatter_class=Formatter,
                         help="check that each family's upstream kernels and our reference path agree "
                              "(GPU; `doctor --help` for options)")
    try:
        from harness.doctor import add_doctor_arguments

        add_doctor_arguments(doc)
    except ImportError as err:  # keep the rest of the CLI usable; the subcommand then says why
        doc.set_defaults(doctor_error=str(err))
    return parser


# ------------------------------------------------------------------------------------------------ run
def _parse_paper_rows(items: list[str]) -> dict[str, str]:
    rows = {}
    for item in items:
        model, sep, row = item.partition("=")
        setting, sep2, name = row.partition(":")
        if not sep or not sep2 or setting not in ("recurrent", "hybrid") or not name:
            raise SystemExit(f"error: --paper-row {item!r}: expected MODEL=recurrent:NAME or MODEL=hybrid:NAME, "
                             'e.g. "gdn2-1.3b=recurrent:Gated DeltaNet-2"')
        rows[model] = f"{setting}:{name}"
    return rows


def make_plan(args: argparse.Namespace):
    from harness.runner import load_suite, parse_length, plan_from_suite

    if args.tasks:
        suite = load_suite(args.suite) if args.suite else {"name": "custom", "models": ["gdn2-tiny-random"]}
        lengths = args.lengths or ["1k", "2k"]
        suite = dict(suite, cells=[{"task": t, "lengths": lengths} for t in args.tasks])
        name = suite.get("name", "custom") if args.suite else "custom"
    else:
        suite = load_suite(args.suite or "quick")
        name = suite["name"]
    plan = plan_from_suite(suite, models=args.models, samples=args.samples, seed=args.seed, limit=args.limit,
                           lengths=None if args.tasks else args.lengths, device=args.device, dtype=args.dtype,
                           batch_size=args.batch_size, retry_failed=args.retry_failed,
                           allow_longer_context=args.allow_longer_context, offline=not args.online,
                           paper_rows=_parse_paper_rows(args.paper_row))
    plan.name = name
    if args.tasks:
        from harness.task_adapters import resolve_task

        for cell in plan.cells:   # tasks without a length axis get one cell, not one per length
            if cell.task.startswith("lm_eval:"):
                cell.lengths = [None]
            elif not getattr(resolve_task(cell.task, cell.options, offline=plan.offline), "uses_length", True):
                cell.lengths = [None]
        for cell in plan.cells:
            cell.lengths = [parse_length(x) for x in cell.lengths]
    if args.haystack_file:
        set_essay_haystack(plan, args.haystack_file)
    if not plan.models:
        raise SystemExit("error: no models: pass --models SPEC ... (see `run_eval.py list models`)")
    if plan.batch_size < 1:
        raise SystemExit(f"error: --batch-size must be a positive integer; got {plan.batch_size}")
    return plan


def set_essay_haystack(plan, haystack_file: str) -> None:
    """Point every RULER cell with an essay haystack at haystack_file (it becomes part of the cell's identity)."""
    from harness.task_adapters import RulerEvalTask, resolve_task

    if not Path(haystack_file).is_file():
        raise FileNotFoundError(f"--haystack-file {haystack_file}: no such file")
    for cell in plan.cells:
        task = resolve_task(cell.task, cell.options, offline=plan.offline)
        if isinstance(task, RulerEvalTask) and task.ruler.haystack_type == "essay":
            cell.options = dict(cell.options, haystack_file=str(Path(haystack_file).resolve()))


def default_output_for(args: argparse.Namespace, plan) -> Path:
    if args.output:
        return Path(args.output)
    if not args.suite and not args.tasks:
        return DEFAULT_OUTPUT
    return Path("runs") / (plan.name if args.suite else "custom")


def cmd_run(args: argparse.Namespace, argv: list[str]) -> int:
    from harness.distributed import init_from_env
    from harness.registry import UnknownNameError
    from harness.runner import SweepRunner
    from harness.store import CellIdentityError, ResultsStore

    try:
        plan = make_plan(args)
    except (UnknownNameError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    output = default_output_for(args, plan)
    dist = init_from_env(plan.device)
    if dist.is_main:
        cells = plan.expand()
        print(f"plan '{plan.name}': {len(plan.models)} model(s) x {len(cells)} cell(s), seed {plan.seed}, "
              f"output {output}" + (f", {dist.world_size} ranks" if dist.world_size > 1 else ""), file=sys.stderr)
    start = time.time()
    try:
        if dist.is_main:
            ResultsStore(output).close()     # create the schema once before the other ranks open it
        dist.barrier()
        with ResultsStore(output) as store:
            summary = SweepRunner(plan, store, dist, progress=not args.no_progress, argv=argv).run()
    except CellIdentityError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted; stored samples are kept in {output / 'results.sqlite'}; rerun the same command to "
              "resume", file=sys.stderr)
        return 130
    dist.barrier()
    if dist.is_main:
        ok = sum(c.ok for c in summary.cells)
        skipped = sum(c.skipped for c in summary.cells)
        failed = sum(c.failed for c in summary.cells)
        bad_cells = [c for c in summary.cells if c.status == "failed"]
        print(f"\ndone in {time.time() - start:.1f}s: {ok} sample(s) scored, {skipped} already stored, "
              f"{failed} failed sample(s), {len(bad_cells)} failed cell(s)")
        for c in bad_cells:
            print(f"  FAILED {c.model} | {c.task}" + (f" @ {c.length}" if c.length else "") + f": {c.error}")
        if not args.no_report:
            try:
                _print_report(output, plots=True, exports=True)
            except ImportError as err:   # pandas / matplotlib come with the eval extra
                print(f"(no report: {err}; install the eval extra: pip install -e '.[eval]', then run "
                      f"`python run_eval.py report {output}`)")
        print(f"\nresults: {output / 'results.sqlite'} (rerun the same command to resume or extend)")
    dist.close()
    return 1 if summary.failed_cells and all(c.status == "failed" for c in summary.cells) else 0


def _print_report(output: Path, plots: bool, exports: bool, fmt: str = "md", out: str | None = None) -> dict:
    from harness.report import write_report

    report = write_report(output, out=out, plots=plots, exports=exports)
    print()
    for table in report["tables"].values():
        print({"md": table.markdown, "latex": table.latex, "csv": table.csv}[fmt]())
    tables = report["out"]
    plots_dir = tables / "plots"
    print(f"tables: {tables}/*.md|.tex|.csv" + (f"; plots: {plots_dir}/*.png|.svg" if plots_dir.is_dir() else "")
          + (f"; exports: {report['out'].parent / 'exports'}" if exports else ""))
    return report


def cmd_report(args: argparse.Namespace) -> int:
    from harness.store import DB_NAME, ResultsStore

    output = Path(args.output)
    if not (output / DB_NAME).is_file():
        print(f"error: no results store at {output / DB_NAME}; pass the --output folder of a run "
              f"(e.g. {DEFAULT_OUTPUT} after `python run_eval.py`)", file=sys.stderr)
        return 2
    if args.paper_row:
        rows = _parse_paper_rows(args.paper_row)
        with ResultsStore(output) as store, store.transaction() as c:
            for model, row in rows.items():
                setting, _, name = row.partition(":")
                if c.execute("UPDATE models SET paper_setting = ?, paper_model = ? WHERE model = ?",
                             (setting, name, model)).rowcount == 0:
                    print(f"warning: --paper-row: no model {model!r} in {output}", file=sys.stderr)
    _print_report(output, plots=not args.no_plots, exports=not args.no_exports, fmt=args.format, out=args.out)
    return 0


# ------------------------------------------------------------------------------------------------ list
def _print_rows(rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(rows[0])
    widths = {k: min(max(len(k), *(len(str(r.get(k, ""))) for r in rows)), 70) for k in keys}
    print("  ".join(k.ljust(widths[k]) for k in keys))
    for r in rows:
        print("  ".join(str(r.get(k, ""))[:widths[k]].ljust(widths[k]) for k in keys))


def cmd_list(args: argparse.Namespace) -> int:
    if args.what == "suites":
        from harness.runner import load_suite, suite_names

        rows = []
        for name in suite_names():
            suite = load_suite(name)
            cells = sum(len(c.get("lengths") or [None]) for c in suite.get("cells") or [])
            rows.append({"suite": name, "cells": cells, "samples": suite.get("samples", ""),
                         "description": suite.get("description", "")})
        _print_rows(rows)
        return 0
    if args.what == "tasks":
        from harness.task_adapters import describe_tasks

        _print_rows(describe_tasks())
        print("\nAlso: any EvalTask as module.path:attribute (see harness/eval_task.py).")
        return 0
    from harness import bundled

    print("bundled models (use the name as a spec):")
    for name, entry in bundled.BUNDLED.items():
        print(f"  {name}  [{entry.family}]  {entry.description}")
    try:
        from harness.describe import print_families
    except ImportError:
        from harness.registry import family_names

        print("\nfamilies (spec: family=PATH): " + ", ".join(family_names()))
        print("(harness.describe is not available in this checkout; no backend details)")
        return 0
    print()
    return int(print_families(args.device) or 0)


# ------------------------------------------------------------------------------------------------ others
def cmd_generate(args: argparse.Namespace) -> int:
    if not getattr(args, "generate_ready", False):
        print(f"error: `generate` needs tasks.cli (add_generate_arguments/run_generate), which is not importable "
              f"here: {getattr(args, 'generate_error', '')}", file=sys.stderr)
        return 2
    from tasks.cli import run_generate

    return int(run_generate(args) or 0)


def cmd_bench(args: argparse.Namespace) -> int:
    script = REPO_ROOT / BENCHMARKS[args.which]
    if not script.is_file():
        print(f"error: {script} is not in this checkout", file=sys.stderr)
        return 2
    extra = [a for a in args.args if a != "--"] if args.args[:1] == ["--"] else list(args.args)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.call([sys.executable, str(script), *extra], cwd=REPO_ROOT, env=env)


def cmd_doctor(args: argparse.Namespace) -> int:
    if getattr(args, "doctor_error", None):
        print(f"error: `doctor` needs harness.doctor, which is not importable here ({args.doctor_error})",
              file=sys.stderr)
        return 2
    from harness.doctor import run_doctor

    return run_doctor(args.family, args.device, args.seq_len, args.tolerance, full_autotune=args.full_autotune)[1]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:   # no arguments: the quick suite into runs/default, then its report
        print("No command given: running the quick suite (bundled gdn2-tiny-random, random-init: its scores are "
              "chance-level by construction; this checks that everything runs).\n"
              "See `python run_eval.py --help` for the commands.\n", file=sys.stderr)
        argv = ["run"]
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    handlers = {"run": lambda: cmd_run(args, argv), "report": lambda: cmd_report(args), "list": lambda: cmd_list(args),
                "generate": lambda: cmd_generate(args), "bench": lambda: cmd_bench(args),
                "doctor": lambda: cmd_doctor(args)}
    return handlers[args.command]()
