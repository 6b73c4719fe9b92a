"""Shared plumbing for the GDN-2 Triton kernels: launch configs, sequence/chunk bookkeeping, small helpers.

Launch configs
--------------
On a GPU every kernel is wrapped in ``triton.autotune`` over a short list of configs (``*_CONFIGS`` in each kernel
file). Under ``TRITON_INTERPRET=1`` (CPU, CI) the autotuner cannot run (it needs a driver to time), so every kernel is
launched with one fixed config (``*_INTERPRET`` next to the list). ``INTERPRET`` is read once, at import time: set the
variable before importing this package (tests/conftest.py does).

``GDN2_TRITON_AUTOTUNE=0`` (read at import time too) skips autotuning on the GPU as well: each kernel then launches
its first config that fits the input dtype (the "default" config, first in each ``*_CONFIGS`` list), so a quick run
compiles one variant per kernel instead of all of them. Autotuning stays the default (benchmarks).

Autotuned kernels compile all their configs at once, in a thread pool, before the autotuner times them one by one
(it would compile each on its first timing run; Triton's compiler releases the GIL). On a freshly started H100
(empty Triton cache) the 1.3B model's first training step at 2K x 8 took 39.0 s this way, with the timing budget
below (docs/efficiency.md, "Training the 1.3B GDN-2").
``GDN2_TRITON_PARALLEL_COMPILE=0`` (read at import time) leaves every compile to the autotuner. Best effort: a failure
leaves the compiles to the autotuner.

The autotuner times each config with ``triton.testing.do_bench`` for ``GDN2_TRITON_TUNE_MS`` = "WARMUP,REP"
milliseconds of warm-up and of timed repetitions (default "5,25"; Triton's own default is "25,100"). Every kernel
here runs for 0.01-2 ms per call at the shapes that matter, so 25 ms are still 12 or more timed calls of each config,
at a fifth of Triton's default time per config.

Sequences
---------
All kernels see packed tokens: [TT, H, K] with TT = B*T. A padded batch is treated as B packed sequences of length T,
so there is one code path for both layouts. ``chunk_indices[c] = (sequence n, chunk i within n)`` drives the
chunk-parallel kernels; ``chunk_offsets[n]`` is the first global chunk of sequence n (where its per-chunk states go).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.testing

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE = os.environ.get("GDN2_TRITON_AUTOTUNE", "1") != "0"
PARALLEL_COMPILE = os.environ.get("GDN2_TRITON_PARALLEL_COMPILE", "1") != "0"


def _tune_ms(text: str) -> tuple[int, int]:
    """'WARMUP,REP' (milliseconds, positive integers) -> (warmup, rep); a clear error for anything else."""
    try:
        warmup, rep = (int(part) for part in text.split(","))
    except ValueError:
        warmup = rep = 0
    if warmup <= 0 or rep <= 0:
        raise ValueError(f"GDN2_TRITON_TUNE_MS must be 'WARMUP,REP' in positive milliseconds, e.g. '5,25' (Triton's "
                         f"default is '25,100'); got {text!r}")
    return warmup, rep


TUNE_WARMUP_MS, TUNE_REP_MS = _tune_ms(os.environ.get("GDN2_TRITON_TUNE_MS", "5,25"))


def _time_config(kernel_call, quantiles):
    """The autotuner's timing of one config: do_bench with the GDN2_TRITON_TUNE_MS budget."""
    return triton.testing.do_bench(kernel_call, warmup=TUNE_WARMUP_MS, rep=TUNE_REP_MS, quantiles=quantiles)
# The chunk length C and the sub-chunk length of the diagonal blocks: every chunk kernel is written for these (its
# tiles are tl.arange(0, 64) / tl.arange(0, 16)), the host code allocates and launches with the names.
CHUNK = 64
SUB = 16
SUBS_PER_CHUNK = CHUNK // SUB
L2NORM_EPS = 1e-6


def _patch_interpreter_scalar_index():
    """Triton 3.6's interpreter turns a loaded scalar into a numpy array of shape (1,) and calls int() on it when it
    is a loop bound (range(n_chunks)); numpy >= 2.3 refuses that. Re-register __index__ to take the single element.
    Only under TRITON_INTERPRET=1; compiled kernels are untouched."""
    import numpy as np
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    if not getattr(interpreter, "_gdn2_index_patch", False):
        interpreter._patch_lang_tensor = patched
        interpreter._gdn2_index_patch = True


