"""Collation to the Batch contract, length grouping, accumulation-group token counts."""

from __future__ import annotations

import random

import pytest
import torch

from vlm_lit.data.collate import (
    batch_examples,
    collate_examples,
    group_for_accumulation,
    padding_batch,
    supervised_tokens,
)

PAD = 0


def _example(length: int, n_images: int, key: str, supervised: int = 2) -> dict:
    ids = torch.arange(1, length + 1)
    labels = torch.full((length,), -100)
    labels[length - supervised :] = ids[length - supervised :]
    return {
        "input_ids": ids,
        "labels": labels,
        "pixel_values": torch.full((n_images, 3, 8, 8), float(length)),
        "key": key,
        "source": "s",
        "meta": {"k": key},
        "messages": None,
    }


def test_collate_shapes_right_padding_and_image_index() -> None:
    batch = collate_examples(
        [_example(3, 2, "a"), _example(5, 0, "b"), _example(4, 1, "c")],
        pad_token_id=PAD,
        image_size=8,
    )
    assert batch["input_ids"].shape == (3, 5) and batch["input_ids"].dtype == torch.long
    assert batch["labels"].shape == batch["attention_mask"].shape == (3, 5)
    assert batch["input_ids"][0].tolist() == [1, 2, 3, PAD, PAD]  # right-padded
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]
    assert batch["labels"][0].tolist() == [-100, 2, 3, -100, -100]
    assert batch["pixel_values"].shape == (3, 3, 8, 8)
    assert batch["image_sample_index"].tolist() == [0, 0, 2]
    # images keep their order: sample 0's two images first, then sample 2's
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [3.0, 3.0, 4.0]
    assert batch["keys"] == ["a", "b", "c"] and batch["sources"] == ["s"] * 3
    assert batch["meta"][2] == {"k": "c"} and batch["messages"] == [None] * 3
    assert int(batch["num_supervised_tokens"]) == 6
    assert int(batch["step_supervised_tokens"]) == 6


def test_collate_without_images_gives_empty_pixel_tensor() -> None:
    batch = collate_examples([_example(3, 0, "a")], pad_token_id=PAD, image_size=8)
    assert batch["pixel_values"].shape == (0, 3, 8, 8)
    assert batch["image_sample_index"].shape == (0,)
    assert batch["image_sample_index"].dtype == torch.long


def test_uint8_pixels_are_normalised_once_per_batch() -> None:
    uint8 = [_example(3, 2, "a"), _example(4, 0, "b"), _example(5, 1, "c")]
    for ex in uint8:
        ex["pixel_values"] = torch.randint(0, 256, (ex["pixel_values"].shape[0], 3, 8, 8)).byte()
    seen = []

    def normalize(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape)
        return x.float() / 255 - 0.5

    batch = collate_examples(uint8, pad_token_id=PAD, image_size=8, normalize=normalize)
    assert seen == [(3, 3, 8, 8)]  # one call for the whole batch
    expected = torch.cat([ex["pixel_values"] for ex in uint8]).float() / 255 - 0.5
    assert batch["pixel_values"].dtype == torch.float32
    assert torch.equal(batch["pixel_values"], expected)
    with pytest.raises(ValueError, match="normalize"):
        collate_examples(uint8, pad_token_id=PAD, image_size=8)
    mixed = [uint8[0], _example(3, 1, "f")]
    with pytest.raises(ValueError, match="different dtypes"):
        collate_examples(mixed, pad_token_id=PAD, image_size=8, normalize=normalize)


def test_supervised_count_ignores_the_first_position() -> None:
    # A label at position 0 has no preceding token to predict it after the shift.
    labels = torch.tensor([[5, -100, 7], [-100, -100, -100]])
    assert supervised_tokens(labels) == 1


def test_padding_batch_has_no_supervision() -> None:
    batch = padding_batch(pad_token_id=PAD, image_size=8)
    assert batch["is_padding"] is True
    assert int(batch["num_supervised_tokens"]) == 0
    assert batch["pixel_values"].shape == (0, 3, 8, 8)


def test_batch_examples_keeps_order_and_short_tail() -> None:
    examples = [_example(2 + i % 3, 0, str(i)) for i in range(10)]
    batches = list(batch_examples(iter(examples), 4))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert [e["key"] for b in batches for e in b] == [str(i) for i in range(10)]


def test_length_grouping_reduces_padding_and_keeps_every_example() -> None:
    rng = random.Random(1)
    examples = [_example(rng.randint(2, 60), 0, str(i)) for i in range(64)]

    def padded(batches: list[list[dict]]) -> int:
        return sum(
            max(e["input_ids"].numel() for e in b) * len(b) - sum(e["input_ids"].numel() for e in b)
            for b in batches
        )

    plain = list(batch_examples(iter(examples), 4))
    grouped = list(
        batch_examples(iter(examples), 4, group_by_length=True, buffer_batches=16, rng=rng)
    )
    assert sorted(e["key"] for b in grouped for e in b) == sorted(e["key"] for e in examples)
    assert padded(grouped) < padded(plain) / 4
    # batches come out in shuffled, not sorted, order
    firsts = [max(e["input_ids"].numel() for e in b) for b in grouped]
    assert firsts != sorted(firsts)


def _batch(tokens: int) -> dict:
    t = torch.tensor(tokens)
    return {"num_supervised_tokens": t, "step_supervised_tokens": t.clone()}


def test_step_supervised_tokens_sum_over_accumulation_groups() -> None:
    out = list(group_for_accumulation(iter([_batch(n) for n in [1, 2, 3, 4, 5]]), 2))
    assert [int(b["step_supervised_tokens"]) for b in out] == [3, 3, 7, 7, 5]
    assert [int(b["num_supervised_tokens"]) for b in out] == [1, 2, 3, 4, 5]
    single = list(group_for_accumulation(iter([_batch(n) for n in [4, 6]]), 1))
    assert [int(b["step_supervised_tokens"]) for b in single] == [4, 6]


def test_group_is_read_before_its_first_batch_is_yielded() -> None:
    pulled: list[int] = []

    def source():
        for n in [1, 2, 3]:
            pulled.append(n)
            yield _batch(n)

    grouped = group_for_accumulation(source(), 3)
    first = next(grouped)
    assert pulled == [1, 2, 3] and int(first["step_supervised_tokens"]) == 6
    with pytest.raises(ValueError, match="accumulate"):
        next(group_for_accumulation(iter([]), 0))
