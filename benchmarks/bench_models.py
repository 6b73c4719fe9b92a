"""Model-level benchmark of every family at its 1.3B config (random init): the paper's Figure 2 (training tokens/s at
sequence x batch = 2K x 8, 4K x 4, 8K x 2, 16K x 1; bf16 autocast, fused AdamW, fp32 master weights), prefill latency
and peak memory against context (1K..128K, batch 1), decode tokens/s and memory against context at batch 1 and 32,
and batched evaluation (EvalModel at batch 1 against batch N on the same requests, outputs compared).

Each family runs the harness's own model (ours: GDN2ForCausalLM; the reference paths with our Triton kernels for
Gated DeltaNet and KDA; mamba-ssm's kernels for Mamba-2/3 when importable; transformers' Llama), and, when fla imports,
fla's model of the same family in the same run (impl "fla"; impl "fla-matched": fla's Gated DeltaNet or KDA with its
MLP widened to our GDN-2's parameter count, whose full-rank erase and write projections make it 1.45B against KDA's
1.27B at the same shape). Training rows note the parameter count and carry the paper's number for the family
(harness/paper/figure2_throughput.csv: the paper measured hybrid models, with sliding-window attention layers).

    python benchmarks/bench_models.py --only train --families gdn2,kda --out $OUT     # one piece per GPU call
    python benchmarks/bench_models.py --only decode --quick --out $OUT
    python benchmarks/bench_models.py --only train --families gdn2 --shapes 2048x8 --profile   # where time goes
    python benchmarks/bench_models.py --merge a.csv b.csv --out results/bench          # one CSV + plot per card

Writes <out>/models-<card>.csv (one row per measurement, with card, date and software) and models-<card>.png.
Decode rows of recurrent caches come from the plain step and from the static CUDA-graph step
(harness/graph_decode.py, impl "ours-graph"), whose greedy tokens are checked against the plain step's.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import inspect
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

# the repository root, for benchmarks.* and the packages; appended so that a copy on PYTHONPATH still comes first
ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))
from benchmarks.csv_rows import write_csv  # noqa: E402

FAMILIES = ("gdn2", "gated_deltanet", "kda", "mamba2", "mamba3", "transformer")
TRAIN_SHAPES = ((2048, 8), (4096, 4), (8192, 2), (16384, 1))
PREFILL_CONTEXTS = (1024, 4096, 16384, 65536, 131072)
DECODE_CONTEXTS = (1024, 16384, 65536)
DECODE_BATCHES = (1, 32)
DECODE_STEPS = 64
PREFILL_SEGMENT = 4096       # decode rows prefill their context in segments of this many tokens per row
PAPER_CSV = ROOT / "harness" / "paper" / "figure2_throughput.csv"
PAPER_NAMES = {"gdn2": "Gated DeltaNet-2", "gated_deltanet": "Gated DeltaNet", "kda": "KDA", "mamba2": "Mamba-2",
               "mamba3": "Mamba-3 (SISO)", "transformer": "Transformer"}
FLA_CLASSES = {"gated_deltanet": ("GatedDeltaNetForCausalLM", "GatedDeltaNetConfig"),
               "kda": ("KDAForCausalLM", "KDAConfig"), "mamba2": ("Mamba2ForCausalLM", "Mamba2Config"),
               "gdn2": ("KDAForCausalLM", "KDAConfig")}   # fla has no GDN-2 model class: KDA is the nearest
SMOKE_MAMBA = dict(hidden_size=64, num_hidden_layers=2, state_size=16, head_dim=16, vocab_size=512, chunk_size=16)
COLUMNS = ("card", "date", "kind", "family", "impl", "seq_len", "batch", "context", "tok_s", "ms", "peak_gib",
           "first_step_s", "paper_tok_s", "status", "note", "software")


# ------------------------------------------------------------------------------------------ models
def fla_available() -> bool:
    try:
        import fla.models  # noqa: F401
    except Exception:
        return False
    return True


def paper_config(family: str) -> dict:
    """The family's 1.3B config (with --smoke: its tiny test config)."""
    from harness.registry import get_family

    if family == "gdn2":
        from gdn2.configuration import NAMED_CONFIGS

        return dict(NAMED_CONFIGS["gdn2-tiny" if RUN.get("smoke") else "gdn2-1.3B"])
    config = dict(get_family(family).paper_config)
    if RUN.get("smoke"):
        return dict(getattr(get_family(family), "tiny_config", None) or {**config, **SMOKE_MAMBA})
    return config


