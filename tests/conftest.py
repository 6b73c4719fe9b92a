"""Test-wide settings. TRITON_INTERPRET must be set before any Triton kernel module is imported: it makes our
Triton kernels run on CPU in Triton's interpreter (fixed launch configs, no autotuning)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402  (the environment above must be set before anything imports Triton)
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models on a shared 2-core machine, where more threads only contend
    (as the runner's _threads_for); restored afterwards. Use with pytest.mark.usefixtures("one_thread")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
