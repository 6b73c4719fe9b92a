"""The command line: `python run_eval.py <command> ...` (run_eval.py only calls main()).

    python run_eval.py                                   # the quick suite on the bundled models, then its report
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
import math
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
  python run_eval.py                        run the quick suite (the bundled small models, minutes on a CPU)
  python run_eval.py list suites            named plans: quick, paper-table2, paper-table3, paper-table4
  python run_eval.py run --suite paper-table3 --models gdn2=PATH --output runs/t3
  python run_eval.py report runs/t3         tables in the paper's layout, plots, CSV/Parquet/JSON exports

A rerun of the same command resumes: stored samples are skipped (results live in <output>/results.sqlite).
Command help: python run_eval.py <command> --help
"""


class ListArgument(argparse.Action):
    """A list option given space- or comma-separated, as lm-eval users type it: `a,b c` -> ['a', 'b', 'c']."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = [part.strip() for value in values for part in value.split(",") if part.strip()]
        if not items:
            parser.error(f"{option_string}: no names given (separate them with spaces or commas)")
        setattr(namespace, self.dest, items)


def parse_limit(text: str) -> int | float:
    """--limit as lm-eval reads it: 0 < x < 1 is a fraction of each cell's samples, a whole number >= 1 a count."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if 0 < value < 1:
        return value
    if value >= 1 and value.is_integer():
        return int(value)
    raise argparse.ArgumentTypeError(f"{text!r}: expected a fraction between 0 and 1 (0.1 = a tenth of each cell) "
                                     "or a whole number of samples >= 1 (50)")


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
                           "checkpoint folder, optionally with ,tokenizer=PATH and ,bos=true|false "
                           "(mamba2=/ckpt/m,tokenizer=/ckpt/neox); default: the suite's models")
    plan.add_argument("--tasks", nargs="+", metavar="TASK", action=ListArgument,
                      help="task names (`list tasks`), space- or comma-separated; replaces the suite's tasks")
    plan.add_argument("--lengths", nargs="+", metavar="L", action=ListArgument,
                      help="context lengths (1024, 4k, ...) for length-axis tasks, space- or comma-separated; "
                           "default: the suite's, else 1k 2k")
    plan.add_argument("--samples", type=int, help="samples per cell (RULER/MQAR/ppl; lm-eval: documents); "
                                                  "default: the suite's, else 100 (lm-eval: all documents)")
    plan.add_argument("--seed", type=int, help="seed of the sample generators (default: the suite's, else 0)")
    plan.add_argument("--limit", type=parse_limit,
                      help="as lm-eval's --limit (quick looks): a whole number caps the samples (lm-eval: documents) "
                           "per cell; 0 < x < 1 keeps that fraction of each cell's, rounded up")
    plan.add_argument("--paper-row", action="append", default=[], metavar="MODEL=SETTING:NAME",
                      help='map a model to a row of the paper for side-by-side deltas, e.g. '
                           '"gdn2-1.3b=recurrent:Gated DeltaNet-2" (repeatable)')
    hw = run.add_argument_group("how to run")
    hw.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    hw.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    hw.add_argument("--tokenizer", metavar="PATH",
                    help="tokenizer folder or tokenizer.json for models whose spec names none (checkpoints that "
                         "ship no tokenizer, e.g. state-spaces Mamba folders); a spec's ,tokenizer= wins")
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
            raise ValueError(f"--paper-row {item!r}: expected MODEL=recurrent:NAME or MODEL=hybrid:NAME, "
                             'e.g. "gdn2-1.3b=recurrent:Gated DeltaNet-2"')
        rows[model] = f"{setting}:{name}"
    return rows


def make_plan(args: argparse.Namespace):
    from harness.runner import load_suite, parse_length, plan_from_suite, resolve_tasks, validate_plan

    if args.tasks:
        suite = load_suite(args.suite) if args.suite else {"name": "custom", "models": ["gdn2-tiny-random"]}
        lengths = args.lengths or ["1k", "2k"]
        suite = dict(suite, cells=[{"task": t, "lengths": lengths} for t in args.tasks])
        name = suite.get("name", "custom") if args.suite else "custom"
    else:
        suite = load_suite(args.suite or "quick")
        name = suite["name"]
    fraction = args.limit if isinstance(args.limit, float) else None
    plan = plan_from_suite(suite, models=args.models, samples=args.samples, seed=args.seed,
                           limit=None if fraction else args.limit,
                           lengths=None if args.tasks else args.lengths, device=args.device, dtype=args.dtype,
                           batch_size=args.batch_size, retry_failed=args.retry_failed,
                           allow_longer_context=args.allow_longer_context or None, offline=not args.online,
                           tokenizer=args.tokenizer, paper_rows=_parse_paper_rows(args.paper_row))
    plan.name = name
    if fraction:
        apply_limit_fraction(plan, fraction)
    if args.tasks:
        from harness.task_adapters import resolve_task

        for cell in plan.cells:   # tasks without a length axis get one cell, not one per length
            if cell.task.startswith("lm_eval:"):
                cell.lengths = [None]
            elif not getattr(resolve_task(cell.task, cell.options, offline=plan.offline), "uses_length", True):
                cell.lengths = [None]
        for cell in plan.cells:
            cell.lengths = [parse_length(x) for x in cell.lengths]
    validate_plan(plan)
    resolve_tasks(plan)          # unknown task names (lm-eval's included) are refused before any model loads
    if args.haystack_file:
        set_essay_haystack(plan, args.haystack_file)
    if not plan.models:
        raise SystemExit("error: no models: pass --models SPEC ... (see `run_eval.py list models`)")
    if plan.batch_size < 1:
        raise SystemExit(f"error: --batch-size must be a positive integer; got {plan.batch_size}")
    return plan