def build_model(family: str, impl: str) -> torch.nn.Module:
    """The family's 1.3B model, random init, fp32 on the GPU. impl: 'ours' (what the harness runs) or 'fla'."""
    config = paper_config(family)
    with torch.device(RUN["device"]):
        if impl in ("fla", "fla-matched"):
            import fla.models

            model_class, config_class = (getattr(fla.models, name) for name in FLA_CLASSES[family])
            if family == "gdn2":            # KDA at GDN-2's 1.3B shape
                from baselines.common import PAPER_DELTA_RULE_CONFIG

                config = paper_config("kda") if RUN.get("smoke") else dict(PAPER_DELTA_RULE_CONFIG)
            fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
            if impl == "fla-matched":
                fields["intermediate_size"] = matched_mlp_width(model_class, config_class, fields, gdn2_params())
            return model_class(config_class(**fields))
        if family == "gdn2":
            from gdn2 import GDN2Config, GDN2ForCausalLM

            return GDN2ForCausalLM(GDN2Config(**config))
        if family in ("gated_deltanet", "kda"):
            from harness.registry import get_family

            return get_family(family).build_reference(config)
        if family == "mamba2":
            from baselines.mamba2 import _mamba_ssm_kernels, build_mamba2, mamba2_configs
            from baselines.mamba_common import set_kernels

            return set_kernels(build_mamba2(mamba2_configs(config)), _mamba_ssm_kernels() is not None)
        if family == "mamba3":
            from baselines.mamba3 import build_mamba3, mamba3_configs, upstream_kernels
            from baselines.mamba_common import set_kernels

            return set_kernels(build_mamba3(mamba3_configs(config)), upstream_kernels()["siso"])
        from baselines.transformer import build_llama

        return build_llama(config)


def count_params(build) -> int:
    """Parameters of the model build() returns, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def gdn2_params() -> int:
    """Our GDN-2's parameter count at its 1.3B config (1,450,096,416: full-rank erase and write projections)."""
    from gdn2 import GDN2Config, GDN2ForCausalLM

    return count_params(lambda: GDN2ForCausalLM(GDN2Config(**paper_config("gdn2"))))


def matched_mlp_width(model_class, config_class, fields: dict, target: int) -> int:
    """The multiple of 64 as MLP width that brings an fla model's parameter count nearest to target: each unit of
    width adds 3 * hidden_size * num_hidden_layers parameters (SwiGLU gate, up and down). A width off the multiple
    of 64 puts the MLP's matmuls on slow tiles. fla's KDA at GDN-2's 1.3B shape has 1,272,928,032 parameters with its
    MLP of 6,144; 7,568 would match GDN-2's count exactly, 7,552 is 0.14% short."""
    with torch.device("meta"):
        model = model_class(config_class(**fields))
    base = sum(p.numel() for p in model.parameters())
    width = model.model.layers[0].mlp.gate_proj.out_features
    exact = width + (target - base) / (3 * fields["hidden_size"] * fields["num_hidden_layers"])
    return 64 * round(exact / 64)


def missing_kernels(family: str, impl: str) -> str | None:
    """Why the family's model would run on torch reference code here (hours at 1.3B), or None."""
    if impl != "ours" or RUN.get("smoke"):
        return None
    if family == "mamba2":
        from baselines.mamba2 import _mamba_ssm_kernels

        return None if _mamba_ssm_kernels() is not None else "mamba-ssm's kernels do not import (carry its wheel)"
    if family == "mamba3":
        from baselines.mamba3 import upstream_kernels

        return None if upstream_kernels()["siso"] else "mamba-ssm's Mamba-3 kernels do not import (carry its wheel)"
    return None


MATCHED_FAMILIES = ("gated_deltanet", "kda")   # fla models whose MLP can be widened to GDN-2's parameter count


def impls_of(family: str, requested: list[str], with_fla: bool) -> list[str]:
    """The requested impls that exist for the family: 'ours'; 'fla' (fla's model, where fla imports); 'fla-matched'
    (fla's model with its MLP widened to our GDN-2's parameter count, Gated DeltaNet and KDA)."""
    exists = {"ours": True, "fla": with_fla and family in FLA_CLASSES,
              "fla-matched": with_fla and family in MATCHED_FAMILIES}
    return [impl for impl in requested if exists[impl]]