if INTERPRET:
    _patch_interpreter_scalar_index()


class FixedLaunch:
    """Stands in for a triton.autotune object where no autotuning runs (the interpreter, or GDN2_TRITON_AUTOTUNE=0):
    launches ``fn`` with the first of ``configs`` that fits the dtype of argument ``dtype_arg`` and the key width K."""

    def __init__(self, fn, configs: list[triton.Config], fits, dtype_arg: str, fits_args: tuple = ()):
        self.fn = fn
        self.configs = list(configs)
        self.fits = fits
        self.dtype_arg = dtype_arg
        self.fits_args = fits_args

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            named = {**dict(zip(self.fn.arg_names, args, strict=False)), **kwargs}
            config = configs_that_fit(self.configs, self.fits, self.dtype_arg, self.fits_args, named)[0]
            meta = dict(config.kwargs)
            resolved = grid({**kwargs, **meta}) if callable(grid) else grid
            reg = {"maxnreg": config.maxnreg} if config.maxnreg else {}
            return self.fn[resolved](*args, **kwargs, **meta, num_warps=config.num_warps,
                                     num_stages=config.num_stages, **reg)
        return launch


def tuned(configs: list[triton.Config], key: list[str], interpret_config: triton.Config, fits=None,
          dtype_arg: str = "v", fits_args: tuple = (), restore_value: tuple = ()):
    """triton.autotune(configs, key) on a GPU; one fixed config under TRITON_INTERPRET=1 (interpret_config) or with
    GDN2_TRITON_AUTOTUNE=0 (the first config that fits the dtype).

    fits(config, dtype, K) -> bool drops configs that cannot run for the dtype of argument `dtype_arg` and the key
    width K (None for kernels without a K argument), plus the values of the launch arguments named in `fits_args`
    (e.g. fp32 tiles
    that overflow the 227 KiB of shared memory an H100 block may use; benchmarks/compile_check_sm90.py measures that
    without a GPU); the wrapper keeps it as `.fits` so the GPU check runs each config exactly on the dtypes it may be
    picked for. restore_value names the arguments a kernel updates in place: the autotuner restores them after each
    timed config (otherwise the timing runs would accumulate into them)."""
    fits = fits or (lambda config, dtype, K, *flags: True)

    def wrap(fn):
        if INTERPRET:
            launcher = FixedLaunch(fn, [interpret_config], lambda *a: True, dtype_arg)
        elif not AUTOTUNE:
            launcher = FixedLaunch(fn, configs, fits, dtype_arg, fits_args)
        else:
            prune = config_pruner(fn, fits, dtype_arg, fits_args, PARALLEL_COMPILE)
            launcher = triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune},
                                       restore_value=list(restore_value), do_bench=_time_config)(fn)
        launcher.fits = fits
        launcher.dtype_arg = dtype_arg
        launcher.fits_args = fits_args
        launcher.interpret_config = interpret_config
        launcher.gpu_configs = list(configs)        # the GPU's configs, also under the interpreter (check_bounds_cpu)
        return launcher
    return wrap


def configs_that_fit(configs, fits, dtype_arg: str, fits_args: tuple, named: dict) -> list:
    """The configs that fit a launch (its arguments by name; see tuned for fits, dtype_arg and fits_args), in their
    order; all of them if none does."""
    extra = [named[a] for a in fits_args]
    return [c for c in configs if fits(c, named[dtype_arg].dtype, named.get("K"), *extra)] or list(configs)


def config_pruner(fn, fits, dtype_arg: str, fits_args: tuple, parallel_compile: bool):
    """The autotuner's early_config_prune for fn: the configs that fit the launch (see tuned), all of them if none
    does; with parallel_compile, those configs are compiled at once before the autotuner times them. The autotuner
    calls it once per new key."""
    def prune(configs, named_args, **kwargs):
        kept = configs_that_fit(configs, fits, dtype_arg, fits_args, {**named_args, **kwargs})
        if parallel_compile:
            compile_in_parallel(fn, kept, named_args, kwargs)
        return kept
    return prune


