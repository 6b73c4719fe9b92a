"""The harness: one interface for every model family (EvalModel), the registry, sweeps, the store and reports."""
from harness.model import EvalModel
from harness.registry import ModelFamily, load_model, register_family

__all__ = ["EvalModel", "ModelFamily", "load_model", "register_family"]