def loss_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's own training loss when its forward takes labels (fused where the model fuses it), else the
    cross-entropy of its logits."""
    if "labels" in inspect.signature(model.forward).parameters:
        return model(input_ids=ids, labels=ids, use_cache=False).loss
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def free(*objects) -> None:
    del objects
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync() -> None:
    if RUN["device"] == "cuda":
        torch.cuda.synchronize()


def reset_peak() -> None:
    if RUN["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return gib(torch.cuda.max_memory_allocated()) if RUN["device"] == "cuda" else 0.0


def vocab() -> int:
    return 512 if RUN.get("smoke") else 32000


def gib(n_bytes: int) -> float:
    return round(n_bytes / 2 ** 30, 2)


# ------------------------------------------------------------------------------------------ training
def model_or_row(kind: str, family: str, impl: str, build) -> tuple[torch.nn.Module | None, list[dict]]:
    """(build(), []), or (None, [its row]) when the family's kernels are missing here (skipped) or it cannot build
    (failed): a family that cannot run here is a row, not a crash."""
    missing = missing_kernels(family, impl)
    if missing:
        return None, [row(kind, family, impl, status="skipped", note=missing)]
    try:
        return build(), []
    except Exception as err:  # noqa: BLE001
        return None, [failure_row(kind, family, impl, err)]


def compile_settings() -> str:
    """The GDN2_TRITON_* switches that change the first step (utils.py): autotuning and parallel compiles."""
    from gdn2.ops.triton import utils

    if utils.INTERPRET:
        return "Triton interpreter"
    return (f"autotune {'on' if utils.AUTOTUNE else 'off'} ({utils.TUNE_WARMUP_MS},{utils.TUNE_REP_MS} ms); "
            f"parallel compile {'on' if utils.PARALLEL_COMPILE else 'off'}")


def run_note(impl: str, model: torch.nn.Module) -> str:
    """A training row's note: our kernels' compile switches (ours only: fla tunes its own kernels) and the parameter
    count ('1,450.1M parameters'; the optimizer keeps 16 bytes per parameter: fp32 weight, gradient, two moments)."""
    params = f"{sum(p.numel() for p in model.parameters()) / 1e6:,.1f}M parameters"
    return f"{compile_settings()}; {params}" if impl.startswith("ours") else params


RECOMPUTE = ("none", "chunk", "blocks")    # --recompute: GDN2ForCausalLM's switches, see train_rows


def checked_loss(loss: torch.Tensor, steps: int) -> float:
    """The last timed step's loss as a float (read after the timing); a non-finite one fails the row, since its
    tokens/s would time a broken step (random init starts near ln(vocabulary))."""
    value = float(loss)
    if not math.isfinite(value):
        raise FloatingPointError(f"non-finite training loss ({value}) after {steps} steps")
    return value


def train_rows(family: str, impl: str, shapes, steps: int, paper: dict, profile: bool,
               recompute: str, recompute_layers: int | None = None, compile_ahead: bool = True) -> list[dict]:
    """Training rows of one model at each shape. recompute (GDN2ForCausalLM only): 'chunk' recomputes the chunk
    operator's intermediates in the backward pass (impl ours-recompute-chunk; in the first recompute_layers mixers
    only when given: ours-recompute-chunk-<layers>), 'blocks' whole blocks (ours-recompute-
    blocks), 'none' keeps everything. compile_ahead (our models): before each shape's first step, one throwaway
    pass inside gdn2's compile_step compiles the step's kernels all at once; the first step's time includes it."""
    from gdn2.ops.triton.compile_ahead import compile_step, counting_compiles

    rows = []
    model, refused = model_or_row("train", family, impl, lambda: build_model(family, impl).train())
    if model is None:
        return refused
    if recompute != "none" and (family, impl) == ("gdn2", "ours"):
        if recompute == "chunk":
            model.chunk_recompute_enable(layers=recompute_layers)
        else:
            model.gradient_checkpointing_enable()
        impl = f"{impl}-recompute-{recompute}" + ("" if recompute_layers is None else f"-{recompute_layers}")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    for T, B in shapes:
        ids = torch.randint(0, vocab(), (B, T), device=RUN["device"])

        def forward_loss():
            with torch.autocast(RUN["device"], dtype=torch.bfloat16):
                return loss_of(model, ids)

        def step():
            loss = forward_loss()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        paper_value = paper.get((family, T, B))
        try:
            sync()
            start = time.perf_counter()
            ahead_of_time = compile_ahead and impl.startswith("ours")
            variants = compile_step(forward_loss, model.parameters()) if ahead_of_time else 0
            sync()
            ahead = time.perf_counter() - start
            with counting_compiles() as compiled:
                step()                               # first step: Triton autotuning and compiles included
                sync()
            first = time.perf_counter() - start
            ahead_note = (f"; compiled ahead: {variants} kernel variants in {ahead:.1f} s, {len(compiled)} compiled "
                          "in the first step") if variants else ""
            if impl.startswith("ours") and not compile_ahead:
                ahead_note = f"; compile-ahead off: {len(compiled)} kernel variants compiled in the first step"
            step()
            reset_peak()
            sync()
            start = time.perf_counter()
            for _ in range(steps):
                loss = step()
            sync()
            seconds = (time.perf_counter() - start) / steps
            final_loss = checked_loss(loss, steps + 2)
            rows.append(row("train", family, impl, seq_len=T, batch=B, tok_s=round(B * T / seconds),
                            ms=round(seconds * 1e3, 1), peak_gib=peak_gib(),
                            first_step_s=round(first, 1), paper_tok_s=paper_value,
                            note=f"{run_note(impl, model)}; last loss {final_loss:.3f}{ahead_note}"))
            if profile:
                profile_step(step, f"{family} {impl} train {T}x{B}", model, ids, opt)
        except Exception as err:  # noqa: BLE001 - out of memory or a failing model: a row, and the run goes on
            rows.append(failure_row("train", family, impl, err, seq_len=T, batch=B, paper_tok_s=paper_value))
            opt.zero_grad(set_to_none=True)
            free()
        print_row(rows[-1])
    free(model, opt)
    return rows


