"""GDN-2 operators: token-serial reference, chunkwise (torch / Triton) and the recurrent decode step."""
from gdn2.ops.chunk import chunk_gdn2
from gdn2.ops.naive import l2norm, naive_recurrent_gdn2
from gdn2.ops.recurrent import recurrent_step_gdn2

__all__ = ["chunk_gdn2", "naive_recurrent_gdn2", "recurrent_step_gdn2", "l2norm"]
