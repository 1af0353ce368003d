"""Normalised exact match of generated text against a list of acceptable answers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

from vlm_lit.eval.checks import check_batch
from vlm_lit.eval.normalize import normalize_answer


class ExactMatch(Metric):
    """Share of predictions equal to at least one acceptable answer after normalisation.

    ``update(predictions, references)``: ``references[i]`` is either one answer string or a
    list of acceptable answers for ``predictions[i]``. Both sides go through
    :func:`~vlm_lit.eval.normalize.normalize_answer` (so "Two." matches "2") unless
    ``normalize=False``, in which case only surrounding whitespace is ignored.
    ``compute()`` returns a () float tensor, 0 before any update.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: torch.Tensor
    total: torch.Tensor

    def __init__(self, normalize: bool = True, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.normalize = normalize
        self.add_state("correct", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _clean(self, text: str) -> str:
        return normalize_answer(text) if self.normalize else text.strip()

    def update(self, predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> None:
        """Add one batch: ``predictions[i]`` is checked against ``references[i]``."""
        check_batch(predictions, references, "ExactMatch", "reference lists")
        correct = 0
        for prediction, refs in zip(predictions, references, strict=True):
            accepted = [refs] if isinstance(refs, str) else list(refs)
            if not accepted:
                raise ValueError(
                    f"ExactMatch: prediction {prediction[:40]!r} has an empty reference list; "
                    "give at least one acceptable answer per prediction."
                )
            correct += self._clean(prediction) in {self._clean(ref) for ref in accepted}
        self.correct += correct
        self.total += len(predictions)

    def compute(self) -> torch.Tensor:
        """Exact-match rate over everything seen (all ranks after sync); a () tensor."""
        return self.correct / self.total.clamp(min=1).to(torch.get_default_dtype())
