"""Every load and store of our Triton kernels checked against the tensors of its launch, on the CPU.

Under TRITON_INTERPRET=1 a kernel's pointers are host addresses. Inside ``checked_addresses()`` each masked load and
store (the only memory operations our kernels use: no block pointers, no atomics) has every address it touches with
its mask on compared with the extents of the launch's tensor arguments ([data_ptr, data_ptr + (last element + 1) *
element size) of each); an address inside none of them is an out-of-bounds access, recorded by kernel and kind. The
interpreter itself reads and writes such addresses silently, and a GPU reports them only as an asynchronous illegal
memory access. ``every_config(r)`` runs config r (mod its count) of every tuned chunk kernel, where the interpreter
otherwise runs one fixed config per kernel, so that rounds 0 .. max_configs() - 1 cover every GPU config.

    python benchmarks/check_bounds_cpu.py                       # the chunk op, forward and backward, every config
    python benchmarks/check_bounds_cpu.py --T 512 --K 32 --V 32 --dtype bfloat16 --strong-decay

What it cannot see: behaviour that only the compiled code has (shared memory, pipelining, the compiler itself), and
an access that stays inside another argument's extent.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pkgutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")          # before triton is imported: the kernels run interpreted

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))


@dataclass
class Violations:
    """Out-of-bounds accesses seen: (kernel, 'load' | 'store') -> number of addresses; the kernels launched."""
    found: dict = field(default_factory=dict)
    launched: set = field(default_factory=set)


def tensor_extents(values) -> list[tuple[int, int]]:
    """[start, end) byte ranges of the tensors among values: from the first element to one past the last (by the
    strides, so a view's range and not its storage's)."""
    extents = []
    for value in values:
        if isinstance(value, torch.Tensor) and value.numel():
            last = sum((size - 1) * stride for size, stride in zip(value.shape, value.stride(), strict=True))
            extents.append((value.data_ptr(), value.data_ptr() + (last + 1) * value.element_size()))
    return extents


def outside(addresses: np.ndarray, itemsize: int, extents: list[tuple[int, int]]) -> int:
    """How many of the addresses (uint64) have their itemsize bytes inside none of the extents."""
    inside = np.zeros(addresses.shape, dtype=bool)
    for start, end in extents:
        inside |= (addresses >= start) & (addresses + itemsize <= end)
    return int((~inside).sum())


@contextlib.contextmanager
def checked_addresses():
    """Inside: every interpreted launch's masked loads and stores are checked (see the module docstring). Yields the
    Violations it fills."""
    from triton.runtime import interpreter

    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("checked_addresses needs TRITON_INTERPRET=1 set before triton is imported")
    seen = Violations()
    launch = {"kernel": None, "extents": []}
    run, load, store = (interpreter.GridExecutor.__call__, interpreter.InterpreterBuilder.create_masked_load,
                        interpreter.InterpreterBuilder.create_masked_store)

    def check(ptrs, mask, kind):
        addresses = ptrs.data[mask.data].astype(np.uint64)
        itemsize = np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize
        bad = outside(addresses, itemsize, launch["extents"]) if addresses.size else 0
        if bad:
            key = (launch["kernel"], kind)
            seen.found[key] = seen.found.get(key, 0) + bad

    def checked_run(self, *args, **kwargs):
        launch["kernel"] = self.fn.__name__
        launch["extents"] = tensor_extents(list(args) + list(kwargs.values()))
        seen.launched.add(self.fn.__name__)
        return run(self, *args, **kwargs)

    def checked_load(self, ptrs, mask, other, *rest):
        check(ptrs, mask, "load")
        return load(self, ptrs, mask, other, *rest)

    def checked_store(self, ptrs, value, mask, *rest):
        check(ptrs, mask, "store")
        return store(self, ptrs, value, mask, *rest)

    interpreter.GridExecutor.__call__ = checked_run
    interpreter.InterpreterBuilder.create_masked_load = checked_load
    interpreter.InterpreterBuilder.create_masked_store = checked_store
    try:
        yield seen
    finally:
        interpreter.GridExecutor.__call__ = run
        interpreter.InterpreterBuilder.create_masked_load = load
        interpreter.InterpreterBuilder.create_masked_store = store


def tuned_launchers() -> list:
    """Every tuned kernel of gdn2.ops.triton (utils.tuned keeps its GPU configs as .gpu_configs)."""
    import gdn2.ops.triton as package

    launchers = []
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        launchers += [v for v in vars(module).values() if hasattr(v, "gpu_configs") and v not in launchers]
    return launchers


def max_configs() -> int:
    return max(len(launcher.gpu_configs) for launcher in tuned_launchers())


@contextlib.contextmanager
def every_config(round_index: int):
    """Inside: each tuned kernel launches its GPU config round_index (mod its count), fitting or not, in place of
    its interpreter config."""
    launchers = tuned_launchers()
    saved = [(launcher, launcher.configs) for launcher in launchers]
    for launcher in launchers:
        launcher.configs = [launcher.gpu_configs[round_index % len(launcher.gpu_configs)]]
    try:
        yield
    finally:
        for launcher, configs in saved:
            launcher.configs = configs


def chunk_inputs(B: int, T: int, H: int, K: int, V: int, dtype: torch.dtype, strong_decay: bool, seed: int = 0):
    """q, k, v, g, b, w leaves requiring grad, [B, T, H, K] / [B, T, H, V]. strong_decay: decays large enough that
    every sub-chunk takes the exact (non-midpoint) path."""
    gen = torch.Generator().manual_seed(seed)
    scale = 8.0 if strong_decay else 0.1
    tensors = [torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, K, generator=gen),
               torch.randn(B, T, H, V, generator=gen), -torch.rand(B, T, H, K, generator=gen) * scale,
               torch.rand(B, T, H, K, generator=gen), torch.rand(B, T, H, V, generator=gen)]
    return [t.to(dtype).requires_grad_() for t in tensors]


def chunk_step(inputs, cu_seqlens=None) -> None:
    """The chunk op's forward (final state kept) and backward on the Triton path, with the fused L2-norm."""
    from gdn2.ops import chunk_gdn2

    o, ht = chunk_gdn2(*inputs, output_final_state=True, use_qk_l2norm_in_kernel=True, cu_seqlens=cu_seqlens,
                       backend="triton")
    (o.float().square().sum() + ht.square().sum()).backward()


