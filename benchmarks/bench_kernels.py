"""Benchmark our GDN-2 Triton kernels against flash-linear-attention's chunk_gdn2 and chunk_kda, same run, same card.

bf16 q, k, v, b, w (fp32 g, as the layer computes it), H = 16, K = V = 128, (B, T) in (8, 4096), (2, 16384),
(1, 65536): inference forward (no grad), training forward (inputs require grad; forward only), forward + backward,
each on the launches gdn2/ops/triton/dispatch.py plans for the call; the decode step at B = 1 and B = 64 (one token,
state updated in place). Timing:
triton.testing.do_bench (CUDA events), median, after warm-up, on freshly drawn inputs; the decode step also from a
CUDA graph of 32 steps (GPU time per step without launch gaps). The floor is the bytes every implementation must
move (inputs read once, outputs written once) over the copy bandwidth measured in the same run.

    PYTHONUNBUFFERED=1 python benchmarks/bench_kernels.py --out results/bench
Writes <out>/kernels-<card>.csv, kernels-<card>.md (table + targets), kernels-<card>.png (if matplotlib imports;
else redraw it on the CPU: python benchmarks/bench_kernels.py --plot-from <out>/kernels-<card>.csv) and prints the
table. GDN2_TRITON_AUTOTUNE is left as set (autotuning by default: the first call per shape compiles and
times every config, outside the timed region).
"""
from __future__ import annotations

import argparse
import ast
import csv
import datetime
import os
import re
import sys

import torch
import triton

# the repository root, for benchmarks.*; appended, so that a gdn2 copy on PYTHONPATH still comes first
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.csv_rows import write_csv  # noqa: E402
from gdn2.ops.triton import triton_chunk_gdn2, triton_recurrent_step_gdn2  # noqa: E402

H, K, V = 16, 128, 128
SHAPES = [(8, 4096), (2, 16384), (1, 65536)]
# the rows of each chunked shape, in table order (LEGEND says what each is)
CHUNK_MODES = ("infer_fwd", "train_fwd", "fwd_bwd")


def bench(fn, grad_to_none=None):
    return triton.testing.do_bench(fn, warmup=100, rep=400, grad_to_none=grad_to_none, return_mode="median")


def copy_bandwidth():
    x = torch.randn(1 << 28, device="cuda")
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * x.numel() * 4 / (ms * 1e-3)


def inputs(B, T, seed, heads=H, key_dim=K, value_dim=V, dtype=torch.bfloat16, device="cuda"):
    """q, k, v, g, b, w, beta [B, T, heads, .] on `device`: q, k unit rows, g = -softplus(N(0,1) - 2) / 2 in fp32 (the
    rest in `dtype`); beta [B, T, heads] for fla's chunk_kda."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shape_k, shape_v = (B, T, heads, key_dim), (B, T, heads, value_dim)
    q = torch.nn.functional.normalize(torch.randn(shape_k, device=device, generator=gen), dim=-1).to(dtype)
    k = torch.nn.functional.normalize(torch.randn(shape_k, device=device, generator=gen), dim=-1).to(dtype)
    v = torch.randn(shape_v, device=device, generator=gen).to(dtype)
    g = -torch.nn.functional.softplus(torch.randn(shape_k, device=device, generator=gen) - 2) * 0.5
    b = torch.rand(shape_k, device=device, generator=gen).to(dtype)
    w = torch.rand(shape_v, device=device, generator=gen).to(dtype)
    beta = torch.rand(B, T, heads, device=device, generator=gen).to(dtype)
    return q, k, v, g, b, w, beta


def load_fla():
    try:
        from fla.ops.gdn2 import chunk_gdn2, fused_recurrent_gdn2
        from fla.ops.kda import chunk_kda
        return chunk_gdn2, chunk_kda, fused_recurrent_gdn2
    except Exception as e:                                                     # fla missing: ours only
        print(f"fla not importable ({type(e).__name__}: {e}); timing ours only")
        return None, None, None


def time_modes(call, args, do, modes=("infer_fwd", "train_fwd", "fwd_bwd")):
    """{mode: ms} for call(*args) -> o: inference fwd (no grad), training fwd (inputs require grad; forward only),
    fwd+bwd, those of them named in `modes`. The initial state h0 [B, H, K, V] and the final state are part of every
    call (chunked prefill); h0 needs no grad."""
    out = {}
    if "infer_fwd" in modes:
        with torch.no_grad():
            out["infer_fwd"] = bench(lambda: call(*args))
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in args]
    if "train_fwd" in modes:
        out["train_fwd"] = bench(lambda: call(*leaves))
    if "fwd_bwd" in modes:
        def fwd_bwd():
            call(*leaves).backward(do)
        out["fwd_bwd"] = bench(fwd_bwd, grad_to_none=leaves)
    return out


def decode_rows(card, bw, fla_rec):
    """The decode step's rows at B = 1 and 64: one launch (ours and fla), and ours per step in a CUDA graph."""
    rows = []
    for B in (1, 64):
        q, k, v, g, b, w, _ = inputs(B, 1, seed=10 + B)
        state = torch.randn(B, H, K, V, device="cuda") * 0.1
        ours = bench(lambda: triton_recurrent_step_gdn2(q, k, v, g, b, w, state, None, False))
        steps = 32
        graph = torch.cuda.CUDAGraph()
        triton_recurrent_step_gdn2(q, k, v, g, b, w, state, None, False)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            for _ in range(steps):
                triton_recurrent_step_gdn2(q, k, v, g, b, w, state, None, False)
        ours_graph = bench(graph.replay) / steps
        fla_ms = None
        if fla_rec is not None:
            st = state.clone()
            fla_ms = bench(lambda: fla_rec(q, k, v, g, b, w, initial_state=st, output_final_state=True))
        floor = floor_bytes_of(f"B{B}_T1", "decode_step")
        rows.append(make_row(card, bw, f"B{B}_T1", "decode_step", ours, fla_ms, None, floor))
        rows.append(make_row(card, bw, f"B{B}_T1", "decode_step_graph", ours_graph, None, None, floor))
    return rows