def profile_step(step, title: str, model, ids, opt) -> None:
    """One training step under torch.profiler: the top ops by CUDA time, then peak memory by phase."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        sync()
    print(f"\n== profile: {title} (one step) ==")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60))
    phases = []
    reset_peak()
    base = torch.cuda.memory_allocated()
    with torch.autocast(RUN["device"], dtype=torch.bfloat16):
        loss = loss_of(model, ids)
    sync()
    phases.append(("forward (activations kept)", torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()))
    reset_peak()
    loss.backward()
    sync()
    phases.append(("backward", torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()))
    reset_peak()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    phases.append(("optimizer step", torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()))
    print(f"memory at the start of the step: {gib(base)} GiB (weights, optimizer states)")
    for name, peak, after in phases:
        print(f"  {name:28s} peak {gib(peak):7.2f} GiB   after {gib(after):7.2f} GiB")


# ------------------------------------------------------------------------------------------ inference
def inference_model(family: str, impl: str) -> torch.nn.Module:
    from baselines.common import keep_fp32

    return keep_fp32(build_model(family, impl).to(torch.bfloat16)).eval()


@torch.no_grad()
def prefill_rows(family: str, impl: str, contexts) -> list[dict]:
    model, refused = model_or_row("prefill", family, impl, lambda: inference_model(family, impl))
    if model is None:
        return refused
    rows = []
    for T in contexts:
        ids = torch.randint(0, vocab(), (1, T), device=RUN["device"])
        try:
            model(input_ids=ids[:, :min(T, 1024)], use_cache=True, logits_to_keep=1)     # compile / autotune
            model(input_ids=ids, use_cache=True, logits_to_keep=1)
            sync()
            reset_peak()
            times = []
            for _ in range(3):
                start = time.perf_counter()
                out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
                sync()
                times.append(time.perf_counter() - start)
                del out
            ms = sorted(times)[1] * 1e3
            rows.append(row("prefill", family, impl, context=T, batch=1, ms=round(ms, 2), tok_s=round(T / ms * 1e3),
                            peak_gib=peak_gib()))
        except Exception as err:  # noqa: BLE001
            rows.append(failure_row("prefill", family, impl, err, context=T, batch=1))
            free()
        print_row(rows[-1])
    free(model)
    return rows


@torch.no_grad()
def decode_rows(family: str, impl: str, contexts, batches, steps: int) -> list[dict]:
    """Greedy decoding after a prefill of `context` tokens per row: the plain step (one forward per token), and for
    recurrent caches the static CUDA-graph step, whose tokens must equal the plain step's."""
    from harness.graph_decode import StaticStep, static_step_possible

    model, refused = model_or_row("decode", family, impl, lambda: inference_model(family, impl))
    if model is None:
        return refused
    rows = []
    for B in batches:
        for T in contexts:
            ids = torch.randint(0, vocab(), (B, T), device=RUN["device"])
            try:
                reset_peak()
                cache = None
                for start in range(0, T, PREFILL_SEGMENT):     # segments, as EvalModel prefills: bounded memory
                    out = model(input_ids=ids[:, start:start + PREFILL_SEGMENT], past_key_values=cache,
                                use_cache=True, logits_to_keep=1)
                    cache = out.past_key_values
                first = out.logits[:, -1].argmax(-1)
                del out
                static = StaticStep(model, cache) if static_step_possible(cache) else None
                plain_decode(model, cache, first, 2)          # the one-token kernels compile outside the timing
                plain_tokens, seconds = plain_decode(model, cache, first, steps)
                rows.append(row("decode", family, impl, context=T, batch=B, tok_s=round(B * steps / seconds),
                                ms=round(seconds / steps * 1e3, 3), peak_gib=peak_gib()))
                print_row(rows[-1])
                if static is not None:
                    if RUN["device"] == "cuda":
                        static.capture()
                    graph_tokens, seconds = graph_decode(static, first, steps)
                    same = graph_tokens == plain_tokens
                    rows.append(row("decode", family, f"{impl}-graph", context=T, batch=B,
                                    tok_s=round(B * steps / seconds), ms=round(seconds / steps * 1e3, 3),
                                    peak_gib=peak_gib(),
                                    status="ok" if same else "tokens differ",
                                    note="greedy tokens equal the plain step's" if same else
                                    f"{sum(a != b for a, b in zip(graph_tokens, plain_tokens, strict=False))} of "
                                    f"{len(plain_tokens)} rows differ from the plain step"))
                    print_row(rows[-1])
                del cache, static
                free()
            except Exception as err:  # noqa: BLE001
                rows.append(failure_row("decode", family, impl, err, context=T, batch=B))
                print_row(rows[-1])
                free()
    free(model)
    return rows


