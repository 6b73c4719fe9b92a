"""The registry: specs, unknown names with suggestions, the decorator, devices and dtypes; `list models`
(harness/describe.py) and `doctor` (harness/doctor.py) as plain functions."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from harness import registry
from harness.registry import (
    UnknownNameError,
    get_family,
    load_model,
    parse_spec,
    register_family,
    resolve_device,
    resolve_dtype,
)

NO_CUDA = not torch.cuda.is_available()


def test_unknown_family_lists_known_and_suggests_nearest():
    with pytest.raises(UnknownNameError) as err:
        load_model("mamba4=/some/where", device="cpu")
    message = str(err.value)
    assert "unknown model family 'mamba4'" in message
    assert "Did you mean 'mamba2'" in message or "Did you mean 'mamba3'" in message
    for family in ("gdn2", "gated_deltanet", "kda", "mamba2", "mamba3", "transformer"):
        assert family in message


def test_unknown_model_name_suggests_bundled_name():
    with pytest.raises(UnknownNameError, match="Did you mean 'gdn2-tiny-random'"):
        load_model("gdn2-tiny-randm", device="cpu")


def test_aliases_and_bare_paths_resolve_to_families(tmp_path):
    import json

    assert get_family("gdn").name == "gated_deltanet" and get_family("llama").name == "transformer"
    for model_type, family in (("gated_deltanet", "gated_deltanet"), ("kda", "kda"), ("gdn2", "gdn2"),
                               ("gated_deltanet2", "gdn2"), ("llama", "transformer")):
        folder = tmp_path / model_type
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
        assert parse_spec(str(folder)) == (family, str(folder))
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=r"model_type='bert'.*matches no family; pass 'family=PATH'"):
        parse_spec(str(tmp_path / "bert"))


def test_register_family_decorator_adds_a_family(tmp_path):
    from baselines.common import LayerStates, MixerStackLM, PreNormBlock, RMSNorm, SwiGLUMLP
    from harness.model import EvalModel

    class Identity(nn.Module):
        def forward(self, x, state=None, use_cache=False):
            return torch.zeros_like(x), None

    @register_family("toy_family", "toy")
    class ToyFamily(registry.ModelFamily):
        loads_from = "nowhere (test)"

        def backend(self, device):
            return "torch"

        def state_floats_per_layer(self, config):
            return 0

        def load(self, source, device, dtype, tokenizer):
            lm = MixerStackLM({}, 16, 8, [PreNormBlock(RMSNorm(8, 1e-5), Identity(), RMSNorm(8, 1e-5),
                                                       SwiGLUMLP(8, 16))], RMSNorm(8, 1e-5))
            return EvalModel("toy", self.name, lm, None, device, dtype, source, "torch", 0)

    try:
        model = load_model("toy=anything", device="cpu")
        assert model.family == "toy_family" and model.num_params() == 8 * 3 + 3 * 8 * 16
        out = model.lm(torch.tensor([[1, 2, 3]]), use_cache=True)
        assert isinstance(out.past_key_values, LayerStates) and out.logits.shape == (1, 3, 16)
        with pytest.raises(ValueError, match="already registered"):
            @register_family("toy_family")
            class Other(registry.ModelFamily):
                pass
    finally:
        registry._FAMILIES.pop("toy_family", None)
        registry._ALIASES.pop("toy", None)


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a GPU")
def test_unavailable_device_and_dtype_are_refused():
    with pytest.raises(ValueError, match="CUDA is not available here; use --device cpu"):
        load_model("gdn2-tiny-random", device="cuda")
    with pytest.raises(ValueError, match="unsupported device 'mps'"):
        resolve_device("mps")
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        resolve_dtype("float8", torch.device("cpu"))
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32


# ------------------------------------------------------------------------------ list models / doctor
def test_describe_families_lists_every_family():
    from harness.describe import describe_families, print_families

    rows = {r.family: r for r in describe_families("cpu")}
    assert set(rows) >= {"gdn2", "gated_deltanet", "kda", "mamba2", "mamba3", "transformer"}
    for name in ("gdn2", "gated_deltanet", "kda"):
        assert rows[name].state_floats == "262,144"
    assert "need CUDA" in rows["kda"].backend and "torch reference" in rows["kda"].backend
    assert rows["gdn2"].bundled == "gdn2-scalar-erase-small, gdn2-scalar-write-small, gdn2-small, gdn2-tiny-random"
    assert rows["mamba3"].bundled == "mamba3-small"
    assert print_families("cpu") == 0
    if NO_CUDA:
        assert print_families("cuda") == 2


def test_doctor_runs_what_it_can_and_skips_the_rest_on_cpu(capsys):
    from harness.doctor import run_doctor

    rows, status = run_doctor(["transformer", "kda", "gdn2"], device="cpu", seq_len=130)
    assert status == 0
    by = {(r.family, r.check): r for r in rows}
    assert by[("transformer", "logits upstream vs reference (T=130)")].status == "ok"
    assert by[("transformer", "prefill+decode vs full (reference)")].status == "ok"
    assert by[("kda", "conformance")].status == "skipped" and "CUDA" in by[("kda", "conformance")].detail
    assert by[("kda[hybrid]", "conformance")].status == "skipped"
    assert by[("gdn2", "conformance")].status == "skipped"
    out = capsys.readouterr()
    assert "doctor on cpu" in out.out
    # rows stream to stderr as they are measured (a run cut short still shows them)
    assert "transformer: logits upstream vs reference (T=130): ok" in out.err
    if NO_CUDA:
        assert run_doctor(device="cuda", print_table=False)[1] == 2


def test_doctor_autotunes_to_the_first_config_that_launches(tmp_path):
    # process-wide patch: run it in a child interpreter so no other test sees it. Triton's _bench (which needs a GPU)
    # is replaced by a stand-in that fails to launch B=2 (as an over-limit config does: inf) and records the calls.
    code = """
