"""`doctor`: check, on this machine's GPU, that the kernels the harness trusts agree with each other.

For every family (and each of its variants, e.g. a hybrid with sliding-window attention) the doctor builds the
upstream model (fla, mamba-ssm, transformers, fla's GDN-2 layer...) and our pure-PyTorch reference path from a tiny
config with IDENTICAL random weights, in fp32, and checks on a sequence longer than one chunk (default 160 tokens
> 2 x 64):

  1. logits: upstream vs reference                     relative error ||a - b|| / ||a|| <= tolerance (1e-3)
  2. prefill + decode vs one full forward, upstream    prefill 100 tokens, 16 single-token steps, then the rest
  3. prefill + decode vs one full forward, reference   as one chunk continuing the carried state
  4. reference on the device vs the same weights on CPU (our GPU kernels vs our torch path; CUDA only)

Families whose upstream cannot run here report "skipped: <reason>" (not a failure). Exit status: 0 when nothing
failed, 1 when a check failed or raised, 2 when the device is not available.

The hook a family implements (duck-typed; FLAFamilyBase in baselines/common.py implements it for fla families):

    def conformance_models(self, device: torch.device, variant: str = "") -> tuple[nn.Module, nn.Module]:
        '''(upstream_lm, reference_lm): fp32, on `device`, identical weights, both called as
        lm(input_ids=[1, T], past_key_values=cache | None, use_cache=bool) -> .logits [1, T, V], .past_key_values.
        Raise harness.doctor.ConformanceSkipped("why") when the upstream cannot run here.'''

    def conformance_variants(self) -> list[str]:      # optional; default [""]
        '''Names of the variants to check, each passed to conformance_models (e.g. "", "hybrid", "mimo").'''

    def conformance_tolerance(self, variant: str = "") -> float:   # optional; default the doctor's 1e-3
        '''A looser limit for a variant whose upstream kernel computes in lower precision (applies to its checks).'''

    def conformance_skips(self, variant: str = "") -> dict[str, str]:   # optional; default {}
        '''{check name: reason} for checks the upstream cannot run here (reported as skipped, not failed).'''

    def conformance_single_token_decode(self, variant: str = "") -> str:   # optional; default "" (no)
        '''Why the upstream takes only one new token per call once it has a cache (e.g. fla's Mamba2): its
        prefill+decode check then feeds every token after the prefill one at a time, and the row says why.'''

Families without conformance_models are listed as "skipped: no conformance hook".

Autotuning: by default every Triton autotuner (fla's, mamba-ssm's, ours) runs only its first config that survives
the kernel's own pruning: the doctor checks the math of each kernel, and timing every config of every upstream
kernel cost minutes per family on an H100 (runs were cut off by it). `--full-autotune` restores normal autotuning
(the kernels then run the configs a sweep would pick); `benchmarks/check_kernels_gpu.py` checks every config of ours.
Usage: `python run_eval.py doctor [--family NAME ...] [--device cuda] [--full-autotune]`, or run_doctor().
"""
from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass

import torch

SEQ_LEN = 160        # > 2 chunks of 64
PREFILL = 100        # tokens in the prefill call
DECODE_STEPS = 16    # single-token calls after the prefill; the rest of the sequence then goes in one call
TOLERANCE = 1e-3


class ConformanceSkipped(Exception):
    """Raised by conformance_models when the upstream implementation cannot run on this machine."""


@dataclass
class DoctorRow:
    family: str
    check: str
    status: str               # "ok" | "FAIL" | "skipped" | "error"
    value: float | None = None
    limit: float | None = None
    detail: str = ""


def relative_error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    """||expected - actual|| / ||expected|| over all elements, in float64."""
    e, a = expected.double().cpu(), actual.double().cpu()
    return float((e - a).norm() / e.norm().clamp_min(1e-30))


@torch.no_grad()
def full_logits(lm, ids: torch.Tensor) -> torch.Tensor:
    return lm(input_ids=ids, use_cache=False).logits.float()


@torch.no_grad()
def incremental_logits(lm, ids: torch.Tensor, prefill: int = PREFILL, steps: int = DECODE_STEPS) -> torch.Tensor:
    """Logits of ids fed as: prefill tokens in one call, `steps` single tokens, then the rest in one call,
    the cache carried throughout (steps >= the number of tokens left: every one of them singly)."""
    out = lm(input_ids=ids[:, :prefill], use_cache=True)
    pieces, cache = [out.logits.float()], out.past_key_values
    position = prefill
    bounds = [(t, t + 1) for t in range(prefill, min(prefill + steps, ids.shape[1]))]
    if prefill + steps < ids.shape[1]:
        bounds.append((prefill + steps, ids.shape[1]))
    for start, end in bounds:
        out = lm(input_ids=ids[:, start:end], past_key_values=cache, use_cache=True)
        pieces.append(out.logits.float())
        cache = out.past_key_values
        position = end
    assert position == ids.shape[1]
    return torch.cat(pieces, dim=1)


