"""benchmarks/bench_models.py's CUDA helpers call the CUDA runtime once and nothing on the CPU. A GPU run is the only
other place a mistake there shows, so the runtime calls are recorded here instead of run."""
import pytest
import torch

from benchmarks import bench_models


@pytest.mark.parametrize("helper, runtime", [("sync", "synchronize"), ("reset_peak", "reset_peak_memory_stats")])
def test_cuda_helpers_call_the_runtime_once(monkeypatch, helper, runtime):
    calls = []
    monkeypatch.setitem(bench_models.RUN, "device", "cuda")
    monkeypatch.setattr(torch.cuda, runtime, lambda *a, **k: calls.append(runtime))
    getattr(bench_models, helper)()
    assert calls == [runtime]
    monkeypatch.setitem(bench_models.RUN, "device", "cpu")
    getattr(bench_models, helper)()
    assert calls == [runtime]                                  # nothing on the CPU
