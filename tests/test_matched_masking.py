"""All three families see the same supervised target tokens for the same batch."""

from __future__ import annotations

import torch

from vlm_lit.models.base import IGNORE_INDEX
from vlm_lit.models.loss import count_supervised
from vlm_test_utils import FAMILIES, make_batch, tiny

SPECS = [
    (1, "How many circles?", "Three."),
    (3, "Compare the three pictures.", "The first is red, the second blue, the third green."),
    (0, "Text only: say yes.", "Yes."),
    (2, "Which image has a square?", "The second."),
]


def _targets(out_labels: torch.Tensor) -> list[list[int]]:
    """Per sample, the supervised next-token targets in order (labels[:, 1:] != -100)."""
    shifted = out_labels[:, 1:]
    return [row[row != IGNORE_INDEX].tolist() for row in shifted]


def test_same_supervised_targets_and_counts_across_families() -> None:
    seen = {}
    batch = None
    for family in FAMILIES:
        module = tiny(family)
        # identical tokenizers across families -> one batch is valid for all of them
        b = make_batch(module, SPECS)
        if batch is None:
            batch = b
        assert torch.equal(b["input_ids"], batch["input_ids"])
        module.eval()
        with torch.no_grad():
            out = module(batch)
        assert out.labels.shape == out.logits.shape[:2]
        seen[family] = (_targets(out.labels), int(count_supervised(out.labels)))
        # prefix families widen each <image> into K positions, all of them unsupervised
        k = module.model.tokens_per_image
        n_images = int(batch["pixel_values"].shape[0])
        extra = (k - 1) * int((batch["input_ids"] == module.model.image_token_id).sum(1).max())
        assert out.labels.shape[1] <= batch["input_ids"].shape[1] + extra
        assert n_images == 6
    expected = _targets(batch["labels"])
    for family, (targets, count) in seen.items():
        assert targets == expected, family
        assert count == int(batch["num_supervised_tokens"]), family
    # the answers, not the prompts, are what is supervised
    tok = tiny("mlp").tokenizer
    for (_, _, answer), target in zip(SPECS, expected, strict=True):
        assert tok.decode(target, skip_special_tokens=True) == answer
        assert target[-1] == tok.convert_tokens_to_ids("<|im_end|>")


def test_losses_use_the_same_token_count() -> None:
    """The loss denominators match: equal inputs with equal logits would give equal losses."""
    counts = set()
    for family in FAMILIES:
        module = tiny(family)
        batch = make_batch(module, SPECS)
        out = module(batch)
        counts.add(int(count_supervised(out.labels)))
        assert torch.isfinite(out.loss)
    assert len(counts) == 1