def plain_decode(model, cache, first: torch.Tensor, steps: int) -> tuple[list[list[int]], float]:
    """(greedy tokens per row, seconds) of `steps` one-token forward calls; the cache is advanced on a copy."""
    import copy

    cache = copy.deepcopy(cache)
    tokens, nxt = [first], first
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1)
        tokens.append(nxt)
    sync()
    seconds = time.perf_counter() - start
    return torch.stack(tokens, 1).tolist(), seconds


def graph_decode(static, first: torch.Tensor, steps: int) -> tuple[list[list[int]], float]:
    tokens, nxt = [first], first
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        static.ids.copy_(nxt[:, None])
        nxt = static.run().argmax(-1)
        tokens.append(nxt)
    sync()
    seconds = time.perf_counter() - start
    return torch.stack(tokens, 1).tolist(), seconds


# ------------------------------------------------------------------------------------------ batched evaluation
@torch.no_grad()
def eval_rows(family: str, lengths, samples: int, batch_sizes, new_tokens: int) -> list[dict]:
    """EvalModel on synthetic RULER-like requests (prompts of 0.9 L..L tokens, greedy generation of new_tokens) and
    lm-eval-like scoring requests (512 context + 8 continuation tokens): wall time at batch 1 and batch N, outputs
    compared."""
    from gdn2 import GDN2ForCausalLM
    from harness.model import EvalModel

    lm = inference_model(family, "ours")
    # as the registry's loaders set it: our recurrent models mask left padding (batched prefill on CUDA)
    masks = lm.masks_left_padding if hasattr(lm, "masks_left_padding") else isinstance(lm, GDN2ForCausalLM)
    model = EvalModel(name=f"{family}-1.3B-random", family=family, lm=lm, tokenizer=None,
                      device=torch.device(RUN["device"]), dtype=torch.bfloat16, source="random init",
                      backend="bench", state_floats=0, masks_left_padding=masks)
    g = torch.Generator().manual_seed(0)
    rows = []
    for L in lengths:
        prompts = [torch.randint(5, vocab(), (int(L * (0.9 + 0.1 * i / samples)),), generator=g).tolist()
                   for i in range(samples)]
        reference = None
        for size in batch_sizes:
            sync()
            start = time.perf_counter()
            out = model.generate_ids_many(prompts, new_tokens, batch_size=size)
            sync()
            seconds = time.perf_counter() - start
            reference = out if reference is None else reference
            same = sum(a == b for a, b in zip(out, reference, strict=False))
            rows.append(row("eval-generate", family, f"batch {size}", context=L, batch=size,
                            tok_s=round(sum(len(p) + new_tokens for p in prompts) / seconds), ms=round(seconds * 1e3),
                            note=f"{samples} prompts, {new_tokens} new tokens; {same}/{samples} outputs equal "
                                 f"batch {batch_sizes[0]}'s"))
            print_row(rows[-1])
    requests = [(torch.randint(5, vocab(), (520,), generator=g).tolist(), 512) for _ in range(4 * samples)]
    reference = None
    for size in batch_sizes:
        sync()
        start = time.perf_counter()
        out = model.token_logprobs_many(requests, batch_size=size)
        sync()
        seconds = time.perf_counter() - start
        sums = [float(lp.sum()) for lp, _ in out]
        reference = sums if reference is None else reference
        worst = max(abs(a - b) / max(abs(b), 1e-9) for a, b in zip(sums, reference, strict=False))
        rows.append(row("eval-loglikelihood", family, f"batch {size}", context=520, batch=size,
                        tok_s=round(520 * len(requests) / seconds), ms=round(seconds * 1e3),
                        note=f"{len(requests)} requests; largest relative difference to batch {batch_sizes[0]}: "
                             f"{worst:.1e}"))
        print_row(rows[-1])
    free(model, lm)
    return rows


