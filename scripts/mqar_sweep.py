"""MQAR accuracy vs recurrent state size (the Zoology figure): every small-model family trained on MQAR alone at
several widths, then scored on held-out MQAR sequences.

    python scripts/mqar_sweep.py --widths 64 128 --steps 3000 --jobs 16 --seed 0 --out s0     # on a GPU (CUDA MPS)
    python scripts/mqar_sweep.py --replot s0/mqar_sweep.csv s1/mqar_sweep.csv --out results/mqar  # seeds -> one CSV
    python scripts/mqar_sweep.py --models gdn2 mamba2 --widths 64 --steps 5 --device cpu --out /tmp/m  # smoke

Models: harness/small_models.py at width d, `--layers` layers, the MLP of each family matched to GDN-2's parameter
count; state per recurrent layer = 64 d floats for every recurrent family (the transformer's KV cache grows with the
sequence: 2 d floats per token per layer, shown at the evaluated length). Training: token-level MQAR (tasks.mqar:
keys [1, V/2), values [V/2, V), power-law query gaps) of --seq-len tokens, each batch an equal mix of the
--train-pairs counts; loss only at the query positions. Evaluation: --eval-sequences sequences per pair count in
--eval-pairs, drawn from the evaluation seeds (tasks.mqar.sample_seed), accuracy over all their queries. --seed sets
the initialisation, the training stream and the evaluation sequences: a sweep per seed is one replicate.
Writes OUT/mqar_sweep.csv (one row per model x width x pair count) and OUT/mqar_sweep.png.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from harness import small_models  # noqa: E402
from harness.train import TrainConfig, describe_device, train  # noqa: E402
from tasks.mqar import MQAR_TASK, mqar_arrays  # noqa: E402

FIELDS = ["model", "family", "description", "width", "layers", "params", "state_floats_per_layer",
          "kv_cache_floats_at_eval", "seq_len", "kv_pairs", "accuracy", "sequences", "queries", "lr", "steps", "seed",
          "train_seconds", "final_loss", "device", "date"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(small_models.SMALL_MODELS))
    p.add_argument("--widths", nargs="+", type=int, default=[64, 128, 256])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--train-pairs", nargs="+", type=int, default=[4, 8, 16, 32, 64])
    p.add_argument("--eval-pairs", nargs="+", type=int, default=[16, 32, 64])
    p.add_argument("--eval-sequences", type=int, default=256)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=60, help="rows per step, a multiple of the pair counts")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, one process each")
    p.add_argument("--out", default="results/mqar")
    p.add_argument("--replot", nargs="+", metavar="CSV",
                   help="write the rows of one or more sweeps' CSVs (e.g. one per seed) as OUT/mqar_sweep.csv and "
                        "redraw OUT/mqar_sweep.png (no training)")
    p.add_argument("--one", nargs=2, metavar=("MODEL", "WIDTH"), help=argparse.SUPPRESS)  # a child run
    args = p.parse_args(argv)
    if args.batch_size % len(args.train_pairs):
        p.error(f"--batch-size {args.batch_size} must be a multiple of the {len(args.train_pairs)} --train-pairs")
    unknown = [m for m in args.models if m not in small_models.SMALL_MODELS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; known: {', '.join(small_models.SMALL_MODELS)}")
    return args


def training_stream(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) [steps * batch, seq_len]: each step's rows split evenly over --train-pairs."""
    per, rest = divmod(args.batch_size, len(args.train_pairs))
    if per < 1 or rest:
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of the {len(args.train_pairs)} pair "
                         f"counts of --train-pairs")
    inputs, targets = [], []
    for step in range(args.steps):
        for j, pairs in enumerate(args.train_pairs):
            seed = int(np.random.SeedSequence([args.seed, 2, step, j]).generate_state(1)[0])  # apart from eval
            x, y = mqar_arrays(per, args.seq_len, args.vocab_size, pairs, seed=seed)
            inputs.append(x)
            targets.append(y)
    return np.concatenate(inputs), np.concatenate(targets)


@torch.no_grad()
def evaluate(lm: torch.nn.Module, args: argparse.Namespace, pairs: int, device: torch.device) -> tuple[float, int]:
    """(accuracy over all queries in percent, number of queries) on --eval-sequences evaluation sequences."""
    samples = MQAR_TASK.build_samples(args.vocab_size, args.seq_len, args.eval_sequences, seed=args.seed,
                                      num_kv_pairs=pairs)
    correct = total = 0
    lm.eval()
    for start in range(0, len(samples), 64):
        batch = samples[start:start + 64]
        ids = torch.tensor([s.input_ids for s in batch], device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            predicted = lm(input_ids=ids).logits.argmax(-1).cpu().numpy()
        for row, sample in zip(predicted, batch, strict=False):
            _, detail = MQAR_TASK.score(row, sample)
            correct += detail["correct"]
            total += detail["num_queries"]
    return 100.0 * correct / total, total


def run_one(args: argparse.Namespace, name: str, width: int) -> list[dict]:
    from harness.registry import resolve_device

    device = resolve_device(args.device)
    reference = small_models.Shape(hidden_size=width, layers=args.layers, mlp_width=2 * width,
                                   vocab_size=args.vocab_size, max_length=args.seq_len)
    shape = small_models.matched_shape(name, reference)
    torch.manual_seed(args.seed)
    lm, config = small_models.build(name, shape)
    inputs, targets = training_stream(args)
    result = train(lm, inputs, targets, TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                                    warmup_steps=min(100, args.steps), seed=args.seed), device)
    state = small_models.state_floats_per_layer(name, config)
    rows = []
    for pairs in args.eval_pairs:
        accuracy, queries = evaluate(lm, args, pairs, device)
        rows.append({
            "model": name, "family": small_models.SMALL_MODELS[name][0],
            "description": small_models.SMALL_MODELS[name][2], "width": width, "layers": args.layers,
            "params": small_models.count_params(lm)[0], "state_floats_per_layer": state,
            "kv_cache_floats_at_eval": 0 if state else 2 * width * args.seq_len, "seq_len": args.seq_len,
            "kv_pairs": pairs, "accuracy": round(accuracy, 2), "sequences": args.eval_sequences,
            "queries": queries, "lr": args.lr, "steps": result.steps_done, "seed": args.seed,
            "train_seconds": round(result.seconds, 1), "final_loss": round(result.final_loss, 4),
            "device": result.device, "date": time.strftime("%Y-%m-%d", time.gmtime())})
        print(f"[{name} d={width}] pairs {pairs}: {accuracy:.1f}% of {queries} queries", flush=True)
    return rows


