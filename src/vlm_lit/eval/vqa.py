"""VQAv2 accuracy (leave-one-annotator-out, min(1, matches/3)) as a torchmetrics Metric."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

from vlm_lit.eval.checks import check_batch
from vlm_lit.eval.normalize import normalize_answer


def vqa_score(prediction: str, references: Sequence[str]) -> float:
    """VQAv2 accuracy of one prediction against the human answers of one question.

    Both sides go through :func:`normalize_answer`. With ``n`` references of which ``k``
    equal the prediction, each of the ``n`` leave-one-out subsets of ``n - 1`` answers
    contains ``k - 1`` matches (when the left-out answer matched) or ``k`` matches, scores
    ``min(1, matches / 3)``, and the result is the mean over the ``n`` subsets. For the
    standard ``n = 10`` this gives 0, 0.3, 0.6, 0.9, 1.0 for ``k = 0..4``. Other ``n`` use
    the same formula (so e.g. two references can give at most 1/3). A single reference has
    no meaningful leave-one-out subset, so it falls back to normalised exact match (0 or 1).
    """
    if isinstance(references, str) or len(references) == 0:
        raise ValueError(
            "VQAAccuracy: every prediction needs a non-empty list of reference answers, got "
            f"{references!r}; drop questions without human answers before evaluating."
        )
    pred = normalize_answer(prediction)
    refs = [normalize_answer(ref) for ref in references]
    n = len(refs)
    k = sum(ref == pred for ref in refs)
    if n == 1:
        return float(k)
    # k subsets left out a matching answer (k - 1 matches), n - k left out a non-matching one.
    total = k * min(1.0, (k - 1) / 3) + (n - k) * min(1.0, k / 3)
    return total / n


class VQAAccuracy(Metric):
    """Mean VQAv2 accuracy of generated answers; DDP-safe (summed tensor states).

    ``update(predictions, references)`` takes one generated string and one list of human
    answers per question; ``compute()`` returns a scalar float tensor in ``[0, 1]`` (0 before
    any update). See :func:`vqa_score` for the per-question formula.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    score_sum: torch.Tensor
    count: torch.Tensor

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        # float64: a sum of many fractions like 0.3 must not drift over a large eval set.
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
        """Add one batch: ``predictions[i]`` is scored against ``references[i]``."""
        check_batch(predictions, references, "VQAAccuracy", "reference lists")
        batch = sum(vqa_score(p, r) for p, r in zip(predictions, references, strict=True))
        self.score_sum += batch
        self.count += len(predictions)

    def compute(self) -> torch.Tensor:
        """Mean accuracy over every question seen (on all ranks after sync); a () tensor."""
        mean = self.score_sum / self.count.clamp(min=1)  # ()
        return mean.to(torch.get_default_dtype())