def autotune_winners() -> dict[str, dict[str, str]]:
    """{kernel: {autotune key: the config the autotuner picked}} of the GDN-2 chunk kernels tuned in this process
    (empty without autotuning: the interpreter or GDN2_TRITON_AUTOTUNE=0)."""
    from gdn2.ops.triton.chunk import CHUNK_KERNELS
    from gdn2.ops.triton.utils import config_name

    return {name: {str(key): config_name(config) for key, config in kernel.cache.items()}
            for name, kernel in CHUNK_KERNELS.items() if getattr(kernel, "cache", None)}


# ------------------------------------------------------------------------------------------ rows, CSV, plot
RUN = {}


def row(kind: str, family: str, impl: str, **values) -> dict:
    out = {c: "" for c in COLUMNS}
    out.update(card=RUN.get("card", ""), date=RUN.get("date", ""), software=RUN.get("software", ""), kind=kind,
               family=family, impl=impl, status="ok")
    out.update({k: ("" if v is None else v) for k, v in values.items()})
    return out


def failure_row(kind: str, family: str, impl: str, err: BaseException, **values) -> dict:
    """A row for a measurement that failed: status oom (out of memory) or error (traceback printed)."""
    oom = isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()
    if not oom:
        traceback.print_exception(type(err), err, err.__traceback__, limit=-6)
    return row(kind, family, impl, status="oom" if oom else "error",
               note=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:240], **values)


def print_row(r: dict) -> None:
    shape = f"{r['seq_len']}x{r['batch']}" if r["kind"] == "train" else f"ctx {r['context']} B {r['batch']}"
    extra = f" (paper {r['paper_tok_s']})" if r.get("paper_tok_s") not in ("", None) else ""
    print(f"{r['kind']:18s} {r['family']:15s} {r['impl']:11s} {shape:18s} tok/s {r['tok_s']!s:>9s}{extra}  "
          f"ms {r['ms']!s:>8s}  peak {r['peak_gib']!s:>6s} GiB  first {r['first_step_s']!s:>5s}s  {r['status']}"
          f"{'  ' + r['note'] if r['note'] else ''}", flush=True)


def paper_numbers() -> dict:
    """(family, seq_len, batch) -> the paper's training tokens/s (Figure 2)."""
    out = {}
    if not PAPER_CSV.is_file():
        return out
    names = {v: k for k, v in PAPER_NAMES.items()}
    with open(PAPER_CSV) as f:
        for r in csv.DictReader(f):
            family = names.get(r["model"])
            for T, B in TRAIN_SHAPES:
                value = r.get(f"tokens_per_s_{T // 1024}kx{B}")
                if family and value:
                    out[(family, T, B)] = int(value)
    return out


def software() -> str:
    parts = [f"torch {torch.__version__}"]
    for name in ("triton", "fla", "mamba_ssm", "transformers"):
        try:
            module = __import__(name)
            parts.append(f"{name} {getattr(module, '__version__', '?')}")
        except Exception:
            continue
    return "; ".join(parts)


def train_bars(ax, rows: list[dict], shapes: list[tuple[int, int]], key: str, with_paper: bool) -> None:
    """Grouped bars of training rows' `key` ('tok_s' in thousands, or 'peak_gib') per (seq_len, batch) shape, one bar
    per (family, impl), and the paper's tokens/s per family when with_paper."""
    train = [r for r in rows if r["kind"] == "train" and r["status"] == "ok"]
    series = sorted({(r["family"], r["impl"]) for r in train})
    if with_paper:
        series += [(f, "paper") for f in sorted({r["family"] for r in train if r["paper_tok_s"] not in ("", None)})]
    width = 0.8 / max(len(series), 1)
    scale = 1e3 if key == "tok_s" else 1.0
    for i, (family, impl) in enumerate(series):
        column = "paper_tok_s" if impl == "paper" else key
        values = []
        for T, B in shapes:
            match = [r for r in train if r["family"] == family and (impl == "paper" or r["impl"] == impl)
                     and int(r["seq_len"]) == T and int(r["batch"]) == B and r[column] not in ("", None)]
            values.append(float(match[0][column]) / scale if match else 0)
        ax.bar([x + i * width for x in range(len(shapes))], values, width, label=f"{family} ({impl})",
               hatch="//" if impl == "paper" else None)
    ax.set_xticks([x + 0.4 for x in range(len(shapes))], [f"{T // 1024}Kx{B}" for T, B in shapes])
    if series:
        ax.legend(fontsize=6)


