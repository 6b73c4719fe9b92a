"""Batched evaluation against lm-eval's HFLM, same model, same call: GDN2ForCausalLM at the 1.3B shape (random init,
bf16) with the bundled 4K BPE tokenizer (vocabulary 4096, so that every generated id decodes).

- lm-eval: each task (offline copies, e.g. piqa and squad) through an LM that answers at once (lm-eval's own share of
  every row), then through HFLM at each batch size (its best is the reference) and through the harness LM
  (harness/lm_eval_plugin.py) at each batch size; wall time, the time inside the LM's request methods
  (engine_seconds), the task's metric, and how the harness's per-document responses differ from HFLM's at the same
  batch size. --profile writes cProfile's heaviest calls of each engine's timed run.
- RULER: the runner on niah_single_1..3 and niah_multikey_1 at the given lengths, at batch 1 and batch N; wall time,
  mean score and the number of stored predictions that differ from batch 1's.

    python benchmarks/bench_eval_hflm.py --tasks piqa,squad --limit 500 --batch-sizes 1,16,64 \
        --ruler-lengths 1k,2k,4k,8k --ruler-samples 20 --out $OUT

Writes <out>/eval-vs-hflm-<card>.csv and prints a table. Random weights: the scores are chance-level; what matters is
that each pair of rows has the same score and how long each took.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))
from benchmarks.csv_rows import write_csv  # noqa: E402

RULER_TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1")


def build_model(smoke: bool, dtype_name: str = "bfloat16", spec: str | None = None):
    """(GDN2ForCausalLM on the device in dtype_name (fp32 on CPU), the bundled tokenizer, an EvalModel over both);
    spec: a registry model instead (e.g. a bundled trained model), its module and tokenizer as loaded."""
    from gdn2 import GDN2ForCausalLM, named_config
    from harness.bundled import BPE_4K
    from harness.checkpoint import load_tokenizer
    from harness.model import EvalModel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec:
        from harness.registry import load_model

        model = load_model(spec, device=str(device), dtype=dtype_name if device.type == "cuda" else "float32")
        return model.lm, model.tokenizer, model
    config = named_config("gdn2-tiny" if smoke else "gdn2-1.3B", vocab_size=4096)
    torch.manual_seed(0)
    with torch.device(device):
        lm = GDN2ForCausalLM(config)
    dtype = getattr(torch, dtype_name) if device.type == "cuda" else torch.float32
    lm = lm.to(dtype).eval()
    for module in lm.modules():                      # decay parameters stay fp32, as the loader keeps them
        for name in ("A_log", "dt_bias"):
            if isinstance(getattr(module, name, None), torch.nn.Parameter):
                getattr(module, name).data = getattr(module, name).data.float()
    tokenizer = load_tokenizer(None, str(BPE_4K))
    model = EvalModel(name="gdn2-1.3B-random", family="gdn2", lm=lm, tokenizer=tokenizer, device=device, dtype=dtype,
                      source="random init", backend="gdn2 Triton kernels (ours)",
                      state_floats=config.state_floats_per_layer(), trained_length=4096)
    return lm, tokenizer, model


REQUEST_METHODS = ("loglikelihood", "loglikelihood_rolling", "generate_until")


def timed_evaluate(lm_obj, task_name: str, limit: int, manager, profile: str | None = None) -> tuple[float, float, dict,
                                                                                                     list]:
    """(seconds of the whole simple_evaluate call, seconds inside the LM's request methods, the task's metrics, each
    document's responses in document order). profile: a path that gets cProfile's 40 heaviest calls of the run."""
    import cProfile
    import pstats

    import lm_eval

    inside = [0.0]
    for name in REQUEST_METHODS:                     # each request method timed on this instance, synchronised
        method = getattr(type(lm_obj), name)

        def timed(*args, _method=method, **kwargs):
            start = time.perf_counter()
            out = _method(lm_obj, *args, **kwargs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            inside[0] += time.perf_counter() - start
            return out
        setattr(lm_obj, name, timed)
    profiler = cProfile.Profile() if profile else None
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    out = lm_eval.simple_evaluate(model=lm_obj, tasks=[task_name], limit=limit, task_manager=manager,
                                  bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                  fewshot_random_seed=0, log_samples=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if profiler:
        profiler.disable()
        with open(profile, "w") as f:
            pstats.Stats(profiler, stream=f).sort_stats("cumulative").print_stats(40)
    for name in REQUEST_METHODS:
        delattr(lm_obj, name)
    metrics = {k.split(",")[0]: round(float(v), 4) for k, v in out["results"][task_name].items()
               if isinstance(v, float) and "stderr" not in k}
    responses = [s["resps"] for s in sorted(out["samples"][task_name], key=lambda s: s["doc_id"])]
    return seconds, inside[0], metrics, responses


def instant_lm():
    """An lm-eval LM that answers every request at once (log-likelihood -1, greedy False; empty generations): a run
    through it times lm-eval's own share of a simple_evaluate call (building requests, scoring, aggregating)."""
    from lm_eval.api.model import LM

    class InstantLM(LM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return [(-1.0, False) for _ in requests]

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return [-1.0 for _ in requests]

        def generate_until(self, requests, disable_tqdm: bool = False):
            return ["" for _ in requests]

    return InstantLM()


def disagreement(responses, reference, name: str = "HFLM") -> str:
    """How a run's per-document responses differ from the reference engine's (`name`): generations that differ
    (strings), or the largest log-likelihood difference and the number of greedy flags that differ."""
    flat = [r for doc in responses for req in doc for r in req]
    flat_ref = [r for doc in reference for req in doc for r in req]
    if len(flat) != len(flat_ref):
        return f"{len(flat)} responses against {len(flat_ref)}"
    if flat and isinstance(flat[0], str):
        differ = sum(a != b for a, b in zip(flat, flat_ref, strict=True))
        return f"{differ} of {len(flat)} generations differ from {name}'s"
    diffs = [abs(a[0] - b[0]) for a, b in zip(flat, flat_ref, strict=True)]
    greedy = sum(a[1] != b[1] for a, b in zip(flat, flat_ref, strict=True))
    return (f"log-likelihoods within {max(diffs, default=0):.2e} of {name}'s ({len(flat)}); {greedy} greedy flags "
            "differ")


ENGINES = ("HFLM", "harness", "harness-whole")      # harness-whole: the harness LM with share_prefixes off


def lm_eval_rows(lm, tokenizer, model, task_key: str, limit: int, batch_sizes, repeats: int,
                 profile_dir: str | None = None, engines=ENGINES[:2]) -> list[dict]:
    """lm-eval's own share (an LM that answers at once), then per batch size each engine: HFLM, the harness LM, the
    harness LM with shared prefixes off (EvalModel.share_prefixes); each timed on the last of `repeats` runs (the
    first pays the Triton compiles of new shapes, which would otherwise favour whichever engine runs second).
    engine_seconds: the time inside the LM's request methods."""
    from harness.lm_eval_plugin import HarnessLM
    from harness.lm_eval_tasks import CATALOG, offline_include_path, task_manager

    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    task_name = CATALOG[task_key].task_name(offline=True)
    manager = task_manager(str(offline_include_path()))
    rows = []
    for _ in range(repeats):
        seconds, _, _, _ = timed_evaluate(instant_lm(), task_name, limit, manager)
    rows.append(dict(kind=f"lm-eval {task_name}", engine="lm-eval alone (instant LM)", batch="",
                     seconds=round(seconds, 2),
                     engine_seconds=0, score="lm-eval's own work: the same in every row", status="ok"))
    print(rows[-1], flush=True)
    for size in batch_sizes:
        reference = reference_name = None
        for engine in engines:
            try:
                if engine == "HFLM":
                    from lm_eval.models.huggingface import HFLM  # needs accelerate

                    lm_obj = HFLM(pretrained=lm, tokenizer=tokenizer, batch_size=size, device=str(model.device))
                else:
                    model.share_prefixes = engine == "harness"
                    lm_obj = HarnessLM(model=model, batch_size=size)
                for repeat in range(repeats):
                    profile = (os.path.join(profile_dir, f"profile-{task_key}-{engine}-b{size}.txt")
                               if profile_dir and repeat == repeats - 1 else None)
                    seconds, inside, metrics, responses = timed_evaluate(lm_obj, task_name, limit, manager, profile)
                agreement = disagreement(responses, reference, reference_name) if reference is not None else ""
                if reference is None:
                    reference, reference_name = responses, engine
                rows.append(dict(kind=f"lm-eval {task_name}", engine=engine, batch=size, seconds=round(seconds, 2),
                                 engine_seconds=round(inside, 2), score=f"{metrics} {agreement}".strip(), status="ok"))
            except Exception as err:  # noqa: BLE001 - a failing engine is a row
                rows.append(dict(kind=f"lm-eval {task_name}", engine=engine, batch=size, seconds="", engine_seconds="",
                                 score="", status=f"{type(err).__name__}: {err}"[:200]))
            finally:
                model.share_prefixes = True
            print(rows[-1], flush=True)
    return rows


def ruler_rows(model, lengths, samples: int, batch_sizes, workdir: Path, repeats: int) -> list[dict]:
    """The runner on RULER_TASKS at each batch size, timed on the last of `repeats` runs (each into a fresh store)."""
    from harness.runner import CellPlan, Plan, SweepRunner
    from harness.store import ResultsStore
    from tasks.cli import parse_length

    rows, reference = [], None
    for size in batch_sizes:
        plan = Plan(models=[model.name], cells=[CellPlan(t, [parse_length(x) for x in lengths]) for t in RULER_TASKS],
                    samples=samples, batch_size=size, device=str(model.device))
        for repeat in range(repeats):
            folder = workdir / f"ruler-b{size}-{repeat}"
            start = time.perf_counter()
            with ResultsStore(folder) as store:
                summary = SweepRunner(plan, store, progress=False, log=lambda m: None, loader=lambda spec: model).run()
            seconds = time.perf_counter() - start
        conn = sqlite3.connect(folder / "results.sqlite")
        stored = conn.execute("SELECT task, length, sample_index, score, prediction FROM samples "
                              "ORDER BY task, length, sample_index").fetchall()
        conn.close()
        if reference is None:
            reference, agreement = stored, "the reference for the other batch sizes"
        else:
            differ = sum(a[4] != b[4] for a, b in zip(stored, reference, strict=False))
            agreement = f"{differ} predictions differ from batch {batch_sizes[0]}'s"
        scores = [r[3] for r in stored if r[3] is not None]
        rows.append(dict(kind=f"ruler {','.join(lengths)} x {samples}", engine="harness runner", batch=size,
                         seconds=round(seconds, 2),
                         score=f"mean {sum(scores) / max(len(scores), 1):.2f} over {len(scores)}; {agreement}",
                         status="ok" if not summary.failed_cells else f"{len(summary.failed_cells)} failed cells"))
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="piqa",
                        help="comma list of lm-eval task keys of harness/lm_eval_tasks.py (offline copies)")
    parser.add_argument("--limit", type=int, default=500, help="documents of the lm-eval task")
    parser.add_argument("--batch-sizes", default="1,16,64", help="batch sizes for both engines")
    parser.add_argument("--ruler-lengths", default="1k,2k,4k,8k")
    parser.add_argument("--ruler-samples", type=int, default=20)
    parser.add_argument("--ruler-batch-sizes", default="1,16")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: lm-eval, ruler")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs per engine and batch size; the last is timed (the first pays compiles)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="weights and activations on the GPU (float32 separates engine differences from bf16 "
                             "rounding)")
    parser.add_argument("--engines", default="HFLM,harness",
                        help=f"comma list of {', '.join(ENGINES)} (the first that runs is the reference of agreement)")
    parser.add_argument("--profile", action="store_true",
                        help="write cProfile's heaviest calls of each engine's timed lm-eval run to "
                             "<out>/profile-*.txt")
    parser.add_argument("--model", default=None,
                        help="a registry spec (e.g. the bundled gdn2-small) instead of the random 1.3B GDN-2")
    parser.add_argument("--smoke", action="store_true", help="the tiny GDN-2 config (checks the code paths)")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "results" / "bench"))
    args = parser.parse_args(argv)
    unknown = set(args.engines.split(",")) - set(ENGINES)
    if unknown:
        parser.error(f"unknown --engines {sorted(unknown)}; choose from {', '.join(ENGINES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lm, tokenizer, model = build_model(args.smoke, args.dtype, args.model)
    card = torch.cuda.get_device_name().replace(" ", "-") if torch.cuda.is_available() else "cpu"
    card += "-smoke" if args.smoke else f"-{model.name}" if args.model else ""
    date = datetime.date.today().isoformat()
    print(f"# {card} {date} torch {torch.__version__}", flush=True)
    rows = []
    skip = set(args.skip.split(","))
    if "lm-eval" not in skip:
        for task in args.tasks.split(","):
            rows += lm_eval_rows(lm, tokenizer, model, task, args.limit, [int(b) for b in args.batch_sizes.split(",")],
                                 args.repeats, args.out if args.profile else None, args.engines.split(","))
    if "ruler" not in skip:
        with tempfile.TemporaryDirectory() as workdir:
            rows += ruler_rows(model, args.ruler_lengths.split(","), args.ruler_samples,
                               [int(b) for b in args.ruler_batch_sizes.split(",")], Path(workdir), args.repeats)
    dtype = str(model.dtype).removeprefix("torch.")
    rows = [{"card": card, "date": date, "dtype": dtype, "repeats": args.repeats, **r} for r in rows]
    write_csv(rows, str(out / f"eval-vs-hflm-{card}.csv"))
    print(f"wrote {out / f'eval-vs-hflm-{card}.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
