"""Compile every Triton kernel a step launches, all at once, before the step runs.

Without it, a fresh machine's first training step compiles each kernel when it is first launched, one after another:
an autotuned kernel's configs compile in parallel (utils.compile_in_parallel), but kernel after kernel, forward then
backward. Inside ``compile_ahead()`` a launch runs nothing: its compile (every fitting config of an autotuned kernel)
goes to a thread pool and the Python code goes on, so one throwaway forward and backward pass inside the context
submits the compiles of the whole step, and they run side by side (Triton's compiler releases the GIL; ptxas runs as
its own process). On exit the context waits for them. The real first step then finds every kernel compiled and only
times the autotuned kernels' configs.

Inside the context the kernels write nothing: the tensors they would fill stay uninitialised, so nothing computed there
may be used. ``compile_step`` is the usual use: a throwaway forward and backward, the gradients set to None after.

A launch keeps only what selects the compiled variant: each tensor argument becomes its dtype and address (the
address decides the 16-byte alignment specialization), the other arguments stay as passed. The pass's activations are
freed as usual while the compiles run. Under TRITON_INTERPRET=1 nothing is compiled and the context does nothing;
``GDN2_TRITON_COMPILE_AHEAD=0`` (read at import time) turns it off too, leaving each compile to the first launch.
"""
from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor

import torch
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from .utils import INTERPRET, configs_that_fit

ENABLED = os.environ.get("GDN2_TRITON_COMPILE_AHEAD", "1") != "0"


class LaunchArg:
    """A tensor argument as a compile sees it: dtype and address (Triton specializes on 16-byte alignment)."""

    __slots__ = ("dtype", "address")

    def __init__(self, tensor: torch.Tensor):
        self.dtype = tensor.dtype
        self.address = tensor.data_ptr()

    def data_ptr(self) -> int:
        return self.address


def launch_args(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """(args, kwargs) with every tensor replaced by its LaunchArg; grid and warmup dropped (set by the compile)."""
    def freeze(value):
        return LaunchArg(value) if isinstance(value, torch.Tensor) else value
    kept = {k: freeze(v) for k, v in kwargs.items() if k not in ("grid", "warmup")}
    return tuple(freeze(a) for a in args), kept


def variant_key(fn, args: tuple, kwargs: dict) -> tuple:
    """What may select a different compiled variant of fn: the kernel, each tensor's dtype and 16-byte alignment, every
    other argument's value. Finer than Triton's own key (it specializes an integer only on being 1 or a multiple of
    16), so two launches with one key always share a variant; the 18 layers of a model share theirs."""
    def part(value):
        if isinstance(value, LaunchArg):
            return (value.dtype, value.address % 16 == 0)
        try:
            hash(value)
            return value
        except TypeError:
            return repr(value)
    return (id(fn), tuple(part(a) for a in args), tuple(sorted((k, part(v)) for k, v in kwargs.items())))


def fitting_configs(tuner: Autotuner, args: tuple, kwargs: dict) -> list:
    """The configs the autotuner would time for this launch: those that fit it (utils.tuned's `fits`), all of them
    for an autotuner built elsewhere."""
    if getattr(tuner, "fits", None) is None:
        return list(tuner.configs)
    named = {**dict(zip(tuner.arg_names, args, strict=False)), **kwargs}
    return configs_that_fit(tuner.configs, tuner.fits, tuner.dtype_arg, tuner.fits_args, named)


class CompileQueue:
    """Compiles each distinct launch variant once, in a thread pool, on the CUDA device current at creation."""

    def __init__(self, jit_run, threads: int):
        self.jit_run = jit_run                         # JITFunction.run as Triton defines it
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="triton-compile")
        self.jobs = {}
        self.device = torch.cuda.current_device()

    def compile(self, fn: JITFunction, args: tuple, kwargs: dict) -> None:
        """One variant compiled, not run: Triton's own launch with warmup=True, on the queue's device."""
        with torch.cuda.device(self.device):
            self.jit_run(fn, *args, grid=None, warmup=True, **kwargs)

    def submit(self, fn: JITFunction, args: tuple, kwargs: dict) -> None:
        args, kwargs = launch_args(args, kwargs)
        key = variant_key(fn, args, kwargs)
        if key not in self.jobs:
            self.jobs[key] = self.pool.submit(self.compile, fn, args, kwargs)

    def wait(self) -> None:
        """Wait for every compile; re-raises the first failure."""
        try:
            for job in self.jobs.values():
                job.result()
        finally:
            self.pool.shutdown(wait=True)


@contextlib.contextmanager
def compile_ahead(threads: int | None = None):
    """Inside: a Triton kernel launch (plain or autotuned) is not run; its compiles are queued in a pool of `threads`
    (default: the CPU count), each distinct variant once. On exit: waits for them (a failed compile raises here).
    Yields the queue (its `.jobs` holds one compile per variant). Does nothing (yields None) under TRITON_INTERPRET=1
    or without CUDA, or with GDN2_TRITON_COMPILE_AHEAD=0."""
    if INTERPRET or not ENABLED or not torch.cuda.is_available():
        yield None
        return
    jit_run, tuner_run = JITFunction.run, Autotuner.run
    queue = CompileQueue(jit_run, threads or os.cpu_count() or 1)

    def queued_jit_run(self, *args, grid, warmup, **kwargs):
        if warmup:                                     # an explicit warmup compiles now, as it asks
            return jit_run(self, *args, grid=grid, warmup=True, **kwargs)
        queue.submit(self, args, kwargs)
        return None

    def queued_tuner_run(self, *args, **kwargs):       # every config the autotuner would time, as it would launch it
        for config in fitting_configs(self, args, kwargs):
            self.fn.run(*args, **kwargs, **config.all_kwargs())
        return None

    JITFunction.run, Autotuner.run = queued_jit_run, queued_tuner_run
    try:
        yield queue
    finally:
        JITFunction.run, Autotuner.run = jit_run, tuner_run
        queue.wait()


@contextlib.contextmanager
def counting_compiles():
    """Yields a list that collects the name of every kernel variant Triton compiles (or loads from its disk cache)
    while inside: after compile_ahead, a step that finds everything compiled leaves it empty."""
    from triton import knobs

    compiled = []
    previous = knobs.runtime.jit_post_compile_hook

    def hook(*, fn, **kwargs):
        compiled.append(fn.name)
        return previous(fn=fn, **kwargs) if previous else None
    knobs.runtime.jit_post_compile_hook = hook
    try:
        yield compiled
    finally:
        knobs.runtime.jit_post_compile_hook = previous


def compile_step(run_loss, parameters, threads: int | None = None) -> int:
    """Compile the kernels of one training step ahead: run_loss() (a forward pass returning a scalar loss, autocast
    inside it if the step uses one) and its backward inside compile_ahead, then every parameter's gradient set to None.
    Returns the number of kernel variants compiled (0 where nothing compiles). Nothing else changes: no optimizer
    step, and the loss is dropped."""
    with compile_ahead(threads) as queue:
        run_loss().backward()
    for p in parameters:
        p.grad = None
    return 0 if queue is None else len(queue.jobs)