def first_config_autotuning() -> None:
    """Make every triton.autotune'd kernel (fla, mamba-ssm, ours) launch the first config, of those left after its
    own pruning, that compiles and launches (a config over the shared-memory limit is skipped, as the autotuner
    itself does), without compiling or timing the rest. Process-wide and permanent: for the doctor's runs only."""
    from triton.runtime.autotuner import Autotuner

    if getattr(Autotuner, "_doctor_first_config", False):
        return
    prune, bench = Autotuner.prune_configs, Autotuner._bench

    def prune_and_reset(self, kwargs):
        self._doctor_found = False                   # a new autotune key: the benchmark loop over the list follows
        return prune(self, kwargs)

    def bench_until_one_launches(self, *args, config, **kwargs):
        if getattr(self, "_doctor_found", False):
            return [float("inf")] * 3                # not compiled, never picked
        timing = bench(self, *args, config=config, **kwargs)
        self._doctor_found = timing[0] != float("inf")
        return timing

    Autotuner.prune_configs = prune_and_reset
    Autotuner._bench = bench_until_one_launches
    Autotuner._doctor_first_config = True


def check_family(family, device: torch.device, seq_len: int = SEQ_LEN, tolerance: float = TOLERANCE,
                 on_row=None) -> list[DoctorRow]:
    """All checks of one family object (every variant); on_row(row) is called as each row is made."""
    name = family.name
    if not hasattr(family, "conformance_models"):
        return [DoctorRow(name, "conformance", "skipped", detail="no conformance hook")]
    variants = family.conformance_variants() if hasattr(family, "conformance_variants") else [""]
    rows = _RowList(on_row)
    for variant in variants:
        label = f"{name}[{variant}]" if variant else name
        try:
            upstream, reference = family.conformance_models(device, variant) if variant else \
                family.conformance_models(device)
        except ConformanceSkipped as why:
            rows.append(DoctorRow(label, "conformance", "skipped", detail=str(why)))
            continue
        except Exception as err:  # a broken upstream install is a finding, not a crash of the doctor
            rows.append(DoctorRow(label, "build models", "error", detail=f"{type(err).__name__}: {err}"))
            continue
        _check_variant(rows, family, variant, label, upstream, reference, device, seq_len, tolerance)
        del upstream, reference
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return list(rows)


def _check_variant(rows: list, family, variant: str, label: str, upstream, reference, device: torch.device,
                   seq_len: int, tolerance: float) -> None:
    """The checks of one variant's (upstream, reference) model pair; appends a row per check."""
    vocab = reference.get_output_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab, (1, seq_len), generator=gen).to(device)

    def measure(check: str, compute, limit: float = tolerance, detail: str = "") -> torch.Tensor | None:
        try:
            expected, actual = compute()
        except Exception as err:
            rows.append(DoctorRow(label, check, "error", detail=f"{type(err).__name__}: {err}"))
            return None
        err_value = relative_error(expected, actual)
        ok = err_value <= limit and bool(torch.isfinite(actual).all())
        rows.append(DoctorRow(label, check, "ok" if ok else "FAIL", err_value, limit, detail))
        return actual

    # A family may declare a looser limit when the upstream kernel itself computes in lower precision
    # (mamba-ssm's Mamba-3 SISO casts to bf16 inside). Our model runs that same kernel on CUDA (as a sweep
    # does), so the limit holds for every check of the variant; each row says so.
    limit, note = tolerance, ""
    if hasattr(family, "conformance_tolerance") and family.conformance_tolerance(variant) > tolerance:
        limit = family.conformance_tolerance(variant)
        note = "family-declared limit: the upstream kernel computes in bf16 internally"
    # ... and may name checks its upstream cannot run here (e.g. a decode kernel of a backend not installed)
    skips = family.conformance_skips(variant) if hasattr(family, "conformance_skips") else {}

    def measure_or_skip(check: str, compute, extra: str = ""):
        if check in skips:
            rows.append(DoctorRow(label, check, "skipped", detail=skips[check]))
            return
        measure(check, compute, limit, "; ".join(x for x in (note, extra) if x))

    state = {}
    for key, lm in (("up", upstream), ("ref", reference)):
        try:
            state[key] = full_logits(lm, ids)
        except Exception as err:
            which = "upstream" if key == "up" else "reference"
            rows.append(DoctorRow(label, f"forward ({which})", "error", detail=f"{type(err).__name__}: {err}"))
    if "up" in state and "ref" in state:
        measure_or_skip(f"logits upstream vs reference (T={seq_len})", lambda: (state["up"], state["ref"]))
    # ... and may take only one new token per cached call (then every token after the prefill goes singly)
    single = family.conformance_single_token_decode(variant) if hasattr(
        family, "conformance_single_token_decode") else ""
    up_steps = seq_len if single else DECODE_STEPS
    if "up" in state:
        measure_or_skip("prefill+decode vs full (upstream)",
                        lambda: (state["up"], incremental_logits(upstream, ids, steps=up_steps)),
                        f"every token after the prefill singly: {single}" if single else "")
    if "ref" in state:
        measure_or_skip("prefill+decode vs full (reference)",
                        lambda: (state["ref"], incremental_logits(reference, ids)))
    if device.type == "cuda" and "ref" in state:
        def on_cpu():
            cpu_copy = copy.deepcopy(reference).cpu()
            return state["ref"], full_logits(cpu_copy, ids.cpu())
        measure_or_skip("reference on cuda vs cpu", on_cpu)


