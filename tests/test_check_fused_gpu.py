"""benchmarks/check_fused_gpu.py runs each check group in its own process (a GPU fault that poisons the CUDA context
fails that group only). The GPU checks need CUDA; how a child's end becomes a verdict is checked here on faked
child processes."""
import subprocess

import pytest

from benchmarks import check_fused_gpu


@pytest.mark.parametrize("returncode, failed", [(0, 0), (1, 1), (2, 1), (-11, 1), (134, 1)])
def test_a_group_fails_on_any_nonzero_exit(monkeypatch, capsys, returncode, failed):
    """0: every check passed; 1: a check failed; 2: a check raised; anything else (a signal, an abort): the process
    died, and its last stderr lines are printed with a FAIL line naming the group."""
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, returncode, stdout="PASS  something\n",
                                           stderr="Traceback\nline\nRuntimeError: CUDA error: an illegal memory access")
    monkeypatch.setattr(check_fused_gpu.subprocess, "run", fake_run)
    assert check_fused_gpu.run_group("kernels") == failed
    assert calls[0][-2:] == ["--only", "kernels"]
    out = capsys.readouterr().out
    assert out.startswith("PASS  something\n")
    died = returncode not in (0, 1, 2)
    assert ("FAIL  kernels: the process ended with exit code" in out) == died
    if died:
        assert "an illegal memory access" in out


def test_every_group_can_be_asked_for_by_name(capsys):
    assert set(check_fused_gpu.CHECKS) == {"compile_ahead", "kernels", "recomputes", "model", "graph_decode",
                                           "bf16_step_64", "bf16_step_32"}
    with pytest.raises(SystemExit):
        check_fused_gpu.main(["--only", "no_such_group"])
    assert "invalid choice" in capsys.readouterr().err
