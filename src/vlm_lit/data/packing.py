"""Sequence packing: several samples per row up to ``max_length``, each with its own positions.

Batch contract addition for packed batches (``VLMDataModule(packing=True)``):

- ``segment_ids`` (B, T) long: 0 on padding, 1..n for the n samples packed into a row;
- ``position_ids`` (B, T) long: restart at 0 at every segment (0 on padding);
- ``attention_mask`` is ``segment_ids > 0``; the models build the block-diagonal mask;
- the first label of every segment is -100, so no loss target crosses a sample boundary;
- ``image_sample_index`` is the batch *row* of each image (as unpacked), ``sample_row`` (S,)
  the row of each of the S samples; ``keys`` / ``sources`` / ``meta`` / ``messages`` stay
  per sample.
Samples keep their tokens and labels, so the supervised tokens are exactly the unpacked ones
and the loss (a global supervised-token mean) is unchanged.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator

import torch

from vlm_lit.data.collate import IGNORE_INDEX, Batch, Example, batch_pixels, supervised_tokens


def _length(example: Example) -> int:
    return int(example["input_ids"].numel())


def first_fit_decreasing(examples: list[Example], max_length: int) -> list[list[Example]]:
    """Pack examples into rows of at most ``max_length`` tokens (longest first, first fit)."""
    rows: list[list[Example]] = []
    room: list[int] = []
    for example in sorted(examples, key=_length, reverse=True):
        size = _length(example)
        if size > max_length:
            raise ValueError(
                f"sample {example.get('key')!r} has {size} tokens, more than the packing "
                f"length {max_length}; tokenize with max_length <= --data.max_length"
            )
        for i, free in enumerate(room):
            if size <= free:
                rows[i].append(example)
                room[i] -= size
                break
        else:
            rows.append([example])
            room.append(max_length - size)
    return rows


def pack_examples(
    examples: Iterable[Example],
    batch_size: int,
    max_length: int,
    *,
    buffer_size: int = 256,
    rng: random.Random | None = None,
) -> Iterator[list[list[Example]]]:
    """Yield batches of ``batch_size`` packed rows from a stream of examples.

    Examples are gathered ``buffer_size`` at a time and packed first-fit-decreasing; whole
    batches of rows are yielded (rows shuffled with ``rng``, so lengths mix) and the samples
    of the remaining rows wait for the next buffer. The stream's tail is flushed at the end
    (its last batch may be short).
    """
    if batch_size < 1 or max_length < 1:
        raise ValueError(
            f"packing needs batch_size >= 1 and max_length >= 1, got {batch_size}, {max_length}"
        )
    rng = rng or random.Random(0)
    buffer: list[Example] = []

    def flush(final: bool) -> Iterator[list[list[Example]]]:
        rows = first_fit_decreasing(buffer, max_length)
        rng.shuffle(rows)
        full = len(rows) if final else len(rows) - len(rows) % batch_size
        buffer[:] = [ex for row in rows[full:] for ex in row]
        for i in range(0, full, batch_size):
            yield rows[i : i + batch_size]

    for example in examples:
        buffer.append(example)
        if len(buffer) >= buffer_size:
            yield from flush(final=False)
    if buffer:
        yield from flush(final=True)


def collate_packed(
    rows: list[list[Example]],
    *,
    pad_token_id: int,
    image_size: int,
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Batch:
    """Collate packed rows into the Batch contract plus ``segment_ids`` / ``position_ids``
    (uint8 pixels normalised with ``normalize``, see ``collate.batch_pixels``)."""
    if not rows or not all(rows):
        raise ValueError("cannot collate an empty packed batch or an empty row")
    longest = max(sum(_length(ex) for ex in row) for row in rows)
    size = (len(rows), longest)
    input_ids = torch.full(size, pad_token_id, dtype=torch.long)  # (B, T)
    labels = torch.full(size, IGNORE_INDEX, dtype=torch.long)  # (B, T)
    segment_ids = torch.zeros(size, dtype=torch.long)  # (B, T)
    position_ids = torch.zeros(size, dtype=torch.long)  # (B, T)
    pixels: list[torch.Tensor] = []
    owners: list[int] = []
    samples: list[Example] = []
    sample_row: list[int] = []
    for r, row in enumerate(rows):
        start = 0
        for segment, ex in enumerate(row, start=1):
            n = _length(ex)
            input_ids[r, start : start + n] = ex["input_ids"]
            labels[r, start : start + n] = ex["labels"]
            # The previous sample's last logit must not be trained to predict this sample.
            labels[r, start] = IGNORE_INDEX
            segment_ids[r, start : start + n] = segment
            position_ids[r, start : start + n] = torch.arange(n)
            start += n
            images = ex.get("pixel_values")
            if images is not None and images.shape[0]:
                pixels.append(images)
                owners.extend([r] * images.shape[0])
            samples.append(ex)
            sample_row.append(r)
    pixel_values = batch_pixels(pixels, image_size, normalize)  # (N, 3, H, W)
    count = torch.tensor(supervised_tokens(labels), dtype=torch.long)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": (segment_ids > 0).long(),
        "segment_ids": segment_ids,
        "position_ids": position_ids,
        "pixel_values": pixel_values,
        "image_sample_index": torch.tensor(owners, dtype=torch.long),  # (N,) row per image
        "sample_row": torch.tensor(sample_row, dtype=torch.long),  # (S,) row per sample
        "num_supervised_tokens": count,
        "step_supervised_tokens": count.clone(),
        "keys": [ex["key"] for ex in samples],
        "sources": [ex["source"] for ex in samples],
        "meta": [ex.get("meta") or {} for ex in samples],
        "messages": [ex.get("messages") for ex in samples],
        "generate": [bool(ex.get("generate", False)) for ex in samples],
    }
