"""compile_ahead (gdn2/ops/triton/compile_ahead.py): which launches become compiles, and that none of them runs.

The compiles themselves need a GPU (benchmarks/check_fused_gpu.py checks there that a step after compile_step compiles
nothing new). Here the queue's compile is replaced by a recorder, and the context is made to believe CUDA is present,
so the interception runs as on a GPU: Triton's own JITFunction and Autotuner objects, launched as our code launches
them."""
import threading

import pytest
import torch
import triton
import triton.language as tl
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from gdn2.ops.triton import compile_ahead as ahead


def add_one(x_ptr, N, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < N) + 1, mask=i < N)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0, 1, 4, 8])
def test_launch_arg_specializes_as_its_tensor(dtype, offset):
    """Triton's own specializer gives the stand-in the type and alignment it gives the tensor."""
    tensor = torch.zeros(64, dtype=dtype)[offset:]
    for align in (True, False):
        assert native_specialize_impl(BaseBackend, ahead.LaunchArg(tensor), False, True, align) == \
            native_specialize_impl(BaseBackend, tensor, False, True, align)


def test_variant_key_shares_equal_launches_only():
    a, b = torch.zeros(32), torch.zeros(32)

    def key(*args, **kwargs):
        return ahead.variant_key("kernel", *ahead.launch_args(args, kwargs))

    assert key(a, 32, BLOCK=16) == key(b, 32, BLOCK=16)              # another layer's tensors, same variant
    assert key(a, 32, BLOCK=16) == key(a, 32, BLOCK=16, grid=(4,), warmup=False)
    assert key(a, 32, BLOCK=16) != key(a[1:], 32, BLOCK=16)          # 4-byte aligned only
    assert key(a, 32, BLOCK=16) != key(a.to(torch.bfloat16), 32, BLOCK=16)
    assert key(a, 32, BLOCK=16) != key(a, 33, BLOCK=16)
    assert key(a, 32, BLOCK=16) != key(a, 32, BLOCK=32)
    assert key(a, [1, 2]) == key(b, [1, 2])                          # an unhashable value keys by its repr


@pytest.fixture
def recorded(monkeypatch):
    """compile_ahead as on a GPU, with each queued compile recorded (with its thread) instead of run."""
    calls = []
    monkeypatch.setattr(ahead, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(ahead.CompileQueue, "compile",
                        lambda self, fn, args, kwargs: calls.append((fn, args, kwargs, threading.current_thread())))
    return calls


def test_plain_launches_queue_one_compile_per_variant_and_run_nothing(recorded):
    kernel = JITFunction(add_one)
    xs = [torch.zeros(16) for _ in range(3)]
    with ahead.compile_ahead(threads=2) as queue:
        for x in xs:                                   # three layers of one shape: one variant
            kernel[(1,)](x, 16, BLOCK=16)
        kernel[(1,)](xs[0], 16, BLOCK=32)
    assert JITFunction.run.__name__ == "run"                         # Triton's own run is back
    assert len(queue.jobs) == 2 and len(recorded) == 2
    assert all(torch.equal(x, torch.zeros(16)) for x in xs)          # no kernel ran
    fn, args, kwargs, thread = recorded[0]
    assert fn is kernel and isinstance(args[0], ahead.LaunchArg) and args[1] == 16
    assert all(set(kw) == {"BLOCK"} for _, _, kw, _ in recorded)     # grid and warmup left to the compile
    assert {kw["BLOCK"] for _, _, kw, _ in recorded} == {16, 32}
    assert all(t.name.startswith("triton-compile") for *_, t in recorded)


def test_autotuned_launch_queues_each_fitting_config(recorded):
    configs = [triton.Config({"BLOCK": 16}, num_warps=1), triton.Config({"BLOCK": 32}, num_warps=2),
               triton.Config({"BLOCK": 64}, num_warps=4)]
    tuner = triton.autotune(configs=configs, key=["N"])(JITFunction(add_one))
    assert isinstance(tuner, Autotuner)
    tuner.fits, tuner.dtype_arg, tuner.fits_args = (lambda c, dtype, K: c.kwargs["BLOCK"] >= 32), "x_ptr", ()
    x = torch.zeros(16)
    with ahead.compile_ahead(threads=2) as queue:
        tuner[(1,)](x, 16)
    assert ahead.Autotuner.run.__name__ == "run"
    assert sorted((kw["BLOCK"], kw["num_warps"]) for _, _, kw, _ in recorded) == [(32, 2), (64, 4)]
    assert len(queue.jobs) == 2 and not tuner.cache                  # nothing timed, nothing chosen
    assert torch.equal(x, torch.zeros(16))

    recorded.clear()
    del tuner.fits                                     # an autotuner built elsewhere: every config
    with ahead.compile_ahead(threads=1):
        tuner[(1,)](x, 16)
    assert sorted(kw["BLOCK"] for _, _, kw, _ in recorded) == [16, 32, 64]


def test_failed_compile_raises_on_exit(monkeypatch, recorded):
    def fail(self, fn, args, kwargs):
        raise RuntimeError("ptxas failed")
    monkeypatch.setattr(ahead.CompileQueue, "compile", fail)
    with pytest.raises(RuntimeError, match="ptxas failed"):
        with ahead.compile_ahead(threads=1):
            JITFunction(add_one)[(1,)](torch.zeros(16), 16, BLOCK=16)
    assert ahead.JITFunction.run.__name__ == "run"


def test_compile_step_without_cuda_is_a_plain_pass_that_drops_its_gradients():
    """On the CPU (the interpreter) nothing compiles: the pass runs, and leaves no gradient and no change behind."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    before = [p.detach().clone() for p in model.parameters()]
    ran = []

    def loss():
        ran.append(True)
        return model(torch.randn(2, 4)).square().sum()

    assert ahead.compile_step(loss, model.parameters()) == 0
    assert ran and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_switched_off_by_the_environment_setting(monkeypatch, recorded):
    monkeypatch.setattr(ahead, "ENABLED", False)              # GDN2_TRITON_COMPILE_AHEAD=0
    with ahead.compile_ahead() as queue:
        assert queue is None and JITFunction.run.__name__ == "run"


def test_training_goes_on_when_compiling_ahead_fails(monkeypatch):
    """harness/train.py: a failed compile-ahead is a warning naming the switch, and leaves no gradient behind."""
    from harness import train

    model = torch.nn.Linear(4, 4)

    def failing(run_loss, parameters):
        run_loss().sum().backward()
        raise RuntimeError("ptxas failed")

    monkeypatch.setattr(train, "compile_step", failing)
    monkeypatch.setattr(train, "lm_loss", lambda lm, x, y: lm(x))
    with pytest.warns(RuntimeWarning, match="GDN2_TRITON_COMPILE_AHEAD=0"):
        train.compile_first_step(model, torch.randn(2, 4), None, ahead.contextlib.nullcontext())
    assert all(p.grad is None for p in model.parameters())
