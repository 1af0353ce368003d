"""Tests for vlm_lit.eval: VQA accuracy, POPE, multiple choice, exact match, normalisation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torchmetrics import Metric

from vlm_lit.eval import (
    ExactMatch,
    MultipleChoiceAccuracy,
    POPEMetrics,
    VQAAccuracy,
    normalize_answer,
)
from vlm_lit.eval.multiple_choice import OptionParser
from vlm_lit.eval.pope import NO, UNPARSEABLE, YES, parse_yes_no
from vlm_lit.eval.vqa import vqa_score

# ---------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("yes.", "yes"),
        ("Yes", "yes"),
        ("  no \n", "no"),
        ("The dog", "dog"),
        ("a cat", "cat"),
        ("an apple", "apple"),
        ("two", "2"),
        ("Ten.", "10"),
        ("none", "0"),
        ("three dogs", "3 dogs"),
        ("1,000", "1000"),  # digit-comma: punctuation deleted, number survives
        ("red, white", "red white"),  # mark touching a space is deleted
        ("red/blue", "red blue"),  # mark joining words becomes a space
        ("black-and-white", "black and white"),
        ("what?", "what"),
        ("3.5", "3.5"),  # period followed by a digit is kept
        ("5.", "5"),
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("couldnt've", "couldn't've"),
        ("its", "its"),  # an ordinary word, not rewritten to "it's"
        ("well", "well"),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


# ---------------------------------------------------------------- VQA accuracy


def brute_force_vqa(prediction: str, references: list[str]) -> float:
    """Reference implementation: explicit loop over leave-one-out subsets."""
    pred = normalize_answer(prediction)
    refs = [normalize_answer(r) for r in references]
    scores = []
    for left_out in range(len(refs)):
        others = refs[:left_out] + refs[left_out + 1 :]
        scores.append(min(1.0, sum(r == pred for r in others) / 3))
    return sum(scores) / len(scores)


@pytest.mark.parametrize(
    ("k", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]
)
def test_vqa_leave_one_out_values(k: int, expected: float) -> None:
    refs = ["cat"] * k + ["dog"] * (10 - k)
    assert vqa_score("cat", refs) == pytest.approx(expected)
    metric = VQAAccuracy()
    metric.update(["cat"], [refs])
    assert metric.compute().item() == pytest.approx(expected)


def test_vqa_normalises_both_sides() -> None:
    refs = ["2", "2", "two.", "3", "3", "3", "3", "3", "3", "3"]
    # "The Two" -> "2" matches three annotators -> 0.9
    assert vqa_score("The Two", refs) == pytest.approx(0.9)


@pytest.mark.parametrize(
    ("refs", "expected"),
    [
        (["cat", "dog"], 1 / 6),  # leave out cat -> 0; leave out dog -> 1/3
        (["cat", "cat", "cat"], 2 / 3),  # every subset holds 2 matches
        (["cat", "cat", "cat", "cat", "dog"], (4 * 1.0 + 1 * 1.0) / 5),
        (["cat", "cat", "dog", "dog", "dog"], (2 * (1 / 3) + 3 * (2 / 3)) / 5),
    ],
)
def test_vqa_other_reference_counts_use_leave_one_out(refs: list[str], expected: float) -> None:
    assert vqa_score("cat", refs) == pytest.approx(expected)
    assert vqa_score("cat", refs) == pytest.approx(brute_force_vqa("cat", refs))


def test_vqa_matches_brute_force_on_mixed_answers() -> None:
    refs = ["Yes", "yes.", "no", "yes", "maybe", "no", "yes", "No.", "yes", "y"]
    for prediction in ("yes", "no", "maybe", "y", "unsure"):
        assert vqa_score(prediction, refs) == pytest.approx(brute_force_vqa(prediction, refs))


def test_vqa_single_reference_is_exact_match() -> None:
    assert vqa_score("A red car.", ["red car"]) == 1.0
    assert vqa_score("blue car", ["red car"]) == 0.0


def test_vqa_accumulates_over_batches_and_validates() -> None:
    metric = VQAAccuracy()
    metric.update(["cat", "yes"], [["cat"] + ["dog"] * 9, ["yes"] * 10])
    metric.update(["bird"], [["dog"] * 10])
    assert metric.compute().item() == pytest.approx((0.3 + 1.0 + 0.0) / 3)
    with pytest.raises(ValueError, match="2 predictions but 1"):
        metric.update(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="non-empty list"):
        metric.update(["a"], [[]])
    with pytest.raises(TypeError, match="wrap it in a list"):
        metric.update("cat", [["cat"]])


# ---------------------------------------------------------------- POPE


def test_pope_always_yes_model() -> None:
    targets = ["yes"] * 6 + ["no"] * 4
    metric = POPEMetrics()
    metric.update(["Yes, there is."] * 10, targets)
    out = metric.compute()
    assert out["recall"].item() == pytest.approx(1.0)
    assert out["yes_ratio"].item() == pytest.approx(1.0)
    assert out["precision"].item() == pytest.approx(0.6)  # the positive rate
    assert out["accuracy"].item() == pytest.approx(0.6)
    assert out["f1"].item() == pytest.approx(2 * 0.6 / 1.6)


def test_pope_known_confusion_matrix() -> None:
    # tp=3, fn=2, fp=1, tn=4
    predictions = ["yes"] * 3 + ["no"] * 2 + ["yes"] + ["no"] * 4
    targets = ["yes"] * 5 + ["no"] * 5
    metric = POPEMetrics()
    metric.update(predictions[:4], targets[:4])
    metric.update(predictions[4:], targets[4:])
    out = metric.compute()
    precision, recall = 3 / 4, 3 / 5
    assert out["accuracy"].item() == pytest.approx(7 / 10)
    assert out["precision"].item() == pytest.approx(precision)
    assert out["recall"].item() == pytest.approx(recall)
    assert out["f1"].item() == pytest.approx(2 * precision * recall / (precision + recall))
    assert out["yes_ratio"].item() == pytest.approx(4 / 10)
    assert out["unparseable_rate"].item() == 0.0


def test_pope_no_predicted_positives_gives_zero_not_nan() -> None:
    metric = POPEMetrics()
    metric.update(["No."] * 4, ["yes", "no", "yes", "no"])
    out = metric.compute()
    assert out["precision"].item() == 0.0
    assert out["recall"].item() == 0.0
    assert out["f1"].item() == 0.0
    assert out["accuracy"].item() == pytest.approx(0.5)
    assert not any(torch.isnan(v) for v in out.values())


def test_pope_unparseable_is_wrong_and_not_a_yes() -> None:
    metric = POPEMetrics()
    metric.update(["a cat", "yes", "", "no"], ["yes", "yes", "no", "no"])
    out = metric.compute()
    assert out["unparseable_rate"].item() == pytest.approx(0.5)
    assert out["accuracy"].item() == pytest.approx(0.5)
    assert out["yes_ratio"].item() == pytest.approx(0.25)
    assert out["recall"].item() == pytest.approx(0.5)  # the unparseable yes is a miss
    assert out["precision"].item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("text", "first", "pope"),
    [
        ("Yes", YES, YES),
        ("yes.", YES, YES),
        ("No, there is not.", NO, NO),
        ("Yes, there is no doubt.", YES, NO),  # first yes/no word vs any "no"
        ("There isn't a dog in the image.", NO, YES),  # POPE's rule misses "isn't"
        ("I do not see one", NO, NO),
        ("There is a dog. No cat though.", NO, YES),  # POPE reads sentence 1 only
        ("", UNPARSEABLE, YES),
        ("nothing here", UNPARSEABLE, YES),  # "nothing"/"yesterday" are not yes/no words
        ("yesterday, maybe", UNPARSEABLE, YES),
    ],
)
def test_pope_parse_rules(text: str, first: int, pope: int) -> None:
    assert parse_yes_no(text, "first") == first
    assert parse_yes_no(text, "pope") == pope


def test_pope_rule_switch_and_errors() -> None:
    metric = POPEMetrics(parse_rule="pope")
    metric.update(["", "There isn't one."], ["no", "no"])  # both parsed yes by POPE's rule
    assert metric.compute()["yes_ratio"].item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"\['first', 'pope'\]"):
        POPEMetrics(parse_rule="strict")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'maybe' is not 'yes' or 'no'"):
        metric.update(["yes"], ["maybe"])
    with pytest.raises(TypeError, match="single str"):
        metric.update(["yes"], "yes")


# ---------------------------------------------------------------- multiple choice


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", "B"),
        ("B.", "B"),
        ("(B)", "B"),
        ("[B]", "B"),
        ("B) blue", "B"),
        ("b) blue", "B"),
        ("B: blue", "B"),
        ("B\nbecause it is blue", "B"),
        ("  C  ", "C"),
        ("Let me think. The sky is blue. ANSWER: C", "C"),
        ("The answer is (D) blue", "D"),
        ("answer: a", "A"),
        ("The answer is B. Wait, the answer is C.", "C"),  # last marker wins
        ("A cat sits on the mat", None),  # bare label needs a delimiter
        ("I think so", None),
        ("E", None),  # outside the option set
        ("The answer isn't clear", None),
        ("", None),
    ],
)
def test_option_parser(text: str, expected: str | None) -> None:
    assert OptionParser("ABCD").parse(text) == expected


def test_multiple_choice_counts_unparseable_as_wrong() -> None:
    metric = MultipleChoiceAccuracy(options="ABCD")
    metric.update(["B", "(C)", "I don't know", "ANSWER: A"], ["B", "B", "A", "(a)"])
    out = metric.compute()
    assert out["accuracy"].item() == pytest.approx(2 / 4)
    assert out["unparseable_rate"].item() == pytest.approx(1 / 4)


def test_multiple_choice_default_options_and_errors() -> None:
    metric = MultipleChoiceAccuracy()  # A-Z by default
    metric.update(["F.", "(Z)"], ["F", "Y"])
    assert metric.compute()["accuracy"].item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="not one of the options 'ABCD'"):
        MultipleChoiceAccuracy(options="ABCD").update(["A"], ["E"])
    with pytest.raises(ValueError, match="single letters or digits"):
        MultipleChoiceAccuracy(options=["AB", "C"])
    with pytest.raises(ValueError, match="repeat a label"):
        MultipleChoiceAccuracy(options="AaB")
    digits = MultipleChoiceAccuracy(options="1234")
    digits.update(["2) red", "Answer: 4"], ["2", "3"])
    assert digits.compute()["accuracy"].item() == pytest.approx(0.5)


# ---------------------------------------------------------------- exact match


def test_exact_match() -> None:
    metric = ExactMatch()
    metric.update(["Two.", "a red car", "blue"], [["2", "two"], "Red car", ["green", "cyan"]])
    assert metric.compute().item() == pytest.approx(2 / 3)
    raw = ExactMatch(normalize=False)
    raw.update(["Two.", " 2 "], [["2"], ["2"]])
    assert raw.compute().item() == pytest.approx(1 / 2)
    with pytest.raises(ValueError, match="empty reference list"):
        metric.update(["x"], [[]])


# ---------------------------------------------------------------- DDP sync and reset

# (metric factory, update args of the first half, update args of the second half)
CASES: list[tuple[Callable[..., Metric], tuple[Any, Any], tuple[Any, Any]]] = [
    (
        VQAAccuracy,
        (["cat", "dog"], [["cat"] + ["x"] * 9, ["dog"] * 2 + ["x"] * 8]),
        (["two", "no"], [["2"] * 3 + ["x"] * 7, ["yes"] * 10]),
    ),
    (
        POPEMetrics,
        (["yes", "no", "yes"], ["yes", "yes", "no"]),
        (["No.", "Yes", "hmm", "yes"], ["no", "yes", "yes", "yes"]),
    ),
    (
        MultipleChoiceAccuracy,
        (["A", "(B)", "nope"], ["A", "C", "D"]),
        (["ANSWER: D", "C."], ["D", "C"]),
    ),
    (ExactMatch, (["the cat"], [["cat"]]), (["dog", "Three"], [["cat"], ["3"]])),
]
IDS = ["vqa", "pope", "mc", "exact"]


def flat(value: torch.Tensor | dict[str, torch.Tensor]) -> list[float]:
    if isinstance(value, dict):
        return [value[k].item() for k in sorted(value)]
    return [value.item()]


@pytest.mark.parametrize(("factory", "first", "second"), CASES, ids=IDS)
def test_merged_ranks_equal_one_instance(
    factory: Callable[..., Metric], first: tuple[Any, Any], second: tuple[Any, Any]
) -> None:
    whole = factory()
    whole.update(*first)
    whole.update(*second)
    expected = flat(whole.compute())

    rank0, rank1 = factory(), factory()
    rank0.update(*first)
    rank1.update(*second)
    rank0.merge_state(rank1)
    assert flat(rank0.compute()) == pytest.approx(expected)


@pytest.mark.parametrize(("factory", "first", "second"), CASES, ids=IDS)
def test_ddp_sync_path_sums_states(
    factory: Callable[..., Metric], first: tuple[Any, Any], second: tuple[Any, Any]
) -> None:
    """Runs torchmetrics' real sync code with a fake 2-rank all_gather (no processes)."""
    rank1 = factory()
    rank1.update(*second)
    remote = iter(list(rank1.metric_state.values()))  # add_state order == gather order

    def gather(tensor: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
        return [tensor, next(remote)]

    rank0 = factory(dist_sync_fn=gather, distributed_available_fn=lambda: True)
    rank0.update(*first)
    local = {k: v.clone() for k, v in rank0.metric_state.items()}
    synced = flat(rank0.compute())

    whole = factory()
    whole.update(*first)
    whole.update(*second)
    assert synced == pytest.approx(flat(whole.compute()))
    # compute() un-syncs afterwards: the rank's own state is restored
    for name, value in rank0.metric_state.items():
        assert torch.equal(value, local[name])


@pytest.mark.parametrize(("factory", "first", "second"), CASES, ids=IDS)
def test_reset(
    factory: Callable[..., Metric], first: tuple[Any, Any], second: tuple[Any, Any]
) -> None:
    metric, fresh = factory(), factory()
    metric.update(*first)
    metric.reset()
    for value in metric.metric_state.values():
        assert torch.count_nonzero(value) == 0
    metric.update(*second)
    fresh.update(*second)
    assert flat(metric.compute()) == pytest.approx(flat(fresh.compute()))
