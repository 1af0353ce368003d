"""Batching: length grouping, right-padded collation and accumulation-group token counts."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

IGNORE_INDEX = -100

Example = dict[str, Any]
"""One tokenized sample: ``input_ids`` (T,), ``labels`` (T,), ``pixel_values`` (n, 3, H, W),
``key``, ``source``, ``meta``, ``messages`` and ``generate`` (flag for generation eval)."""

Batch = dict[str, Any]


def supervised_tokens(labels: torch.Tensor) -> int:
    """Tokens that get a loss after the causal shift: ``labels[..., 1:] != -100``."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def batch_pixels(
    pixels: list[torch.Tensor],
    image_size: int,
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Concatenate per-example ``pixel_values`` into the batch's float (N, 3, H, W).

    uint8 examples (``ExamplePreparer(normalize_in_collate=True)``) are normalised here, the
    whole batch at once, with ``normalize`` (the transform's); float examples are already
    normalised. Mixing the two would silently skip normalisation, so it raises.
    """
    if not pixels:
        return torch.zeros(0, 3, image_size, image_size)  # (0, 3, H, W)
    dtypes = {p.dtype for p in pixels}
    if len(dtypes) > 1:
        raise ValueError(
            f"examples carry pixel_values of different dtypes: {sorted(map(str, dtypes))}"
        )
    stacked = torch.cat(pixels)  # (N, 3, H, W)
    if stacked.dtype == torch.uint8:
        if normalize is None:
            raise ValueError(
                "uint8 pixel_values need normalize= (ExamplePreparer.collate_args() passes it)"
            )
        return normalize(stacked)
    return stacked.float()


def collate_examples(
    examples: list[Example],
    *,
    pad_token_id: int,
    image_size: int,
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Batch:
    """Collate examples into the Batch contract (see ``/work/briefs/contracts.md``).

    Sequences are right-padded to the longest one with ``pad_token_id`` (labels with -100,
    attention 0); the images of all samples are stacked in order of appearance (uint8 ones
    normalised with ``normalize``, see ``batch_pixels``).
    """
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    longest = max(int(ex["input_ids"].numel()) for ex in examples)
    size = (len(examples), longest)
    input_ids = torch.full(size, pad_token_id, dtype=torch.long)  # (B, T)
    labels = torch.full(size, IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros(size, dtype=torch.long)  # (B, T)
    pixels: list[torch.Tensor] = []
    owners: list[int] = []
    for row, ex in enumerate(examples):
        length = int(ex["input_ids"].numel())
        input_ids[row, :length] = ex["input_ids"]
        labels[row, :length] = ex["labels"]
        attention_mask[row, :length] = 1
        images = ex.get("pixel_values")
        if images is not None and images.shape[0]:
            pixels.append(images)
            owners.extend([row] * images.shape[0])
    pixel_values = batch_pixels(pixels, image_size, normalize)  # (N, 3, H, W)
    count = torch.tensor(supervised_tokens(labels), dtype=torch.long)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "pixel_values": pixel_values,
        "image_sample_index": torch.tensor(owners, dtype=torch.long),  # (N,)
        "num_supervised_tokens": count,
        "step_supervised_tokens": count.clone(),
        "keys": [ex["key"] for ex in examples],
        "sources": [ex["source"] for ex in examples],
        "meta": [ex.get("meta") or {} for ex in examples],
        "messages": [ex.get("messages") for ex in examples],
        "generate": [bool(ex.get("generate", False)) for ex in examples],
    }


def padding_batch(
    *,
    pad_token_id: int,
    image_size: int,
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Batch:
    """A one-token, image-free batch with no supervised token, flagged ``is_padding``.

    Ranks with fewer validation samples run these so every rank executes the same number of
    steps (collectives stay matched); metrics must skip batches with ``is_padding`` True.
    ``normalize`` is accepted (and unused: no image) so ``collate_args()`` fits every collate.
    """
    example = {
        "input_ids": torch.tensor([pad_token_id], dtype=torch.long),
        "labels": torch.tensor([IGNORE_INDEX], dtype=torch.long),
        "key": "__padding__",
        "source": "__padding__",
    }
    batch = collate_examples([example], pad_token_id=pad_token_id, image_size=image_size)
    batch["is_padding"] = True
    return batch


def batch_examples(
    examples: Iterable[Example],
    batch_size: int,
    *,
    group_by_length: bool = False,
    buffer_batches: int = 16,
    rng: random.Random | None = None,
) -> Iterator[list[Example]]:
    """Split a stream of examples into lists of ``batch_size`` (the last one may be short).

    With ``group_by_length`` the examples are gathered ``buffer_batches`` batches at a time,
    sorted by length and cut into batches whose order is then shuffled with ``rng``: padding
    shrinks while the model still sees lengths in random order.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    rng = rng or random.Random(0)
    window = batch_size * (buffer_batches if group_by_length else 1)
    buffer: list[Example] = []

    def flush() -> Iterator[list[Example]]:
        if group_by_length:
            buffer.sort(key=lambda ex: int(ex["input_ids"].numel()))
        chunks = [buffer[i : i + batch_size] for i in range(0, len(buffer), batch_size)]
        if group_by_length:
            rng.shuffle(chunks)
        yield from chunks
        buffer.clear()

    for example in examples:
        buffer.append(example)
        if len(buffer) == window:
            yield from flush()
    if buffer:
        yield from flush()


def set_step_supervised_tokens(group: list[Batch]) -> list[Batch]:
    """Write the group's total supervised-token count into each batch's
    ``step_supervised_tokens`` (in place; returns the group)."""
    total = sum(int(b["num_supervised_tokens"]) for b in group)
    for batch in group:
        batch["step_supervised_tokens"] = torch.tensor(total, dtype=torch.long)
    return group


def group_for_accumulation(batches: Iterable[Batch], accumulate: int) -> Iterator[Batch]:
    """Yield batches unchanged except for ``step_supervised_tokens``, summed over each run of
    ``accumulate`` consecutive batches (the optimizer step's micro-batches).

    The group is read ahead in full before its first batch is yielded, so the loss of the
    first micro-batch can already be normalised by the step total. A short final group sums
    over what it has, matching Lightning, which steps on the epoch's last batch.
    """
    if accumulate < 1:
        raise ValueError(f"accumulate_grad_batches must be >= 1, got {accumulate}")
    group: list[Batch] = []
    for batch in batches:
        group.append(batch)
        if len(group) == accumulate:
            yield from set_step_supervised_tokens(group)
            group = []
    if group:
        yield from set_step_supervised_tokens(group)