ROW_KEYS = ("card", "date", "shape", "mode", "ours_ms", "fla_gdn2_ms", "fla_kda_ms", "floor_ms", "ours_over_fla_gdn2",
            "ours_over_floor")


def make_row(card, bw, shape, mode, ours, gdn2, kda, floor_bytes):
    """One table row: ms of ours and fla (None where not timed), the floor at copy bandwidth bw (B/s), the ratios."""
    floor_ms = floor_bytes / bw * 1e3
    return dict(card=card, date=datetime.date.today().isoformat(), shape=shape, mode=mode, ours_ms=round(ours, 4),
                fla_gdn2_ms=None if gdn2 is None else round(gdn2, 4),
                fla_kda_ms=None if kda is None else round(kda, 4), floor_ms=round(floor_ms, 4),
                ours_over_fla_gdn2=None if gdn2 is None else round(ours / gdn2, 3),
                ours_over_floor=round(ours / floor_ms, 2))


def floor_bytes_of(shape: str, mode: str) -> int:
    """The bytes every implementation must move for a row (shape "B8_T4096"). Chunked forward: q, k, b, v, w read in
    bf16, g in fp32, o written; the backward reads them and do, and writes their gradients. Decode (T = 1): the state
    read and written in fp32, one token's inputs read and its output written."""
    B, T = (int(x[1:]) for x in shape.split("_"))
    if T == 1:
        return B * H * (2 * K * V * 4 + 3 * K * 2 + K * 4 + 3 * V * 2)
    ntok = B * T * H
    fwd_bytes = ntok * (3 * K * 2 + K * 4 + 2 * V * 2 + V * 2)
    bwd_bytes = fwd_bytes + ntok * (3 * K * 2 + K * 4 + 2 * V * 2)
    return fwd_bytes + bwd_bytes if mode.startswith("fwd_bwd") else fwd_bytes


def shape_rows(card, bw, B, T, ours, gd, kd):
    """The rows of one chunked shape, in CHUNK_MODES order: ours {mode: ms} (the modes it has: a log cut short may
    lack some) and fla's {mode: ms} (gdn2, kda; empty where not timed)."""
    shape = f"B{B}_T{T}"
    return [make_row(card, bw, shape, mode, ours[mode], gd.get(mode), kd.get(mode), floor_bytes_of(shape, mode))
            for mode in CHUNK_MODES if mode in ours]


def run_header(card, bw) -> str:
    """The first line a bench run prints: card, copy bandwidth, date and software (rows_from_log reads it back)."""
    return (f"card {card}; copy bandwidth {bw / 1e12:.4f} TB/s (read + write); {datetime.date.today().isoformat()}; "
            f"{software()}")


