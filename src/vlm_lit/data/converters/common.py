"""Shared converter pieces: safe image paths, image loading, progress and summary."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from vlm_lit.data.safe_decode import DecodeLimits, DecodeProblem, decode_image
from vlm_lit.data.shard_errors import OK, SampleCounter
from vlm_lit.data.shards import EncodedImage, sanitize_key, write_shards

logger = logging.getLogger(__name__)
_EXT_OF_FORMAT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass
class ConversionSummary:
    """What a converter did: samples written, shard paths, and skips by reason."""

    written: int
    shards: list[str]
    skipped: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in self.skipped.items()) or "none"
        return f"wrote {self.written} samples to {len(self.shards)} shard(s); skipped: {reasons}"


def safe_join(root: str | os.PathLike[str], relative: str) -> Path:
    """`root / relative`, refusing absolute paths, `..` escapes and symlinks leading out."""
    if not isinstance(relative, str) or not relative or os.path.isabs(relative):
        raise DecodeProblem("path_escape", f"image path {relative!r} must be relative")
    try:
        base = Path(root).resolve()
        target = (base / relative).resolve()  # resolves symlinks, so links out are caught
    except (OSError, ValueError) as exc:
        raise DecodeProblem("path_escape", f"image path {relative!r}: {exc}") from None
    if not target.is_relative_to(base):
        raise DecodeProblem("path_escape", f"image path {relative!r} leaves {str(base)!r}")
    return target


def encoded_image(data: bytes, limits: DecodeLimits) -> EncodedImage:
    """Verify `data` decodes within the limits; keep the original bytes (no re-encoding)."""
    if len(data) > limits.max_member_bytes:
        raise DecodeProblem("image_too_large", f"{len(data)} bytes > {limits.max_member_bytes}")
    image = decode_image(data, limits)
    return EncodedImage(data, _EXT_OF_FORMAT[image.format or "PNG"])  # type: ignore[arg-type]


def load_image_file(
    root: str | os.PathLike[str], relative: str, limits: DecodeLimits
) -> EncodedImage:
    """Read `root/relative` safely (see `safe_join`) as an `EncodedImage`."""
    path = safe_join(root, relative)
    if not path.is_file():
        raise DecodeProblem("missing_image", f"{relative!r} not found under {str(root)!r}")
    if path.stat().st_size > limits.max_member_bytes:
        raise DecodeProblem("image_too_large", f"{relative!r} exceeds max_member_bytes")
    return encoded_image(path.read_bytes(), limits)


class KeyAllocator:
    """Sanitised, unique sample keys; a repeated source id gets a `-dupN` suffix."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def __call__(self, source_id: str) -> str:
        key = base = sanitize_key(source_id)
        n = 1
        while key in self.seen:
            key, n = f"{base}-dup{n}", n + 1
        self.seen.add(key)
        return key


def run_conversion(
    records: Iterable[dict[str, Any] | None],
    out_dir: str | os.PathLike[str],
    counter: SampleCounter,
    *,
    prefix: str,
    max_samples_per_shard: int,
    total: int | None,
    description: str,
    progress: bool,
) -> ConversionSummary:
    """Write the converter's samples (None = a skipped record) with a progress bar."""
    console = Console(stderr=True)

    def tracked() -> Iterator[dict[str, Any]]:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn())  # fmt: skip
        with Progress(*columns, console=console, disable=not progress) as bar:
            task = bar.add_task(description, total=total)
            for record in records:
                bar.advance(task)
                if record is not None:
                    counter[OK] += 1
                    yield record

    shards = write_shards(
        tracked(), out_dir, max_samples_per_shard=max_samples_per_shard, prefix=prefix
    )
    summary = ConversionSummary(counter[OK], shards, counter.problems())
    if progress:
        console.print(f"[bold]{description}[/bold]: {summary} -> {out_dir}")
    logger.info("%s: %s", description, summary)
    return summary
