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


def test_fla_matched_kda_has_our_gdn2s_parameter_count_at_a_width_of_64s(monkeypatch):
    """impl 'fla-matched' widens fla's KDA MLP until its parameters come nearest GDN-2's at the 1.3B config with a
    width that is a multiple of 64: GDN-2's full-rank erase and write projections hold 177,168,384 parameters more
    than KDA's (1,450,096,416 against 1,272,928,032), which is 1,424 MLP units of 3 * 2304 * 18; 1,408 of them keep
    the width a multiple of 64 (16 units, 1,990,656 parameters, short). Counted on the meta device (no memory)."""
    import fla.models

    from baselines.common import PAPER_DELTA_RULE_CONFIG

    monkeypatch.setitem(bench_models.RUN, "smoke", False)
    ours = bench_models.gdn2_params()
    fields = dict(PAPER_DELTA_RULE_CONFIG)
    plain = bench_models.count_params(lambda: fla.models.KDAForCausalLM(fla.models.KDAConfig(**fields)))
    width = bench_models.matched_mlp_width(fla.models.KDAForCausalLM, fla.models.KDAConfig, fields, ours)
    matched = bench_models.count_params(
        lambda: fla.models.KDAForCausalLM(fla.models.KDAConfig(**fields, intermediate_size=width)))
    assert (ours, plain, width) == (1_450_096_416, 1_272_928_032, 6144 + 1408)
    assert ours - matched == 16 * 3 * 2304 * 18


def test_impls_are_those_requested_that_exist_for_the_family():
    assert bench_models.impls_of("kda", ["ours", "fla", "fla-matched"], with_fla=True) == ["ours", "fla", "fla-matched"]
    assert bench_models.impls_of("gdn2", ["ours", "fla", "fla-matched"], with_fla=True) == ["ours", "fla"]
    assert bench_models.impls_of("kda", ["fla-matched"], with_fla=False) == []
    assert bench_models.impls_of("mamba3", ["ours", "fla"], with_fla=True) == ["ours"]


def test_recompute_layers_needs_the_chunk_recompute(capsys):
    with pytest.raises(SystemExit):
        bench_models.main(["--recompute-layers", "4"])
    assert "--recompute-layers goes with --recompute chunk" in capsys.readouterr().err


def test_training_rows_read_the_loss_and_fail_a_non_finite_one(monkeypatch):
    """A training row notes its last loss (random init: near ln(vocabulary)); a step whose loss is NaN gives an error
    row, not a tokens/s. The tiny GDN-2 on the CPU (its kernels in Triton's interpreter)."""
    import math

    monkeypatch.setitem(bench_models.RUN, "device", "cpu")
    monkeypatch.setitem(bench_models.RUN, "smoke", True)
    [ok] = bench_models.train_rows("gdn2", "ours", [(64, 2)], steps=1, paper={}, profile=False, recompute="none")
    assert ok["status"] == "ok" and ok["tok_s"] > 0
    from gdn2 import NAMED_CONFIGS
    loss = float(ok["note"].rsplit("last loss ", 1)[1])
    assert abs(loss - math.log(NAMED_CONFIGS["gdn2-tiny"]["vocab_size"])) < 0.5     # ln 4096 = 8.32

    plain_loss = bench_models.loss_of
    monkeypatch.setattr(bench_models, "loss_of", lambda model, ids: plain_loss(model, ids) * float("nan"))
    [failed] = bench_models.train_rows("gdn2", "ours", [(64, 2)], steps=1, paper={}, profile=False,
                                       recompute="none")
    assert failed["status"] == "error" and failed["tok_s"] == ""
    assert "non-finite training loss (nan) after 3 steps" in failed["note"]


def test_a_training_row_says_when_compile_ahead_was_off(monkeypatch):
    """--no-compile-ahead rows of our models say so, with the number of kernel variants their first step compiled
    (none under the interpreter), so that two first-step times from one run can be told apart in the CSV."""
    monkeypatch.setitem(bench_models.RUN, "device", "cpu")
    monkeypatch.setitem(bench_models.RUN, "smoke", True)
    [off] = bench_models.train_rows("gdn2", "ours", [(64, 2)], steps=1, paper={}, profile=False, recompute="none",
                                    compile_ahead=False)
    [on] = bench_models.train_rows("gdn2", "ours", [(64, 2)], steps=1, paper={}, profile=False, recompute="none")
    assert off["note"].endswith("; compile-ahead off: 0 kernel variants compiled in the first step")
    assert "compile-ahead" not in on["note"] and "compiled ahead" not in on["note"]    # nothing compiles on the CPU