def check_chunk(B: int, T: int, H: int, K: int, V: int, dtype: torch.dtype, strong_decay: bool,
                cu_seqlens: list[int] | None = None) -> list[tuple[int, Violations]]:
    """(round, violations) of the chunk op's forward and backward under each config round."""
    cu = torch.tensor(cu_seqlens, dtype=torch.long) if cu_seqlens else None
    results = []
    for round_index in range(max_configs()):
        inputs = chunk_inputs(B, T, H, K, V, dtype, strong_decay)
        with every_config(round_index), checked_addresses() as seen:
            chunk_step(inputs, cu)
        results.append((round_index, seen))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--B", type=int, default=2)
    parser.add_argument("--T", type=int, default=200)
    parser.add_argument("--H", type=int, default=2)
    parser.add_argument("--K", type=int, default=32)
    parser.add_argument("--V", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--strong-decay", action="store_true", help="every sub-chunk on the exact path")
    parser.add_argument("--cu-seqlens", help="comma list, e.g. 0,37,200 (with --B 1)")
    args = parser.parse_args(argv)
    cu = [int(x) for x in args.cu_seqlens.split(",")] if args.cu_seqlens else None
    failed = 0
    for round_index, seen in check_chunk(args.B, args.T, args.H, args.K, args.V, getattr(torch, args.dtype),
                                         args.strong_decay, cu):
        failed += bool(seen.found)
        verdict = "FAIL " + str(seen.found) if seen.found else "PASS"
        print(f"{verdict}  config round {round_index}: {len(seen.launched)} kernels launched, every load and store "
              f"{'inside' if not seen.found else 'checked against'} its launch's tensors", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
