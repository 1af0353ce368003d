"""Input validation shared by the text metrics in vlm_lit.eval."""

from __future__ import annotations

from collections.abc import Sequence


def check_batch(
    predictions: Sequence[str], references: Sequence[object], metric: str, ref_name: str
) -> None:
    """Raise a clear error when a batch of generations and references are misaligned."""
    if isinstance(predictions, str):
        raise TypeError(
            f"{metric}.update: predictions must be a list of strings, got a single str "
            f"{predictions[:40]!r}; wrap it in a list."
        )
    if isinstance(references, str):
        raise TypeError(
            f"{metric}.update: {ref_name} must be a list with one entry per prediction, got a "
            f"single str {references[:40]!r}; wrap it in a list."
        )
    if len(predictions) != len(references):
        raise ValueError(
            f"{metric}.update: got {len(predictions)} predictions but {len(references)} "
            f"{ref_name}; pass exactly one entry of {ref_name} per prediction."
        )
