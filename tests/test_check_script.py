"""benchmarks/check_kernels_gpu.py's per-config verdict (its GPU runs cannot be tested here; its plumbing runs under
the interpreter with --smoke)."""
from benchmarks.check_kernels_gpu import verdict


def test_a_config_no_mode_checked_is_not_reported_as_passing():
    assert verdict(0.0, 0) == "NOT RUN (fits none of the checked modes)"
    assert verdict(0.5, 4) == "worst err/tol 0.500 PASS"
    assert verdict(1.25, 2) == "worst err/tol 1.250 FAIL"
