"""Our fused GDN-2 decode kernel under TRITON_INTERPRET=1 against the float64 token-serial recurrence.
Bound: relative RMSE <= 1e-5 (a few fp32 steps; no solve, no chunking)."""
import pytest
import torch

from gdn2.ops.naive import naive_recurrent_gdn2
from gdn2.ops.recurrent import recurrent_step_gdn2


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("B,T,H,HV,K,V,l2", [(2, 1, 1, 2, 16, 32, False), (1, 3, 2, 4, 32, 16, True)])
def test_decode_step_updates_state_in_place(B, T, H, HV, K, V, l2):
    gen = torch.Generator().manual_seed(B * 7 + T)
    q, k = torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, K, generator=gen)
    if not l2:
        k = torch.nn.functional.normalize(k, dim=-1)
    v = torch.randn(B, T, HV, V, generator=gen)
    g = -torch.rand(B, T, H, K, generator=gen)
    b, w = torch.rand(B, T, H, K, generator=gen), torch.rand(B, T, HV, V, generator=gen)
    state = torch.randn(B, HV, K, V, generator=gen)
    ref_o, ref_state = naive_recurrent_gdn2(*(x.double() for x in (q, k, v, g, b, w)), initial_state=state.double(),
                                            output_final_state=True, use_qk_l2norm_in_kernel=l2)
    ptr = state.data_ptr()
    o, out_state = recurrent_step_gdn2(q, k, v, g, b, w, state, use_qk_l2norm_in_kernel=l2, backend="triton")
    assert out_state.data_ptr() == ptr                      # in place
    assert rel(o, ref_o) < 1e-5
    assert rel(state, ref_state) < 1e-5
