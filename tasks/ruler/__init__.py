"""RULER synthetic tasks (NVIDIA/RULER), rebuilt: knobs (task.py table), templates (constants.py), generators
(niah.py, vt.py, cwe.py, fwe.py), length targeting (length.py) and metrics (metrics.py)."""
from .length import LengthTargetError
from .metrics import postprocess_pred, score_prediction, string_match_all, string_match_part
from .sample import Sample
from .task import RULER_TASKS, RulerTask

__all__ = ["RULER_TASKS", "RulerTask", "Sample", "LengthTargetError", "postprocess_pred", "score_prediction",
           "string_match_all", "string_match_part"]
