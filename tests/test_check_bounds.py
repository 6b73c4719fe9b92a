"""benchmarks/check_bounds_cpu.py: the address check catches an out-of-bounds load and store in a toy kernel, and
the chunk op's forward and backward stay inside their tensors under every GPU config of every tuned kernel."""
import pytest
import torch
import triton
import triton.language as tl

from benchmarks import check_bounds_cpu as bounds


@triton.jit
def _copy(src, dst, n_read, n_write, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(dst + i, tl.load(src + i, mask=i < n_read, other=0.), mask=i < n_write)


def test_the_check_finds_reads_and_writes_past_a_tensor_and_nothing_else():
    buffer = torch.zeros(200)
    src, dst = buffer[:40], buffer[100:148]                   # views with room between and after them
    with bounds.checked_addresses() as seen:
        _copy[(1,)](src, dst, 40, 48, BLOCK=64)                # masked exactly at both ends
    assert seen.found == {} and seen.launched == {"_copy"}
    with bounds.checked_addresses() as seen:
        _copy[(1,)](src, dst, 44, 50, BLOCK=64)                # 4 reads past src's 40 floats, 2 writes past dst's 48
    assert seen.found == {("_copy", "load"): 4, ("_copy", "store"): 2}


def test_extents_follow_the_view_not_the_storage():
    base = torch.zeros(10, 8)
    view = base[2:4, ::2]                                      # rows 2-3, every second column
    [(start, end)] = bounds.tensor_extents([view, 3, None])
    assert start == base.data_ptr() + (2 * 8) * 4
    assert end == start + (8 + 6 + 1) * 4                     # last element: row 3, column 6
    import numpy as np
    addresses = np.array([start, end - 4, end - 2, end], dtype=np.uint64)
    assert bounds.outside(addresses, 4, [(start, end)]) == 2   # a 4-byte item from end - 2 and one from end


@pytest.mark.parametrize("plan", [torch.float32, torch.bfloat16], ids=["fp32-plan", "16-bit-plan"])
@pytest.mark.parametrize("strong_decay", [False, True], ids=["midpoint", "exact"])
@pytest.mark.parametrize("round_index", range(7))
def test_chunk_op_stays_inside_its_tensors_under_every_config(round_index, strong_decay, plan):
    """Two chunks, the second partly filled, with heads of 32 (the shape whose bf16 training step faulted on an H100);
    slow decays (the midpoint path) or decays strong enough that every sub-chunk takes the exact path; the launches
    of fp32 inputs or of 16-bit ones (planned_as, on fp32 values); forward with the final state, and backward."""
    from gdn2.ops.triton.dispatch import planned_as

    assert bounds.max_configs() == 7
    inputs = bounds.chunk_inputs(B=2, T=80, H=1, K=32, V=32, dtype=torch.float32, strong_decay=strong_decay)
    with planned_as(plan), bounds.every_config(round_index), bounds.checked_addresses() as seen:
        bounds.chunk_step(inputs)
    assert len(seen.launched) >= 8
    assert seen.found == {}