class _RowList(list):
    """A list of DoctorRow that reports each appended row (so a run cut short still shows what it measured)."""

    def __init__(self, on_row):
        super().__init__()
        self.on_row = on_row

    def append(self, row: DoctorRow) -> None:
        super().append(row)
        if self.on_row is not None:
            self.on_row(row)


def run_doctor(families: list[str] | None = None, device: str = "cuda", seq_len: int = SEQ_LEN,
               tolerance: float = TOLERANCE, print_table: bool = True,
               full_autotune: bool = True) -> tuple[list[DoctorRow], int]:
    """Run the conformance checks; returns (rows, exit status) and prints a table unless print_table=False.
    full_autotune=False: every Triton autotuner runs its first config only (first_config_autotuning; the CLI's
    default)."""
    if seq_len <= PREFILL + DECODE_STEPS:
        raise ValueError(f"doctor: --seq-len must exceed {PREFILL + DECODE_STEPS} (a {PREFILL}-token prefill, "
                         f"{DECODE_STEPS} decode steps, then the rest); got {seq_len}")
    # Our kernels launch one config each: the doctor checks numerics, and autotuning every config costs minutes of
    # compilation (an H100 run was cut off by it). `benchmarks/check_kernels_gpu.py` checks every config.
    os.environ.setdefault("GDN2_TRITON_AUTOTUNE", "0")
    # fp32 means fp32: no TF32 in torch matmuls nor in Triton dots that do not pin their precision.
    os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")
    if not full_autotune:
        first_config_autotuning()
    from harness.registry import get_family, resolve_device

    try:
        dev = resolve_device(device)
    except ValueError as err:
        if print_table:
            print(f"doctor: {err}", file=sys.stderr)
        return [], 2
    previous = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    rows: list[DoctorRow] = []
    try:
        selected = [get_family(n) for n in families] if families else []
        if not families:
            for name in _family_names():
                try:
                    selected.append(get_family(name))
                except Exception as err:  # a family module that does not import is reported, others still run
                    rows.append(DoctorRow(name, "import", "error", detail=f"{type(err).__name__}: {err}"))
        for family in selected:
            if print_table:
                print(f"doctor: checking {family.name} on {dev} ...", file=sys.stderr, flush=True)
            family_rows = check_family(family, dev, seq_len, tolerance, on_row=_print_row if print_table else None)
            if print_table:
                print(format_rows(family_rows, dev), flush=True)
            rows.extend(family_rows)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous
    status = 1 if any(r.status in ("FAIL", "error") for r in rows) else 0
    if print_table:
        print("doctor: " + ("all checks passed" if status == 0 else "FAILED (see rows marked FAIL / error)")
              + f"; {sum(r.status == 'skipped' for r in rows)} skipped")
    return rows, status


def _family_names() -> list[str]:
    from harness.registry import family_names

    return family_names()


def _print_row(row: DoctorRow) -> None:
    value = "" if row.value is None else f" {row.value:.2e} (limit {row.limit:.0e})"
    print(f"  {row.family}: {row.check}: {row.status}{value} {row.detail}".rstrip(), file=sys.stderr, flush=True)


def format_rows(rows: list[DoctorRow], device: torch.device | None = None) -> str:
    header = ("family", "check", "status", "rel. error", "limit", "detail")
    body = [(r.family, r.check, r.status, "" if r.value is None else f"{r.value:.2e}",
             "" if r.limit is None else f"{r.limit:.0e}", r.detail) for r in rows]
    columns = zip(header, *body, strict=True) if body else [(h,) for h in header]
    widths = [max(len(str(x)) for x in col) for col in columns]
    widths[-1] = 0  # detail last and unpadded
    lines = [f"doctor on {device}" if device is not None else "doctor"]
    for row in (header, *body):
        lines.append("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def add_doctor_arguments(parser) -> None:
    """The doctor's options (shared by `python -m harness.doctor` and `run_eval.py doctor`)."""
    parser.add_argument("--family", action="append", help="check only this family (repeatable)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN)
    parser.add_argument("--tolerance", type=float, default=TOLERANCE)
    parser.add_argument("--full-autotune", action="store_true",
                        help="time every config of every Triton autotuner as a sweep would (minutes per family); "
                             "default: each autotuned kernel runs its first config")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="doctor", description=__doc__.splitlines()[0])
    add_doctor_arguments(parser)
    args = parser.parse_args(argv)
    return run_doctor(args.family, args.device, args.seq_len, args.tolerance,
                      full_autotune=args.full_autotune)[1]


if __name__ == "__main__":
    sys.exit(main())
