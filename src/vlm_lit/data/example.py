"""One schema sample -> one model-ready example: tokenized text plus transformed images."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from vlm_lit.data.collate import Example
from vlm_lit.data.images import ImageTransform
from vlm_lit.data.tokenize import DroppedSample, tokenize_conversation, tokenize_document


class ExamplePreparer:
    """Tokenizes a sample and transforms its images; picklable, so it runs in workers.

    ``drop_unsupervised`` (training) drops samples without a supervised token, e.g. an
    evaluation prompt that slipped into a training source: they would cost compute and add
    nothing to the loss. Validation keeps them (they can still be generation prompts).

    ``normalize_in_collate`` (what the DataModule uses) keeps each example's
    ``pixel_values`` as uint8 (squared, not normalised) and hands ``transform.normalize`` to
    the collate functions through ``collate_args()``, which normalise the whole batch at
    once: the same floats, fewer tensor operations, and a quarter of the memory while
    examples wait in a length-grouping or packing buffer. Off, every example carries float32
    pixels (LLaVA's per-item pattern).
    """

    def __init__(
        self,
        tokenizer: Any,
        transform: ImageTransform,
        *,
        max_length: int | None = None,
        drop_unsupervised: bool = True,
        normalize_in_collate: bool = False,
    ) -> None:
        pad = tokenizer.pad_token_id
        pad = pad if pad is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError(
                "the tokenizer has neither pad_token_id nor eos_token_id; set "
                "tokenizer.pad_token before connecting it to the DataModule"
            )
        self.tokenizer, self.transform = tokenizer, transform
        self.max_length, self.drop_unsupervised = max_length, drop_unsupervised
        self.normalize_in_collate = normalize_in_collate
        self.pad_token_id = int(pad)

    def collate_args(self) -> dict[str, Any]:
        """Keyword arguments for ``collate_examples`` / ``collate_packed`` / ``padding_batch``."""
        args: dict[str, Any] = {
            "pad_token_id": self.pad_token_id,
            "image_size": self.transform.image_size,
        }
        if self.normalize_in_collate:
            args["normalize"] = self.transform.normalize
        return args

    def __call__(self, sample: dict[str, Any], source: str) -> Example:
        """Raise ``DroppedSample`` when the sample cannot be used (reason in ``.reason``)."""
        images = list(sample.get("images") or [])
        if "messages" in sample:
            tokens = tokenize_conversation(
                sample["messages"],
                self.tokenizer,
                max_length=self.max_length,
                num_images=len(images),
            )
        else:
            tokens = tokenize_document(
                sample["document"],
                self.tokenizer,
                max_length=self.max_length,
                num_images=len(images),
            )
        # Truncation removes whole trailing turns (or trailing text), so the images it keeps
        # are the first ``num_images`` ones.
        kept = int(tokens["num_images"])
        # tokenize always masks position 0, so num_supervised is the post-shift count
        if self.drop_unsupervised and int(tokens["num_supervised"]) == 0:
            raise DroppedSample("no_supervised_tokens")  # type: ignore[arg-type]
        convert = self.transform.to_uint8 if self.normalize_in_collate else self.transform
        if kept:
            pixel_values = torch.stack([convert(im) for im in images[:kept]])
        else:
            size = self.transform.image_size
            dtype = torch.uint8 if self.normalize_in_collate else torch.float32
            pixel_values = torch.zeros(0, 3, size, size, dtype=dtype)  # (0, 3, H, W)
        return {
            "input_ids": tokens["input_ids"],
            "labels": tokens["labels"],
            "pixel_values": pixel_values,  # (n, 3, H, W), uint8 if normalize_in_collate
            "key": str(sample.get("key", "")),
            "source": source,
            "meta": sample.get("meta") or {},
            "messages": sample.get("messages"),
        }

    def maybe(
        self, sample: dict[str, Any], source: str, counter: Counter[str], *, strict: bool = False
    ) -> Example | None:
        """``self(sample, source)``, or None after counting ``dropped/<reason>``.

        A malformed sample (the tokenizer's ValueError, e.g. a literal ``<image>`` typed in
        the text) is counted as ``dropped/invalid_sample``, or raised naming shard and key
        when ``strict``.
        """
        try:
            return self(sample, source)
        except DroppedSample as exc:
            counter[f"dropped/{exc.reason}"] += 1
        except ValueError as exc:
            if strict:
                where = f"{sample.get('__url__', '?')}, sample {sample.get('key')!r}"
                raise ValueError(f"{where} (source {source!r}): {exc}") from exc
            counter["dropped/invalid_sample"] += 1
        return None
