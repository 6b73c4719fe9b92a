"""benchmarks/check_kernels_gpu.py's per-config verdict (its GPU runs cannot be tested here; its plumbing runs under
the interpreter with --smoke)."""
from benchmarks.check_kernels_gpu import not_passed, verdict


def test_a_config_no_mode_checked_is_not_reported_as_passing():
    assert verdict(0.0, 0) == "NOT RUN (fits none of the checked modes)"
    assert verdict(0.5, 4) == "worst err/tol 0.500 PASS"
    assert verdict(1.25, 2) == "worst err/tol 1.250 FAIL"


def test_the_last_line_counts_every_check_that_did_not_pass():
    summary = [("fwd_wy", "BK=64,w4,s1", "worst err/tol 0.607 PASS (83s)"),
               ("all(first)", "strong_decay", "worst err/tol 0.583 PASS"),
               ("fwd_wy", "BK=32,w4,s1", "worst err/tol 1.250 FAIL (20s)"),
               ("all(first)", "varlen_K256", "ERROR ValueError: apply_a: no state-kernel config fits"),
               ("fwd_state", "BV=16,w4,s3", "NOT RUN (time budget)")]
    assert not_passed(summary) == ["fwd_wy BK=32,w4,s1: worst err/tol 1.250 FAIL (20s)",
                                   "all(first) varlen_K256: ERROR ValueError: apply_a: no state-kernel config fits",
                                   "fwd_state BV=16,w4,s3: NOT RUN (time budget)"]