def rows_from_log(text, card):
    """Rebuild the rows from a bench log, for a run whose time limit cut it before it wrote them: the chunked rows from
    its printed dicts ("ours B8_T4096: {...}", "fla gdn2 B8_T4096: {...}", "fla kda ..."), the decode rows from their
    printed table lines. Date, copy bandwidth and software come from the log's first line (run_header); a log
    whose first line names no date and software has "not in log" for them. Returns (rows, bandwidth in B/s,
    software)."""
    header = re.search(r"^card \S+; copy bandwidth ([\d.]+) TB/s \(read \+ write\)(?:; (\S+); (.*))?$", text,
                       flags=re.M)
    if header is None:
        raise ValueError("not a bench_kernels.py log: no line 'card ...; copy bandwidth X TB/s (read + write)' (the "
                         "first line every run prints); pass the log the run wrote")
    bw = float(header.group(1)) * 1e12
    date, soft = header.group(2) or "not in log", header.group(3) or "software not in log"
    rows = []
    for shape, ours in re.findall(r"^ours (B\d+_T\d+): (\{.*\})$", text, flags=re.M):
        fla = {name: ast.literal_eval(found.group(1)) if found else {} for name in ("gdn2", "kda")
               for found in [re.search(rf"^fla {name} {shape}: (\{{.*\}})$", text, flags=re.M)]}
        B, T = (int(x[1:]) for x in shape.split("_"))
        rows += shape_rows(card, bw, B, T, ast.literal_eval(ours), fla["gdn2"], fla["kda"])
    for line in re.findall(r"^\S+ \| \S+ \| B\d+_T1 \| decode_step.*$", text, flags=re.M):
        cells = [None if c == "None" else c for c in line.split(" | ")]
        row = dict(zip(ROW_KEYS, cells[:4] + [None if c is None else float(c) for c in cells[4:]], strict=False))
        rows.append({**row, "card": card})
    return [{**r, "date": date} for r in rows], bw, soft


def read_rows(path):
    """The rows of a kernels-<card>.csv, numbers as floats and empty cells as None."""
    def cell(key, text):
        if text in ("", "None"):
            return None
        return text if key in ("card", "date", "shape", "mode") else float(text)
    with open(path) as f:
        return [{key: cell(key, text) for key, text in r.items()} for r in csv.DictReader(f)]


def software_of_report(path) -> str:
    """The software line of a kernels-<card>.md report (write_markdown's third line, up to "; bf16")."""
    if not os.path.exists(path):
        return "software not recorded"
    with open(path) as f:
        lines = f.read().splitlines()
    return lines[2].split("; bf16")[0] if len(lines) > 2 and "; bf16" in lines[2] else "software not recorded"


def bandwidth_of(rows) -> float:
    """The copy bandwidth (B/s) the rows' floors were computed with, from the largest floor (ms, rounded to 4
    decimals) and the bytes of its shape."""
    row = max(rows, key=lambda r: r["floor_ms"])
    return floor_bytes_of(row["shape"], row["mode"]) / (row["floor_ms"] * 1e-3)


def merge_rows(row_lists):
    """One table from several runs' rows: a later run's row replaces an earlier one of the same shape and mode. Order:
    the chunked shapes as in SHAPES (others after them), then the decode rows; within a shape, first appearance."""
    merged = {}
    for rows in row_lists:
        for r in rows:
            merged[(r["shape"], r["mode"])] = r
    order = [f"B{B}_T{T}" for B, T in SHAPES]
    return sorted(merged.values(), key=lambda r: (r["shape"].endswith("_T1"),
                                                  order.index(r["shape"]) if r["shape"] in order else len(order)))


