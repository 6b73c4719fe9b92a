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


def test_training_rows_carry_the_papers_figure2_numbers():
    """Each training row puts the paper's number beside ours: the shipped Figure 2 CSV must be found and read
    (GDN-2 at 2K x 8 is 38.0K tokens/s in the paper's text; Mamba-2 at 16K x 1 43.3K from its plot)."""
    paper = bench_models.paper_numbers()
    assert paper[("gdn2", 2048, 8)] == 38000
    assert paper[("mamba2", 16384, 1)] == 43300
    assert len(paper) == len(bench_models.FAMILIES) * len(bench_models.TRAIN_SHAPES)
