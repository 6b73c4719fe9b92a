"""Many processes, one sweep: `torchrun --nproc-per-node N run_eval.py run ...`.

Every rank loads the model on its own device (cuda:LOCAL_RANK, or the CPU), generates every cell's samples (the
generators are deterministic, so all ranks agree on them) and evaluates the samples whose index is congruent to its
rank modulo the world size, writing its own rows to the shared SQLite store (WAL; one host). The rows are those of a
single process: a sample's result does not depend on which rank scored it. Rank 0 prints the report after a barrier.

Without torchrun's environment (RANK / WORLD_SIZE) this is a single process and nothing is initialised.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None       # None: single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1 and self.backend is not None

    def owns(self, sample_index: int) -> bool:
        """Whether this rank evaluates the sample (round-robin by index, stable across reruns)."""
        return sample_index % self.world_size == self.rank

    def device(self, requested: str) -> str:
        """The rank's device: 'auto'/'cuda' become cuda:LOCAL_RANK under torchrun; anything else is kept."""
        if self.world_size > 1 and requested in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return requested

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def broadcast(self, value):
        """rank 0's value on every rank (any picklable object)."""
        if not self.active:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, value) -> list:
        if not self.active:
            return [value]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, value)
        return out

    def close(self) -> None:
        if self.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def init_from_env(device: str = "auto", timeout_minutes: float = 24 * 60) -> DistContext:
    """A DistContext from torchrun's environment; initialises the process group when WORLD_SIZE > 1.

    Backend: nccl when every rank has a GPU, else gloo (CPU; what the tests use). The timeout is long because ranks
    meet only at the end of a sweep, and one rank may finish its share hours before another."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend)