def apply_limit_fraction(plan, fraction: float) -> None:
    """--limit 0 < f < 1: every cell keeps ceil(f * its samples), as lm-eval rounds. An lm-eval cell that runs all of
    its documents passes f on to lm-eval, which alone knows how many there are."""
    from harness.runner import DEFAULT_SAMPLES

    for cell in plan.cells:
        n = cell.samples if cell.samples is not None else plan.samples
        if n is None and cell.task.startswith("lm_eval:"):
            cell.samples = fraction
        else:
            cell.samples = max(1, math.ceil(fraction * (DEFAULT_SAMPLES if n is None else n)))


def set_essay_haystack(plan, haystack_file: str) -> None:
    """Point every RULER cell with an essay haystack at haystack_file (it becomes part of the cell's identity)."""
    from harness.task_adapters import RulerEvalTask, resolve_task
    from tasks.haystacks import load_essay

    if not Path(haystack_file).is_file():
        raise FileNotFoundError(f"--haystack-file {haystack_file}: " + ("a folder, not a file" if Path(
            haystack_file).is_dir() else "no such file"))
    load_essay(str(Path(haystack_file).resolve()))    # unreadable or too short: refused before any model loads
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
    from harness.runner import SweepRunner, merge_rank_cells
    from harness.store import CellIdentityError, ResultsStore, StoreError

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
    except (CellIdentityError, StoreError) as err:
        if dist.is_main:                     # every rank meets the same error; say it once
            print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted; stored samples are kept in {output / 'results.sqlite'}; rerun the same command to "
              "resume", file=sys.stderr)
        return 130
    per_rank = dist.all_gather(summary.cells)       # also the barrier before rank 0 reports
    if dist.is_main:
        summary.cells = merge_rank_cells(per_rank)
        print_summary(summary, time.time() - start)
        if not args.no_report:
            try:
                _print_report(output, plots=True, exports=True)
            except ImportError as err:   # pandas / matplotlib come with the eval extra
                print(f"(no report: {err}; install the eval extra: pip install -e '.[eval]', then run "
                      f"`python run_eval.py report {output}`)")
        print(f"\nresults: {output / 'results.sqlite'} (rerun the same command to resume or extend)")
    dist.close()
    return 1 if summary.failed_cells and all(c.status == "failed" for c in summary.cells) else 0


def print_summary(summary, seconds: float) -> None:
    """Samples scored, skipped and failed; every cell that failed or holds failed samples (this run's or kept
    from an earlier one), so a rerun never reports a cell with failures as done."""
    cells = summary.cells
    ok = sum(c.ok for c in cells)
    skipped = sum(c.skipped for c in cells)
    failed = sum(c.failed for c in cells)
    kept = sum(c.failed_before for c in cells)
    bad = [c for c in cells if c.status == "failed" or c.failed or c.failed_before]
    print(f"\ndone in {seconds:.1f}s: {ok} sample(s) scored, {skipped} already stored, {failed} failed sample(s)"
          + (f" (+{kept} failed in earlier runs)" if kept else "")
          + f", {len(bad)} cell(s) failed or with failures")
    for c in bad:
        where = f"{c.model} | {c.task}" + (f" @ {c.length}" if c.length else "")
        if c.status == "failed":
            print(f"  FAILED {where}: {c.error}")
        else:
            print(f"  {where}: {c.failed + c.failed_before} failed sample(s) of {c.planned}"
                  + (" (stored earlier; --retry-failed retries them)" if c.failed_before else ""))


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
    from harness.store import DB_NAME, ResultsStore, StoreError, check_readable

    output = Path(args.output)
    if not (output / DB_NAME).is_file():
        print(f"error: no results store at {output / DB_NAME}; pass the --output folder of a run "
              f"(e.g. {DEFAULT_OUTPUT} after `python run_eval.py`)", file=sys.stderr)
        return 2
    writable = os.access(output, os.W_OK | os.X_OK)
    exports = not args.no_exports
    try:
        rows = _parse_paper_rows(args.paper_row)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        check_readable(output / DB_NAME)
        if not writable:
            if args.paper_row:
                raise StoreError(f"--paper-row stores the mapping in {output / DB_NAME}, but {output} is read-only; "
                                 "map the rows in a writable copy (cp -r), or leave --paper-row out")
            if not args.out:
                raise StoreError(f"{output} is read-only: pass --out DIR to write the report elsewhere")
            if exports:
                print(f"note: {output} is read-only, so no exports (they are written beside the store)",
                      file=sys.stderr)
                exports = False
        if rows:
            with ResultsStore(output) as store, store.transaction() as c:
                for model, row in rows.items():
                    setting, _, name = row.partition(":")
                    if c.execute("UPDATE models SET paper_setting = ?, paper_model = ? WHERE model = ?",
                                 (setting, name, model)).rowcount == 0:
                        print(f"warning: --paper-row: no model {model!r} in {output}", file=sys.stderr)
        _print_report(output, plots=not args.no_plots, exports=exports, fmt=args.format, out=args.out)
    except StoreError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:           # a --out that is a file, a folder we may not write, a full disk
        print(f"error: cannot write {err.filename or args.out} ({err.strerror or err}); pass --out DIR (a folder "
              "you can write to) to write the report elsewhere", file=sys.stderr)
        return 2
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
        print("No command given: running the quick suite: the eight bundled small models (one per family and the two "
              "GDN-2 gate ablations, trained here; small-scale, not comparable to the paper) on RULER needles, MQAR "
              "and held-out perplexity, on this machine.\n"
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
