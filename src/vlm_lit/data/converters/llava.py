"""LLaVA instruction JSON (`id`, `image`, `conversations`) + image folder -> vlm_lit shards."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlm_lit.data.converters.common import (
    ConversionSummary,
    KeyAllocator,
    load_image_file,
    run_conversion,
)
from vlm_lit.data.safe_decode import DecodeLimits, DecodeProblem
from vlm_lit.data.shard_errors import SampleCounter

LLAVA_IMAGE_TOKEN = "<image>"
ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
            "model": "assistant", "system": "system"}  # fmt: skip


def load_records(path: str | Path) -> list[Any]:
    """A LLaVA annotation file: one JSON list, or JSON Lines (`.jsonl`)."""
    text = Path(path).read_text(encoding="utf-8")
    if str(path).endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    records = json.loads(text)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of LLaVA records, got {type(records)}")
    return records


def _parts(text: str) -> list[dict[str, str]]:
    """Split text at `<image>` into text/image parts; whitespace around images is layout."""
    parts: list[dict[str, str]] = []
    for i, segment in enumerate(text.split(LLAVA_IMAGE_TOKEN)):
        if i > 0:
            parts.append({"type": "image"})
        if segment.strip():
            parts.append({"type": "text", "text": segment.strip()})
    return parts


def record_to_messages(record: Any, num_images: int) -> list[dict[str, Any]]:
    """LLaVA `conversations` -> messages with one image part per `<image>` (validated)."""
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list) or not turns:
        raise DecodeProblem("invalid_record", "'conversations' must be a non-empty list")
    messages: list[dict[str, Any]] = []
    tokens = 0
    for turn in turns:
        speaker = turn.get("from") if isinstance(turn, dict) else None
        role = ROLE_MAP.get(speaker) if isinstance(speaker, str) else None
        value = turn.get("value") if isinstance(turn, dict) else None
        if role is None or not isinstance(value, str):
            raise DecodeProblem("invalid_record", f"bad turn {str(turn)[:80]!r}")
        if role == "assistant":
            if LLAVA_IMAGE_TOKEN in value:
                raise DecodeProblem("image_in_response", "an assistant turn contains <image>")
            messages.append({"role": role, "content": [{"type": "text", "text": value}]})
            continue
        tokens += value.count(LLAVA_IMAGE_TOKEN)
        messages.append({"role": role, "content": _parts(value)})
    first_user = next((m for m in messages if m["role"] == "user"), None)
    if num_images and tokens == 0 and first_user is not None:
        # LLaVA puts the image before the first question when the text has no token.
        first_user["content"].insert(0, {"type": "image"})
        tokens = num_images
    if tokens != num_images:
        raise DecodeProblem(
            "image_token_mismatch", f"{tokens} <image> token(s) but {num_images} image(s)"
        )
    return messages


def _samples(
    records: list[Any], image_folder: Path, limits: DecodeLimits, counter: SampleCounter
) -> Iterator[dict[str, Any] | None]:
    keys = KeyAllocator()
    for index, record in enumerate(records):
        try:
            if not isinstance(record, dict):
                raise DecodeProblem("invalid_record", "a record must be a JSON object")
            names = record.get("image")
            names = [] if names is None else [names] if isinstance(names, str) else names
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise DecodeProblem("invalid_record", "'image' must be a path or a list of paths")
            messages = record_to_messages(record, len(names))
            images = [load_image_file(image_folder, name, limits) for name in names]
        except DecodeProblem as exc:
            counter[exc.reason] += 1
            yield None
            continue
        source_id = str(record.get("id", index))
        meta = {"source": "llava", "id": source_id, "task": "instruct"}
        yield {"key": keys(source_id), "messages": messages, "images": images, "meta": meta}


def convert_llava(
    annotations: str,
    image_folder: str,
    out_dir: str,
    *,
    prefix: str = "llava",
    max_samples_per_shard: int = 1000,
    limit: int | None = None,
    max_image_pixels: int = 64_000_000,
    progress: bool = True,
) -> ConversionSummary:
    """Convert LLaVA instruction data to shards.

    Args:
        annotations: LLaVA JSON list (or .jsonl) with `id`, optional `image`, `conversations`.
        image_folder: Folder the `image` paths are relative to; paths leaving it are refused.
        out_dir: Output directory for `{prefix}-{n:06d}.tar` shards.
        prefix: Shard file name prefix.
        max_samples_per_shard: Samples per shard.
        limit: Convert only the first `limit` records.
        max_image_pixels: Images declaring more pixels are skipped and counted.
        progress: Show a progress bar and print the final summary.
    """
    records = load_records(annotations)[:limit]
    counter = SampleCounter()
    limits = DecodeLimits(max_image_pixels=max_image_pixels)
    return run_conversion(
        _samples(records, Path(image_folder), limits, counter),
        out_dir,
        counter,
        prefix=prefix,
        max_samples_per_shard=max_samples_per_shard,
        total=len(records),
        description="llava",
        progress=progress,
    )
