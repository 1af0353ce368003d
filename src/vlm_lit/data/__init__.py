"""Data: response-only tokenization, safe WebDataset shards, the DataModule, converters."""

from __future__ import annotations

from typing import Any

from vlm_lit.data.shard_errors import SampleCounter, ShardError
from vlm_lit.data.shards import EncodedImage, read_samples, write_shards
from vlm_lit.data.synthetic import (
    DEFAULT_TASK_WEIGHTS,
    TASKS,
    make_caption_pairs,
    make_synthetic_samples,
    make_synthetic_shards,
    render_scene,
    world_text_corpus,
)
from vlm_lit.data.tar_stream import expand_urls
from vlm_lit.data.tokenize import (
    IMAGE_TOKEN,
    DroppedSample,
    ensure_image_token,
    tokenize_conversation,
    tokenize_document,
)

__all__ = [
    "DEFAULT_TASK_WEIGHTS",
    "IMAGE_TOKEN",
    "TASKS",
    "DroppedSample",
    "EncodedImage",
    "SampleCounter",
    "ShardError",
    "VLMDataModule",
    "ensure_image_token",
    "expand_urls",
    "make_caption_pairs",
    "make_synthetic_samples",
    "make_synthetic_shards",
    "read_samples",
    "render_scene",
    "tokenize_conversation",
    "tokenize_document",
    "world_text_corpus",
    "write_shards",
]


def __getattr__(name: str) -> Any:
    # The DataModule pulls in Lightning; load it only when asked for, so that the model code
    # (which needs the tokenizer helpers) stays importable without the trainer.
    if name == "VLMDataModule":
        from vlm_lit.data.datamodule import VLMDataModule

        return VLMDataModule
    raise AttributeError(f"module 'vlm_lit.data' has no attribute {name!r}")