def print_rows(rows):
    for row in rows:
        print(" | ".join(str(v) for v in row.values()), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/bench")
    ap.add_argument("--skip-fla", action="store_true")
    ap.add_argument("--skip-kda", action="store_true", help="time fla's chunk_gdn2 but not chunk_kda")
    ap.add_argument("--shapes", default=",".join(f"{B}x{T}" for B, T in SHAPES),
                    help="BxT list, e.g. 8x4096 (default: the three shapes of the issue)")
    ap.add_argument("--plot-from", default=None, help="kernels-<card>.csv: only redraw its .png here (no GPU)")
    ap.add_argument("--rows-from-logs", nargs="+", default=None, metavar="LOG",
                    help="no GPU: rebuild kernels-<card>.csv/.md in --out from the dicts these bench logs printed "
                         "(a run cut short), with --card")
    ap.add_argument("--card", default=None, help="with --rows-from-logs: the card the logs ran on")
    ap.add_argument("--merge", nargs="+", default=None, metavar="CSV",
                    help="no GPU: one kernels-<card>.csv/.md/.png in --out from several runs' kernels-<card>.csv (a "
                         "later file's row replaces an earlier one of the same shape and mode); the software comes "
                         "from the .md report beside each")
    args = ap.parse_args()
    if args.plot_from:
        rows = read_rows(args.plot_from)
        write_plot(rows, rows[0]["card"], args.plot_from[:-4] + ".png")
        return
    os.makedirs(args.out, exist_ok=True)
    if args.merge:
        rows = merge_rows([read_rows(path) for path in args.merge])
        if not rows:
            raise SystemExit(f"--merge: no rows in {args.merge}; pass kernels-<card>.csv files a bench run wrote")
        soft = " / ".join(dict.fromkeys(software_of_report(path[:-4] + ".md") for path in args.merge))
        card = rows[0]["card"]
        write_csv(rows, os.path.join(args.out, f"kernels-{card}.csv"))
        note = ("Rows merged from " + ", ".join(os.path.basename(p) for p in args.merge)
                + " (bench_kernels.py --merge; a later file's row replaces an earlier one of the same shape and mode).")
        write_markdown(rows, card, bandwidth_of(rows), os.path.join(args.out, f"kernels-{card}.md"), soft, note)
        write_plot(rows, card, os.path.join(args.out, f"kernels-{card}.png"))
        print_rows(rows)
        return
    if args.rows_from_logs:
        if not args.card:
            raise SystemExit("--rows-from-logs needs --card (e.g. NVIDIA-H100-80GB-HBM3): the logs' rows carry it")
        runs = []
        for path in args.rows_from_logs:
            with open(path) as f:
                runs.append(rows_from_log(f.read(), args.card))
        rows = merge_rows([got for got, _, _ in runs])
        soft = " / ".join(dict.fromkeys(s for _, _, s in runs))                # distinct, in order
        write_csv(rows, os.path.join(args.out, f"kernels-{args.card}.csv"))
        write_markdown(rows, args.card, runs[-1][1], os.path.join(args.out, f"kernels-{args.card}.md"), soft)
        print_rows(rows)
        return
    card = torch.cuda.get_device_name().replace(" ", "-")
    bw = copy_bandwidth()
    print(run_header(card, bw), flush=True)
    fla_gdn2, fla_kda, fla_rec = (None, None, None) if args.skip_fla else load_fla()
    csv_path = os.path.join(args.out, f"kernels-{card}.csv")
    rows = []

    # Shape by shape: ours, then fla on the same inputs. The file is rewritten after ours (fla's cells empty: its first
    # compiles can outlast a time limit) and again after fla, so a run cut short keeps everything it timed.
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    for i, (B, T) in enumerate(shapes):
        q, k, v, g, b, w, beta = inputs(B, T, seed=i)
        do = torch.randn_like(v)
        h0 = torch.randn(B, H, K, V, device="cuda") * 0.1
        kw = dict(initial_state=h0, output_final_state=True)
        ours = time_modes(lambda *a: triton_chunk_gdn2(*a, **kw)[0], (q, k, v, g, b, w), do)
        print(f"ours B{B}_T{T}: {ours}", flush=True)
        write_csv(rows + shape_rows(card, bw, B, T, ours, {}, {}), csv_path)
        gd, kd = {}, {}
        if fla_gdn2 is not None:
            gd = time_modes(lambda *a: fla_gdn2(*a, **kw)[0], (q, k, v, g, b, w), do)
            print(f"fla gdn2 B{B}_T{T}: {gd}", flush=True)
            if not args.skip_kda:
                kd = time_modes(lambda *a: fla_kda(*a, **kw)[0], (q, k, v, g, beta), do)
                print(f"fla kda B{B}_T{T}: {kd}", flush=True)
        rows += shape_rows(card, bw, B, T, ours, gd, kd)
        print_rows(rows[-len(CHUNK_MODES):])
        write_csv(rows, csv_path)
        del q, k, v, g, b, w, beta, do
        torch.cuda.empty_cache()
    rows += decode_rows(card, bw, fla_rec)
    print_rows([r for r in rows if r["mode"].startswith("decode")])
    write_csv(rows, csv_path)
    write_markdown(rows, card, bw, os.path.join(args.out, f"kernels-{card}.md"), software())
    write_plot(rows, card, os.path.join(args.out, f"kernels-{card}.png"))
    print(f"wrote {csv_path} (.md, .png)")


# The decode target is judged on the CUDA-graph row (GPU time per step, no launch gaps): the one-launch row also
# holds the host's launch latency, which varies between machines (docs/kernels.md#measured).
TARGETS = {("B8_T4096", "infer_fwd"): 1.1, ("B8_T4096", "fwd_bwd"): 9.0, ("B1_T1", "decode_step_graph"): 0.020}

LEGEND = ("Modes: infer_fwd = inference forward, train_fwd = forward with autograd state kept, fwd_bwd = forward + "
          "backward, each on the launches dispatch.plan_forward picks for these inputs (bf16, K = 128: the wy kernel "
          "forms A, the state kernel computes the output; in inference from 128 sequences x heads, B=8 here, the "
          "state kernel also applies A). decode_step = one token, one launch; decode_step_graph = per step in a CUDA "
          "graph of 32 steps.")


def fla_version() -> str:
    """fla's version, or 'not installed' (a --skip-fla run needs no fla)."""
    try:
        import fla
    except ImportError:
        return "not installed"
    return getattr(fla, "__version__", "?")


def software() -> str:
    """The versions a run used (triton, torch, fla) and whether it autotuned."""
    return (f"triton {triton.__version__}, torch {torch.__version__}, fla {fla_version()}, "
            f"GDN2_TRITON_AUTOTUNE={os.environ.get('GDN2_TRITON_AUTOTUNE', '1')}")


def write_markdown(rows, card, bw, path, software_used, note=""):
    """The report: header (card, the rows' dates, software_used, e.g. software() of the run, and a note on where the
    rows come from, if any), table, targets."""
    dates = ", ".join(dict.fromkeys(r["date"] for r in rows))
    lines = [f"# GDN-2 Triton kernels vs fla ({card}, {dates})", "",
             f"{software_used}; "
             f"bf16 q,k,v,b,w, fp32 g, H={H}, K=V={K}, initial state in, final state out; median of "
             f"triton.testing.do_bench. Floor = bytes that must move / {bw / 1e12:.2f} TB/s measured copy.", "",
             *([note, ""] if note else []), LEGEND, "",
             "| shape | mode | ours ms | fla gdn2 ms | fla kda ms | floor ms | ours / fla gdn2 | ours / floor |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["shape"], r["mode"], r["ours_ms"], r["fla_gdn2_ms"], r["fla_kda_ms"], r["floor_ms"],
                 r["ours_over_fla_gdn2"], r["ours_over_floor"]]
        lines.append("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    lines += ["", "Targets:"]
    for (shape, mode), target in TARGETS.items():
        got = next((r["ours_ms"] for r in rows if r["shape"] == shape and r["mode"] == mode), None)
        verdict = "not run" if got is None else ("MET" if got <= target else f"MISSED ({got / target:.2f}x over)")
        lines.append(f"- {shape} {mode} <= {target} ms: {got} ms, {verdict}")
    chunked = [r for r in rows if r["ours_over_fla_gdn2"] is not None and r["mode"] in CHUNK_MODES]
    if chunked:
        worst = max(chunked, key=lambda r: r["ours_over_fla_gdn2"])
        lines.append(f"- ahead of fla chunk_gdn2 at every chunked row: "
                     f"{'YES' if worst['ours_over_fla_gdn2'] < 1 else 'NO'} (worst: {worst['shape']} {worst['mode']}, "
                     f"ours / fla = {worst['ours_over_fla_gdn2']})")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_plot(rows, card, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:                                                     # plot is optional
        print(f"no plot ({type(e).__name__}: {e})")
        return
    chunked = [r for r in rows if "decode" not in r["mode"]]
    labels = [f"{r['shape']}\n{r['mode']}" for r in chunked]
    xs = range(len(chunked))
    fig, ax = plt.subplots(figsize=(max(8, len(chunked) * 0.9), 4.5))
    for i, (key, name) in enumerate([("ours_ms", "ours"), ("fla_gdn2_ms", "fla chunk_gdn2"),
                                     ("fla_kda_ms", "fla chunk_kda")]):
        ax.bar([x + (i - 1) * 0.27 for x in xs], [r[key] or 0 for r in chunked], width=0.27, label=name)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("ms (median)")
    ax.set_yscale("log")
    ax.set_title(f"GDN-2 chunked kernels, {card}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