def write_plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not importable: no plot (redraw with --merge on a machine that has it)")
        return
    decode_batches = sorted({int(r["batch"]) for r in rows if r["kind"] == "decode" and r["batch"] != ""})
    panels = [("prefill", "ms", None, "prefill latency, ms (batch 1)"),
              ("prefill", "peak_gib", None, "prefill peak memory, GiB (batch 1)")]
    panels += [("decode", "tok_s", b, f"decode tokens/s, batch {b}") for b in decode_batches]
    fig, axes = plt.subplots(1, 2 + len(panels), figsize=(6 * (2 + len(panels)), 5))
    train = [r for r in rows if r["kind"] == "train" and r["status"] == "ok"]
    measured = sorted({(int(r["seq_len"]), int(r["batch"])) for r in train} - set(TRAIN_SHAPES))
    shapes = list(TRAIN_SHAPES) + measured                  # Figure 2's, then any other measured shape
    train_bars(axes[0], rows, shapes, "tok_s", with_paper=True)
    axes[0].set_ylabel("training K tokens/s")
    axes[0].set_title("training (bf16 autocast, fused AdamW); paper: hybrid models")
    train_bars(axes[1], rows, shapes, "peak_gib", with_paper=False)
    axes[1].set_ylabel("peak GiB")
    axes[1].set_title("training peak memory")
    for ax, (kind, key, batch, label) in zip(axes[2:], panels, strict=False):
        for family, impl in sorted({(r["family"], r["impl"]) for r in rows if r["kind"] == kind}):
            points = sorted((int(r["context"]), float(r[key])) for r in rows
                            if r["kind"] == kind and r["status"] == "ok" and (r["family"], r["impl"]) == (family, impl)
                            and (batch is None or int(r["batch"]) == batch) and r[key] != "")
            if points:
                ax.plot(*zip(*points, strict=False), marker="o", label=f"{family} {impl}")
        ax.set_xscale("log", base=2)
        if all(y > 0 for line in ax.get_lines() for y in line.get_ydata()):
            ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_title(label)
        if ax.get_lines():
            ax.legend(fontsize=6)
    card = rows[0]["card"] if rows else ""
    dates = sorted({r["date"] for r in rows})
    fig.suptitle(f"1.3B models, random init, {card}, {', '.join(dates)}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def read_rows(paths) -> list[dict]:
    rows = []
    for p in paths:
        with open(p) as f:
            rows += list(csv.DictReader(f))
    return rows


def save(rows: list[dict], out: Path, plot: bool = True) -> None:
    """<out>/models-<card>.csv (and its plot): rewritten after every piece of a run, so a run cut short keeps its
    rows."""
    if not rows:
        return
    cards = sorted({r["card"] for r in rows})
    if len(cards) != 1:
        raise SystemExit(f"error: rows of {len(cards)} cards ({cards}); merge the runs of one card at a time")
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"models-{cards[0]}"
    write_csv(rows, f"{stem}.csv")
    if plot:
        print(f"wrote {stem}.csv ({len(rows)} rows)")
        write_plot(rows, Path(f"{stem}.png"))


# ------------------------------------------------------------------------------------------ main
def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        try:
            T, B = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"error: --shapes takes SEQxBATCH[,SEQxBATCH...], e.g. 2048x8; got {item!r}") from None
        shapes.append((T, B))
    return shapes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="train,prefill,decode",
                        help="comma list of train, prefill, decode, eval (default: train,prefill,decode)")
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma list of {', '.join(FAMILIES)}")
    parser.add_argument("--impls", default="ours,fla",
                        help="comma list of ours, fla, fla-matched (fla's model with its MLP widened to our GDN-2's "
                             "parameter count; Gated DeltaNet and KDA); fla's only where it imports")
    parser.add_argument("--quick", action="store_true",
                        help="fewer points: train 2Kx8 and 16Kx1, prefill 1K/16K, decode 1K/16K, 3 timed steps")
    parser.add_argument("--shapes", help="training SEQxBATCH list, e.g. 2048x8,16384x1 (default: Figure 2's four)")
    parser.add_argument("--contexts", help="comma list of contexts for prefill and decode")
    parser.add_argument("--batches", default="1,32", help="decode batch sizes")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per shape")
    parser.add_argument("--profile", action="store_true", help="torch.profiler table and memory by phase, per shape")
    parser.add_argument("--recompute", choices=RECOMPUTE, default="none",
                        help="GDN2ForCausalLM in training: recompute the chunk operator's intermediates ('chunk') or "
                             "whole blocks ('blocks') in the backward pass")
    parser.add_argument("--recompute-layers", type=int, metavar="N",
                        help="with --recompute chunk: only the first N GDN-2 mixers recompute (memory for time)")
    parser.add_argument("--no-compile-ahead", action="store_true",
                        help="our models: compile each kernel when first launched instead of all at once before the "
                             "first training step (gdn2/ops/triton/compile_ahead.py)")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "results" / "bench"))
    parser.add_argument("--merge", nargs="+", metavar="CSV", help="merge CSVs of one card and redraw the plot")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny configs at tiny shapes, on the GPU or the CPU: checks every code path in seconds")
    args = parser.parse_args(argv)
    if args.recompute_layers is not None and args.recompute != "chunk":
        parser.error("--recompute-layers goes with --recompute chunk")
    if args.merge:
        save(read_rows(args.merge), Path(args.out))
        return 0
    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("error: bench_models needs a CUDA GPU (use --merge to combine CSVs elsewhere; --smoke runs "
                         "every code path on tiny models, also on the CPU)")
    only = set(args.only.split(","))
    unknown = only - {"train", "prefill", "decode", "eval"}
    families = args.families.split(",")
    bad = [f for f in families if f not in FAMILIES]
    if unknown or bad:
        raise SystemExit(f"error: unknown --only {sorted(unknown)} or --families {bad}")
    requested = args.impls.split(",")
    if set(requested) - {"ours", "fla", "fla-matched"}:
        raise SystemExit(f"error: unknown --impls {requested}; choose from ours, fla, fla-matched")
    with_fla = bool({"fla", "fla-matched"} & set(requested)) and fla_available()
    shapes = parse_shapes(args.shapes) if args.shapes else (
        [TRAIN_SHAPES[0], TRAIN_SHAPES[-1]] if args.quick else list(TRAIN_SHAPES))
    contexts = [int(c) for c in args.contexts.split(",")] if args.contexts else None
    steps = 3 if args.quick else args.steps
    batches = [int(b) for b in args.batches.split(",")]
    eval_lengths, eval_samples, decode_steps = ((1024, 2048), 16, DECODE_STEPS) if args.quick else \
        ((1024, 2048, 4096, 8192), 32, DECODE_STEPS)
    if args.smoke:
        shapes, contexts, steps, batches = [(64, 2), (128, 1)], [64, 128], 1, [1, 2]
        eval_lengths, eval_samples, decode_steps = (64,), 3, 20
    RUN.update(device="cuda" if torch.cuda.is_available() else "cpu", smoke=args.smoke,
               date=datetime.date.today().isoformat(), software=software())
    RUN["card"] = (torch.cuda.get_device_name().replace(" ", "-") if RUN["device"] == "cuda" else "cpu") + \
        ("-smoke" if args.smoke else "")
    print(f"# {RUN['card']} {RUN['date']} {RUN['software']}; fla models: {'yes' if with_fla else 'no'}", flush=True)
    paper = paper_numbers()
    out = Path(args.out)
    rows = []
    for family in families:
        for impl in impls_of(family, requested, with_fla):
            if "train" in only:
                rows += train_rows(family, impl, shapes, steps, paper, args.profile, args.recompute,
                                   args.recompute_layers, compile_ahead=not args.no_compile_ahead)
                save(rows, out, plot=False)
            if "prefill" in only:
                rows += prefill_rows(family, impl, contexts or ((1024, 16384) if args.quick else PREFILL_CONTEXTS))
                save(rows, out, plot=False)
            if "decode" in only:
                rows += decode_rows(family, impl, contexts or ((1024, 16384) if args.quick else DECODE_CONTEXTS),
                                    batches, decode_steps)
                save(rows, out, plot=False)
        if "eval" in only:
            rows += eval_rows(family, eval_lengths, samples=eval_samples, batch_sizes=(1, 8, 32), new_tokens=32)
            save(rows, out, plot=False)
    save(rows, out)
    winners = autotune_winners()
    if winners:
        path = out / f"autotune-{RUN['card']}.json"
        path.write_text(json.dumps(winners, indent=1) + "\n")
        print(f"autotune winners: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