def compile_in_parallel(fn, configs, named_args: dict, kwargs: dict) -> bool:
    """Compile fn (a triton.jit function) for each config with these launch arguments, all at once in a thread pool
    (triton.AsyncCompileMode), so the autotuner's timing runs find them compiled. Returns whether it did; any
    failure is reported once and leaves the compiles to the autotuner."""
    from concurrent.futures import ThreadPoolExecutor

    if len(configs) < 2:
        return False
    launch = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}    # the autotuner passes both on
    try:
        with ThreadPoolExecutor(min(len(configs), os.cpu_count() or 1)) as pool, triton.AsyncCompileMode(pool):
            for config in configs:
                fn.warmup(grid=(1,), **named_args, **launch, **config.all_kwargs())
        return True
    except Exception as err:  # noqa: BLE001 - best effort: the autotuner compiles what is missing
        _report_once(f"parallel compile of {getattr(fn, '__name__', fn)} failed ({type(err).__name__}: {err}); "
                     "the autotuner compiles its configs one by one")
        return False


@functools.lru_cache(maxsize=None)
def _report_once(message: str) -> None:
    import warnings

    warnings.warn(message, RuntimeWarning, stacklevel=3)


def dot_precision(dtype) -> str:
    """input_precision of the fp32-operand tl.dot calls of the intra-chunk pairwise products (fwd intra, bwd dqkg) and
    of the dA / dT path (backward kernels dqk, dav, dqkg): "ieee"
    (exact fp32 FMA, no tensor cores) when the inputs are fp32, "tf32" (tensor cores) otherwise: with tf32 on fp32
    inputs db came out just over the 2e-3 bound of the GPU check (docs/kernels.md#precision).
    The other kernels (wy, state, output, dlocal, dstate) always use SERIAL_PRECISION: IEEE products there would move
    the sequential kernels off the tensor cores (and, compiled for sm_90, spill tens of KiB per thread)."""
    return "ieee" if dtype == torch.float32 else "tf32"


SERIAL_PRECISION = "tf32"


def solve_precision(dtype) -> str:
    """The two [64, 64] products of dT = -A^T dA A^T (bwd dav): "ieee" for fp32 inputs, "tf32x3" otherwise (about
    fp32 accuracy on the tensor cores; the IEEE build of these products held [64, 64] FMA operand tiles in registers
    and spilled)."""
    return "ieee" if dtype == torch.float32 else "tf32x3"


def config_name(config: triton.Config) -> str:
    """'BK=16,w1,s1' (plus ',r128' for a register cap): how the check, the compile report and the timings name a
    launch config."""
    reg = f",r{config.maxnreg}" if config.maxnreg else ""
    return ",".join(f"{k}={v}" for k, v in config.kwargs.items()) + f",w{config.num_warps},s{config.num_stages}{reg}"


def pin_config(kernel, config: triton.Config | None):
    """Force an autotuned kernel onto one config (None restores the full list). Used by the GPU check script to run
    every config, not only the autotuner's winner."""
    if not hasattr(kernel, "_all_configs"):
        kernel._all_configs = list(kernel.configs)
    kernel.configs = list(kernel._all_configs) if config is None else [config]
    if hasattr(kernel, "cache"):
        kernel.cache.clear()


@functools.lru_cache(maxsize=64)
def _padded_layout(batch: int, length: int, device: torch.device):
    cu = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32)
    return _layout_from_cu(cu, device)


def _layout_from_cu(cu_cpu: torch.Tensor, device):
    lens = (cu_cpu[1:] - cu_cpu[:-1]).long()
    nchunks = (lens + CHUNK - 1) // CHUNK
    offsets = torch.zeros(len(lens) + 1, dtype=torch.int64)
    offsets[1:] = nchunks.cumsum(0)
    seq = torch.repeat_interleave(torch.arange(len(lens)), nchunks)
    local = torch.arange(int(offsets[-1])) - offsets[:-1].repeat_interleave(nchunks)
    indices = torch.stack([seq, local], 1).to(torch.int32).contiguous()
    return (cu_cpu.to(torch.int32).to(device), indices.to(device), offsets.to(torch.int32).to(device),
            int(offsets[-1]))


def sequence_layout(cu_seqlens: torch.Tensor | None, batch: int, length: int, device):
    """Returns (cu_seqlens int32 [N+1], chunk_indices int32 [NC, 2], chunk_offsets int32 [N+1], NC total chunks)."""
    if cu_seqlens is None:
        return _padded_layout(batch, length, torch.device(device))
    return _layout_from_cu(cu_seqlens.detach().to("cpu", torch.int64), device)


def block_sizes(K: int, V: int) -> tuple[int, int]:
    """(BK, BV) cap for the key / value blocks: 64, or the (power-of-two padded) dimension if smaller."""
    return min(64, triton.next_power_of_2(K)), min(64, triton.next_power_of_2(V))
