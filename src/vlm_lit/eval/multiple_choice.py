"""Multiple-choice accuracy: extract the chosen option label from generated text."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import torch
from torchmetrics import Metric

from vlm_lit.eval.checks import check_batch

DEFAULT_OPTIONS: str = string.ascii_uppercase


class OptionParser:
    """Find which option label (e.g. "B") a generated answer chose, or None.

    Rules, tried in order (labels match case-insensitively):
    1. The *last* answer marker: "ANSWER: B", "Answer: (B)", "the answer is B." — the
       last one wins because models often reason first and conclude at the end.
    2. A leading label: "B", "B.", "(B)", "[B]", "B) blue", "B: blue", "B\\nbecause ...".
    A bare label must be followed by punctuation (. , : ; ! ) ]), a newline or the end of
    the text, so "A cat sits" or "I think so" is not read as option A / I. Labels outside
    the configured option set are ignored (so "E" is unparseable for options "ABCD").
    """

    def __init__(self, options: str | Sequence[str] = DEFAULT_OPTIONS) -> None:
        labels = list(options)
        folded = [label.casefold() for label in labels]
        if not labels or any(len(label) != 1 or not label.isalnum() for label in labels):
            raise ValueError(
                f"MultipleChoiceAccuracy: options must be single letters or digits, got "
                f"{options!r}; pass e.g. options='ABCD'."
            )
        if len(set(folded)) != len(folded):
            raise ValueError(
                f"MultipleChoiceAccuracy: options {options!r} repeat a label (case-insensitively);"
                " give each option once."
            )
        self.options: tuple[str, ...] = tuple(labels)
        self._canonical = dict(zip(folded, labels, strict=True))
        label = "[" + "".join(re.escape(x) for x in labels) + "]"
        # A label in brackets may be followed by anything; a bare one needs a delimiter.
        token = rf"(?:\(\s*({label})\s*\)|\[\s*({label})\s*\]|({label})(?=[.,:;!)\]]|\n|\s*$))"
        self._marker = re.compile(rf"\banswer\b\s*(?:is\s*)?[:：]?\s*{token}", re.IGNORECASE)
        self._leading = re.compile(rf"^\s*{token}", re.IGNORECASE)

    def _label(self, match: re.Match[str]) -> str:
        found = next(group for group in match.groups() if group is not None)
        return self._canonical[found.casefold()]

    def parse(self, text: str) -> str | None:
        """The option label chosen in ``text`` (as spelled in ``options``), or None."""
        markers = list(self._marker.finditer(text))
        if markers:
            return self._label(markers[-1])
        leading = self._leading.match(text)
        return self._label(leading) if leading else None

    def canonical_answer(self, answer: str) -> str:
        """Validate a ground-truth label ("B", "(b)", "B.") and return it as in ``options``."""
        key = answer.strip().strip("()[].").strip().casefold()
        if key not in self._canonical:
            raise ValueError(
                f"MultipleChoiceAccuracy: answer {answer!r} is not one of the options "
                f"{''.join(self.options)!r}; pass the option set with options=..."
            )
        return self._canonical[key]


class MultipleChoiceAccuracy(Metric):
    """Share of generations that chose the right option; unparseable ones count as wrong.

    ``update(predictions, answers)`` takes generated texts and the correct option labels;
    ``compute()`` returns ``{"accuracy": (), "unparseable_rate": ()}`` float tensors, both
    0 before any update. ``options`` is the option set (default A–Z); see
    :class:`OptionParser` for how a label is extracted.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: torch.Tensor
    unparseable: torch.Tensor
    total: torch.Tensor

    def __init__(self, options: str | Sequence[str] = DEFAULT_OPTIONS, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.parser = OptionParser(options)
        for name in ("correct", "unparseable", "total"):
            self.add_state(name, torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[str], answers: Sequence[str]) -> None:
        """Add one batch of generated texts and their correct option labels."""
        check_batch(predictions, answers, "MultipleChoiceAccuracy", "answers")
        correct = unparseable = 0
        for prediction, answer in zip(predictions, answers, strict=True):
            truth = self.parser.canonical_answer(answer)
            chosen = self.parser.parse(prediction)
            unparseable += chosen is None
            correct += chosen == truth
        self.correct += correct
        self.unparseable += unparseable
        self.total += len(predictions)

    def compute(self) -> dict[str, torch.Tensor]:
        """Accuracy and unparseable rate over everything seen (all ranks after sync)."""
        total = self.total.clamp(min=1).to(torch.get_default_dtype())
        return {
            "accuracy": self.correct / total,
            "unparseable_rate": self.unparseable / total,
        }