import triton, triton.language as tl
from triton.runtime.autotuner import Autotuner
calls = []
def fake_bench(self, *args, config, **kwargs):
    calls.append(config.kwargs["B"])
    return [float("inf")] * 3 if config.kwargs["B"] == 2 else [1.0] * 3
Autotuner._bench = fake_bench
from harness.doctor import first_config_autotuning
configs = [triton.Config({"B": b}) for b in (1, 2, 4, 8)]
prune = {"early_config_prune": lambda cs, nargs, **kw: [c for c in cs if c.kwargs["B"] > 1]}
@triton.autotune(configs=configs, key=[], prune_configs_by=prune)
@triton.jit
def kern(x, B: tl.constexpr):
    pass
kern.nargs = {"x": None}
first_config_autotuning()
first_config_autotuning()
for _ in range(2):                                  # two autotune keys: the search restarts for each
    timings = {c.kwargs["B"]: kern._bench(config=c)[0] for c in kern.prune_configs({})}
    print(min(timings, key=timings.get), calls)
"""
    script = tmp_path / "autotune_probe.py"                                 # @triton.jit needs a source file
    script.write_text(code)
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(repo), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=repo)
    assert out.returncode == 0, out.stderr
    # pruning left B = 2, 4, 8; B = 2 fails to launch, B = 4 is picked, B = 8 is never compiled
    assert out.stdout.splitlines() == ["4 [2, 4]", "4 [2, 4, 2, 4]"]


def test_doctor_reports_a_mismatch_and_the_skip_convention():
    from baselines.common import MixerStackLM, PreNormBlock, RMSNorm, SlidingWindowAttention, SwiGLUMLP
    from harness.doctor import check_family

    def tiny(theta):
        torch.manual_seed(0)
        block = PreNormBlock(RMSNorm(16, 1e-5), SlidingWindowAttention(16, 2, rope_theta=theta), RMSNorm(16, 1e-5),
                             SwiGLUMLP(16, 32))
        return MixerStackLM({}, 64, 16, [block], RMSNorm(16, 1e-5)).eval()

    class Mismatched:
        name = "mismatched"

        def conformance_models(self, device):
            return tiny(10000.0), tiny(500.0)

    class Skipping:
        name = "skipping"

        def conformance_models(self, device):
            from harness.doctor import ConformanceSkipped

            raise ConformanceSkipped("no kernels here")

    rows = check_family(Mismatched(), torch.device("cpu"), seq_len=120)
    assert rows[0].status == "FAIL" and rows[0].value > 1e-3
    assert rows[1].status == "ok" and rows[2].status == "ok"  # each model agrees with itself
    (row,) = check_family(Skipping(), torch.device("cpu"))
    assert row.status == "skipped" and row.detail == "no kernels here"

    class Declared(Mismatched):
        """A family whose upstream computes in lower precision (declared limit) and cannot decode here."""
        name = "declared"

        def conformance_tolerance(self, variant=""):
            return 10.0

        def conformance_skips(self, variant=""):
            return {"prefill+decode vs full (upstream)": "no decode kernel"}

    rows = {r.check: r for r in check_family(Declared(), torch.device("cpu"), seq_len=120)}
    logits = rows["logits upstream vs reference (T=120)"]
    assert logits.status == "ok" and logits.limit == 10.0 and logits.value > 1e-3 and "family-declared" in logits.detail
    assert rows["prefill+decode vs full (reference)"].limit == 10.0
    skipped = rows["prefill+decode vs full (upstream)"]
    assert skipped.status == "skipped" and skipped.detail == "no decode kernel" and skipped.value is None

    class SingleTokenUpstream(torch.nn.Module):
        """Refuses several new tokens once it has a cache (as fla's Mamba2 does); otherwise the model it wraps."""

        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, past_key_values=None, use_cache=False):
            if past_key_values is not None and input_ids.shape[1] > 1:
                raise ValueError("one new token per step")
            return self.lm(input_ids=input_ids, past_key_values=past_key_values, use_cache=use_cache)

        def get_output_embeddings(self):
            return self.lm.get_output_embeddings()

    class SingleToken:
        name = "single"

        def conformance_models(self, device):
            return SingleTokenUpstream(tiny(10000.0)), tiny(10000.0)

    class SingleTokenDeclared(SingleToken):
        def conformance_single_token_decode(self, variant=""):
            return "one token per cached call"

    rows = {r.check: r for r in check_family(SingleToken(), torch.device("cpu"), seq_len=120)}
    assert rows["prefill+decode vs full (upstream)"].status == "error"            # undeclared: the chunked tail
    rows = {r.check: r for r in check_family(SingleTokenDeclared(), torch.device("cpu"), seq_len=120)}
    decoded = rows["prefill+decode vs full (upstream)"]
    assert decoded.status == "ok" and decoded.value < 1e-5 and "one token per cached call" in decoded.detail
