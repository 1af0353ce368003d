"""POPE object-hallucination metrics (yes = positive class) from generated yes/no answers."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

import torch
from torchmetrics import Metric

from vlm_lit.eval.checks import check_batch

PopeParseRule = Literal["first", "pope"]
POPE_PARSE_RULES: tuple[str, ...] = ("first", "pope")

# Column indices of the confusion state; rows are the target (0 = yes, 1 = no).
YES, NO, UNPARSEABLE = 0, 1, 2

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
_NEGATIONS = frozenset({"no", "not", "none"})


def parse_yes_no(text: str, rule: PopeParseRule = "first") -> int:
    """Map a generated answer to ``YES``, ``NO`` or ``UNPARSEABLE``.

    ``"first"`` (default): lower-case the text and scan its words left to right; the first
    word that is ``yes`` gives YES, the first that is ``no``/``not``/``none`` or ends in
    ``n't`` ("isn't", "don't") gives NO. Text with neither is UNPARSEABLE, which counts as
    wrong and as neither a yes nor a no, so rambling models are not credited with an answer.
    Example: "Yes, but not red" -> YES; "There isn't one. Yes." -> NO; "a cat" -> UNPARSEABLE.

    ``"pope"``: the rule of the POPE reference evaluation (applied case-insensitively): keep
    the text before the first period; if any word is ``no`` or ``not`` the answer is NO,
    otherwise YES (never UNPARSEABLE, so empty or off-topic answers count as yes).
    """
    if rule == "first":
        for word in _WORD.findall(text.lower()):
            if word == "yes":
                return YES
            if word in _NEGATIONS or word.endswith("n't"):
                return NO
        return UNPARSEABLE
    if rule == "pope":
        words = _WORD.findall(text.split(".", 1)[0].lower())
        return NO if ("no" in words or "not" in words) else YES
    raise ValueError(f"POPEMetrics: unknown parse rule {rule!r}; valid: {sorted(POPE_PARSE_RULES)}")


def _parse_target(target: str) -> int:
    label = target.strip().lower()
    if label not in ("yes", "no"):
        raise ValueError(
            f"POPEMetrics: target {target!r} is not 'yes' or 'no'; POPE ground truth must be "
            "one of those two words."
        )
    return YES if label == "yes" else NO


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator as float, defined as 0 when the denominator is 0 (not NaN)."""
    num, den = numerator.double(), denominator.double()
    safe = torch.where(den > 0, den, torch.ones_like(den))
    out = torch.where(den > 0, num / safe, torch.zeros_like(num))
    return out.to(torch.get_default_dtype())


class POPEMetrics(Metric):
    """Accuracy, precision, recall, F1 and yes-ratio of yes/no answers, with yes positive.

    ``update(predictions, targets)`` parses each generation with :func:`parse_yes_no` (rule
    chosen by ``parse_rule``) against a "yes"/"no" target. ``compute()`` returns a dict of
    () float tensors: ``accuracy``, ``precision`` (0 when nothing was predicted yes),
    ``recall``, ``f1`` (0 when precision + recall is 0), ``yes_ratio`` (share of answers
    parsed as yes) and ``unparseable_rate``. Unparseable answers are wrong, count as a
    missed positive when the target is yes, and never as a predicted yes.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    confusion: torch.Tensor

    def __init__(self, parse_rule: PopeParseRule = "first", **kwargs: object) -> None:
        super().__init__(**kwargs)
        if parse_rule not in POPE_PARSE_RULES:
            raise ValueError(
                f"POPEMetrics: unknown parse_rule {parse_rule!r}; valid: {sorted(POPE_PARSE_RULES)}"
            )
        self.parse_rule: PopeParseRule = parse_rule
        # rows: target (yes, no); columns: parsed prediction (yes, no, unparseable)
        self.add_state("confusion", torch.zeros(2, 3, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[str], targets: Sequence[str]) -> None:
        """Add one batch of generated answers and their "yes"/"no" targets."""
        check_batch(predictions, targets, "POPEMetrics", "targets")
        batch = torch.zeros(2, 3, dtype=torch.long)  # (2, 3)
        for prediction, target in zip(predictions, targets, strict=True):
            batch[_parse_target(target), parse_yes_no(prediction, self.parse_rule)] += 1
        self.confusion += batch.to(self.confusion.device)

    def compute(self) -> dict[str, torch.Tensor]:
        """The POPE figures over everything seen (all ranks after sync)."""
        c = self.confusion  # (2, 3)
        tp, fp, tn = c[YES, YES], c[NO, YES], c[NO, NO]
        total = c.sum()
        precision = _ratio(tp, tp + fp)
        recall = _ratio(tp, c[YES].sum())
        f1 = _ratio(2 * precision * recall, precision + recall)
        return {
            "accuracy": _ratio(tp + tn, total),
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "yes_ratio": _ratio(c[:, YES].sum(), total),
            "unparseable_rate": _ratio(c[:, UNPARSEABLE].sum(), total),
        }
