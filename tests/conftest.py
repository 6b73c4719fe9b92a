"""Test-wide settings. TRITON_INTERPRET must be set before any Triton kernel module is imported: it makes our
Triton kernels run on CPU in Triton's interpreter (fixed launch configs, no autotuning)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
