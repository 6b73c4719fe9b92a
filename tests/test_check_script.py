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


def test_each_kernel_is_checked_where_a_default_plan_launches_it():
    """The check runs a config in the (mode, dtype) pairs whose plan launches its kernel: every chunk kernel is on some
    plan of the checked shapes, the three chunk-local kernels and the output kernel only on fp32's (or K = 256's), the
    state kernel applying A only in the mode planned with many sequences, and the backward only in training."""
    import torch

    from benchmarks.check_kernels_gpu import EXTRA, KERNELS, MAIN, MODES, launches, plan_of

    def checked(kname, dtype, case=MAIN):
        return {mode for mode in MODES if launches(plan_of(mode, dtype, case), kname)}

    cases = [MAIN, *EXTRA]
    assert {k for k in KERNELS for case in cases for dt in (torch.bfloat16, torch.float32) if checked(k, dt, case)} \
        == set(KERNELS)
    assert checked("fwd_intra", torch.bfloat16) == set() and checked("fwd_intra", torch.float32) == set(MODES)
    assert checked("fwd_output", torch.bfloat16) == set()
    assert checked("fwd_output", torch.bfloat16, EXTRA[0]) == set(MODES)             # K = 256
    assert checked("bwd_dqkg", torch.bfloat16) == {"train"}
    assert [plan_of(mode, torch.bfloat16, MAIN).state_applies_a for mode in MODES] == [False, False, True]