def child_command(args: argparse.Namespace, name: str, width: int, record: Path) -> list[str]:
    flags = ["--layers", str(args.layers), "--vocab-size", str(args.vocab_size), "--seq-len", str(args.seq_len),
             "--train-pairs", *map(str, args.train_pairs), "--eval-pairs", *map(str, args.eval_pairs),
             "--eval-sequences", str(args.eval_sequences), "--steps", str(args.steps),
             "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--seed", str(args.seed),
             "--device", args.device, "--out", str(record), "--one", name, str(width)]
    return [sys.executable, str(Path(__file__).resolve()), *flags]


def sweep(args: argparse.Namespace) -> list[dict]:
    """Every (model, width) run, --jobs at a time in their own processes (widest first); rows of those that
    finished, written to OUT after each."""
    out = Path(args.out)
    work = Path(tempfile.mkdtemp(prefix="mqar-sweep-"))
    pending = [(m, w) for w in sorted(args.widths, reverse=True) for m in args.models]
    running: dict[tuple[str, int], tuple[subprocess.Popen, Path]] = {}
    rows: list[dict] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    while pending or running:
        while pending and len(running) < max(1, args.jobs):
            name, width = pending.pop(0)
            record = work / f"{name}-{width}.json"
            running[(name, width)] = (subprocess.Popen(child_command(args, name, width, record), env=env), record)
        time.sleep(1)
        for key, (proc, record) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[key]
            if proc.returncode == 0 and record.is_file():
                rows += json.loads(record.read_text())
                write_results(rows, out)                  # after every run: a cut-short sweep keeps what finished
            else:
                print(f"[{key[0]} d={key[1]}] FAILED (exit code {proc.returncode})", flush=True)
    return rows


def write_results(rows: list[dict], out: Path) -> None:
    if not rows:
        return
    out.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: (r["model"], r["width"], r["kv_pairs"], r["seed"]))
    with open(out / "mqar_sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out / "mqar_sweep.png")


def read_results(path: Path) -> list[dict]:
    """The rows of a mqar_sweep.csv with their numbers as numbers (what write_results was given)."""
    def value(text: str):
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text

    with open(path, newline="") as f:
        return [{k: value(v) for k, v in row.items()} for row in csv.DictReader(f)]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    pair_counts = sorted({r["kv_pairs"] for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    fig, axes = plt.subplots(1, len(pair_counts), figsize=(4.2 * len(pair_counts), 3.6), sharey=True, squeeze=False)
    for ax, pairs in zip(axes[0], pair_counts, strict=False):
        for model in sorted({r["model"] for r in rows}):
            cells = [(r["state_floats_per_layer"] or r["kv_cache_floats_at_eval"], r["accuracy"])
                     for r in rows if r["model"] == model and r["kv_pairs"] == pairs]
            if not cells:
                continue
            xs = sorted({x for x, _ in cells})
            means = [float(np.mean([a for x, a in cells if x == size])) for size in xs]
            style = dict(ls="--", marker="s") if model == "transformer" else dict(marker="o")
            label = "transformer (x: KV cache at this length)" if model == "transformer" else model
            line, = ax.plot(xs, means, label=label, **style)
            if len(seeds) > 1:                                  # each seed's run, around the mean
                ax.scatter(*zip(*cells, strict=False), s=10, color=line.get_color(), alpha=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("recurrent state per layer (floats)")
        ax.set_title(f"{pairs} key-value pairs, {rows[0]['seq_len']} tokens", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("MQAR accuracy (% of queries)")
    n, steps = rows[0]["sequences"], rows[0]["steps"]
    runs = "one seed" if len(seeds) == 1 else f"mean of seeds {', '.join(map(str, seeds))} (dots: each seed)"
    fig.suptitle(f"MQAR vs state size ({rows[0]['layers']} layers, {steps} training steps, {runs}; {n} sequences "
                 f"per run and point; small-scale)", fontsize=10)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=4)
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replot:
        write_results([r for path in args.replot for r in read_results(Path(path))], Path(args.out))
        return 0
    if args.one:
        name, width = args.one[0], int(args.one[1])
        rows = run_one(args, name, width)
        Path(args.out).write_text(json.dumps(rows))
        return 0
    from harness.registry import resolve_device

    print(f"device: {describe_device(resolve_device(args.device))}", flush=True)
    rows = sweep(args) if args.jobs > 1 else [r for w in args.widths for m in args.models
                                              for r in run_one(args, m, w)]
    write_results(rows, Path(args.out))
    print(f"wrote {Path(args.out) / 'mqar_sweep.csv'} and mqar_sweep.png ({len(rows)} rows)", flush=True)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
