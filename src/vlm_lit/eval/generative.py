"""Scoring generated answers: per-task accuracy, blank-image accuracy, majority floor, POPE, MC."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from vlm_lit.eval.multiple_choice import MultipleChoiceAccuracy, OptionParser
from vlm_lit.eval.normalize import normalize_answer
from vlm_lit.eval.pope import POPEMetrics

#: Tasks whose reference is free text (captions, documents): not scored by exact match.
UNSCORED_TASKS = frozenset({"caption", "document"})


def is_scorable(meta: dict[str, Any], messages: list[dict[str, Any]] | None) -> bool:
    """A chat sample whose last turn is the assistant's short answer, listed in ``meta``."""
    return bool(
        messages
        and messages[-1].get("role") == "assistant"
        and meta.get("answers")
        and meta.get("task") not in UNSCORED_TASKS
    )


def _is_mc(meta: dict[str, Any]) -> bool:
    return meta.get("task") == "mc" or "options" in meta


class GenerationScorer:
    """Accumulates (prediction, blank-image prediction, meta) triples; ``compute()`` scores.

    State is plain Python counters, so ``state()`` / ``merge()`` let ranks combine results
    (the callback all-gathers them) before ``compute()``.
    """

    def __init__(self) -> None:
        self.parser = OptionParser([chr(ord("A") + i) for i in range(26)])
        self.hits: Counter[str] = Counter()  # task -> correct with the real image
        self.blank_hits: Counter[str] = Counter()  # task -> correct with a blank image
        self.totals: Counter[str] = Counter()  # task -> questions
        self.answers: dict[str, Counter[str]] = defaultdict(Counter)  # task -> answer histogram
        self.pope = POPEMetrics()
        self.mc = MultipleChoiceAccuracy()

    def correct(self, prediction: str, meta: dict[str, Any]) -> bool:
        if _is_mc(meta):
            chosen = self.parser.parse(prediction)
            return chosen is not None and chosen.upper() == str(meta["answers"][0]).upper()
        return normalize_answer(prediction) in {normalize_answer(a) for a in meta["answers"]}

    def update(self, prediction: str, blank_prediction: str, meta: dict[str, Any]) -> None:
        task = str(meta.get("task", "unknown"))
        self.totals[task] += 1
        self.hits[task] += self.correct(prediction, meta)
        self.blank_hits[task] += self.correct(blank_prediction, meta)
        self.answers[task][normalize_answer(str(meta["answers"][0]))] += 1
        if _is_mc(meta):
            self.mc.update([prediction], [str(meta["answers"][0])])
        elif task == "vqa_exist":
            self.pope.update([prediction], [str(meta["answers"][0])])

    def state(self) -> dict[str, Any]:
        return {
            "hits": dict(self.hits),
            "blank_hits": dict(self.blank_hits),
            "totals": dict(self.totals),
            "answers": {k: dict(v) for k, v in self.answers.items()},
            "pope": {k: v.clone() for k, v in self.pope.metric_state.items()},
            "mc": {k: v.clone() for k, v in self.mc.metric_state.items()},
        }

    def merge(self, state: dict[str, Any]) -> None:
        self.hits.update(state["hits"])
        self.blank_hits.update(state["blank_hits"])
        self.totals.update(state["totals"])
        for task, hist in state["answers"].items():
            self.answers[task].update(hist)
        self.pope.merge_state(state["pope"])
        self.mc.merge_state(state["mc"])

    def compute(self, prefix: str = "val/") -> dict[str, float]:
        """``acc``, ``acc_<task>``, ``acc_blank_image``, ``acc_majority``, ``pope_*``, ``mc_*``."""
        total = sum(self.totals.values())
        if total == 0:
            return {}
        out = {
            "acc": sum(self.hits.values()) / total,
            "acc_blank_image": sum(self.blank_hits.values()) / total,
            # a constant, per-task most frequent answer: the floor any model must beat
            "acc_majority": sum(h.most_common(1)[0][1] for h in self.answers.values()) / total,
            "num_scored": float(total),
        }
        out.update({f"acc_{t}": self.hits[t] / n for t, n in sorted(self.totals.items())})
        if self.totals.get("vqa_exist"):
            out.update({f"pope_{k}": float(v) for k, v in self.pope.compute().items()})
        if int(self.mc.total) > 0:
            out.update({f"mc_{k}": float(v) for k, v in self.mc.compute().items()})
        return {prefix + k: float(v) for k, v in out.items()}
