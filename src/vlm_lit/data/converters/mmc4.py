"""MMC4 interleaved shards (`text_list` + `image_info`) -> vlm_lit `document` samples."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlm_lit.data.converters.common import (
    ConversionSummary,
    KeyAllocator,
    encoded_image,
    load_image_file,
    run_conversion,
)
from vlm_lit.data.safe_decode import DecodeLimits, DecodeProblem, decode_json
from vlm_lit.data.shard_errors import ProblemSink, SampleCounter
from vlm_lit.data.shards import EncodedImage
from vlm_lit.data.tar_stream import expand_urls, iter_groups


def _image_bytes(
    info: dict[str, Any], image_folder: Path | None, limits: DecodeLimits
) -> EncodedImage:
    encoded = info.get("image_base64")
    if isinstance(encoded, str):
        if len(encoded) * 3 // 4 > limits.max_member_bytes:
            raise DecodeProblem("image_too_large", "image_base64 exceeds max_member_bytes")
        try:
            data = base64.b64decode(encoded, validate=True)
        except binascii.Error as exc:
            raise DecodeProblem("bad_image", f"invalid image_base64: {exc}") from None
        return encoded_image(data, limits)
    name = info.get("image_name")
    if image_folder is None or not isinstance(name, str):
        raise DecodeProblem("missing_image", "no image_base64 and no image_folder/image_name")
    return load_image_file(image_folder, name, limits)


def document_from_json(
    obj: Any,
    counter: SampleCounter,
    limits: DecodeLimits,
    *,
    image_folder: Path | None = None,
    min_similarity: float | None = None,
    max_images: int | None = None,
) -> tuple[list[dict[str, str]], list[EncodedImage]]:
    """Build document parts, each image placed right before its matched sentence.

    Images that cannot be used are dropped and counted as `image:<reason>`.
    """
    if not isinstance(obj, dict):
        raise DecodeProblem("invalid_schema", "the JSON member must be an object")
    texts, infos = obj.get("text_list"), obj.get("image_info", [])
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise DecodeProblem("invalid_schema", "'text_list' must be a list of strings")
    if not isinstance(infos, list):
        raise DecodeProblem("invalid_schema", "'image_info' must be a list")
    by_sentence: dict[int, list[EncodedImage]] = {}
    kept = 0
    for info in infos:
        try:
            index = info.get("matched_text_index") if isinstance(info, dict) else None
            if not isinstance(index, int) or not 0 <= index < len(texts):
                raise DecodeProblem("bad_matched_index", f"matched_text_index={index!r}")
            similarity = info.get("matched_sim")
            if min_similarity is not None and not (
                isinstance(similarity, (int, float)) and similarity >= min_similarity
            ):
                raise DecodeProblem("low_similarity", f"matched_sim={similarity!r}")
            if max_images is not None and kept >= max_images:
                raise DecodeProblem("over_max_images", f"more than {max_images} images")
            by_sentence.setdefault(index, []).append(_image_bytes(info, image_folder, limits))
            kept += 1
        except DecodeProblem as exc:
            counter[f"image:{exc.reason}"] += 1
    parts: list[dict[str, str]] = []
    images: list[EncodedImage] = []
    for i, sentence in enumerate(texts):
        for image in by_sentence.get(i, []):
            parts.append({"type": "image"})
            images.append(image)
        sentence = sentence.strip()
        if not sentence:
            continue
        if parts and parts[-1]["type"] == "text":  # one text part per run of sentences
            parts[-1]["text"] += " " + sentence
        else:
            parts.append({"type": "text", "text": sentence})
    return parts, images


def _samples(
    urls: list[str], limits: DecodeLimits, counter: SampleCounter, options: dict[str, Any]
) -> Iterator[dict[str, Any] | None]:
    keys = KeyAllocator()
    sink = ProblemSink(strict=False, counters=[counter])
    keep_text_only, limit = options.pop("keep_text_only"), options.pop("limit")
    done = 0
    for url in urls:
        for key, members in iter_groups(url, sink, limits):
            if limit is not None and done >= limit:
                return
            done += 1
            try:
                if "json" not in members:
                    raise DecodeProblem("missing_json", "no .json member")
                obj = decode_json(members["json"], limits)
                parts, images = document_from_json(obj, counter, limits, **options)
                if not any(p["type"] == "text" for p in parts):
                    raise DecodeProblem("empty_document", "no text left")
                if not images and not keep_text_only:
                    raise DecodeProblem("no_images", "no usable image left")
            except DecodeProblem as exc:
                counter[exc.reason] += 1
                yield None
                continue
            meta: dict[str, Any] = {"source": "mmc4", "task": "document"}
            if isinstance(obj.get("url"), str):
                meta["url"] = obj["url"]
            yield {"key": keys(key), "document": parts, "images": images, "meta": meta}


def convert_mmc4(
    shards: str | list[str],
    out_dir: str,
    *,
    image_folder: str | None = None,
    min_similarity: float | None = None,
    max_images: int | None = None,
    keep_text_only: bool = False,
    prefix: str = "mmc4",
    max_samples_per_shard: int = 1000,
    limit: int | None = None,
    max_image_pixels: int = 64_000_000,
    progress: bool = True,
) -> ConversionSummary:
    """Convert MMC4-style interleaved shards to `document` samples.

    Args:
        shards: Shard spec: path, brace range, directory or list; `{key}.json` holds
            `text_list` and `image_info` (`image_name`, `matched_text_index`, optional
            `image_base64`, optional `matched_sim`).
        out_dir: Output directory for `{prefix}-{n:06d}.tar` shards.
        image_folder: Folder with the images by `image_name`, for entries without base64.
        min_similarity: Drop images whose `matched_sim` is below this (OpenFlamingo-style).
        max_images: Keep at most this many images per document.
        keep_text_only: Keep documents whose images were all dropped.
        prefix: Shard file name prefix.
        max_samples_per_shard: Samples per shard.
        limit: Convert only the first `limit` documents.
        max_image_pixels: Images declaring more pixels are dropped and counted.
        progress: Show a progress bar and print the final summary.
    """
    counter = SampleCounter()
    limits = DecodeLimits(max_image_pixels=max_image_pixels)
    options = {
        "image_folder": Path(image_folder) if image_folder else None,
        "min_similarity": min_similarity,
        "max_images": max_images,
        "keep_text_only": keep_text_only,
        "limit": limit,
    }
    return run_conversion(
        _samples(expand_urls(shards), limits, counter, options),
        out_dir,
        counter,
        prefix=prefix,
        max_samples_per_shard=max_samples_per_shard,
        total=None,
        description="mmc4",
        progress=progress,
    )
