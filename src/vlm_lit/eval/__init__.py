"""Generation-based evaluation metrics (torchmetrics, DDP-synchronised) for vlm_lit."""

from vlm_lit.eval.exact_match import ExactMatch
from vlm_lit.eval.multiple_choice import MultipleChoiceAccuracy
from vlm_lit.eval.normalize import normalize_answer
from vlm_lit.eval.pope import POPEMetrics
from vlm_lit.eval.vqa import VQAAccuracy

__all__ = [
    "ExactMatch",
    "MultipleChoiceAccuracy",
    "POPEMetrics",
    "VQAAccuracy",
    "normalize_answer",
]
