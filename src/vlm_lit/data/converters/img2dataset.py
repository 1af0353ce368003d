"""img2dataset caption shards (`{key}.jpg` + `{key}.txt` [+ `.json`]) -> caption conversations."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

from vlm_lit.data.converters.common import (
    ConversionSummary,
    KeyAllocator,
    encoded_image,
    run_conversion,
)
from vlm_lit.data.prompts import CAPTION_PROMPTS, pick_caption_prompt
from vlm_lit.data.safe_decode import DecodeLimits, DecodeProblem, decode_json, decode_text
from vlm_lit.data.shard_errors import ProblemSink, SampleCounter
from vlm_lit.data.tar_stream import expand_urls, iter_groups

_IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")


def group_to_sample(
    key: str, members: dict[str, bytes], limits: DecodeLimits, prompt: str
) -> dict[str, Any]:
    """One img2dataset group -> a caption conversation; raises DecodeProblem when unusable."""
    found = [s for s in _IMAGE_SUFFIXES if s in members]
    if not found:
        raise DecodeProblem("missing_image", f"no {'/'.join(_IMAGE_SUFFIXES)} member")
    if len(found) > 1:
        raise DecodeProblem("duplicate_image", f"several image members {found}")
    if "txt" not in members:
        raise DecodeProblem("missing_caption", "no .txt member")
    caption = decode_text(members["txt"], limits).strip()
    if not caption:
        raise DecodeProblem("empty_caption", "the .txt member is blank")
    info = decode_json(members["json"], limits) if "json" in members else {}
    image = encoded_image(members[found[0]], limits)
    meta: dict[str, Any] = {"source": "img2dataset", "task": "caption", "answers": [caption]}
    if isinstance(info, dict) and isinstance(info.get("url"), str):
        meta["url"] = info["url"]
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
        {"role": "assistant", "content": [{"type": "text", "text": caption}]},
    ]
    return {"messages": messages, "images": [image], "meta": meta}


def _samples(
    urls: list[str],
    limits: DecodeLimits,
    counter: SampleCounter,
    seed: int,
    prompts: tuple[str, ...],
    limit: int | None,
) -> Iterator[dict[str, Any] | None]:
    keys = KeyAllocator()
    sink = ProblemSink(strict=False, counters=[counter])
    done = 0
    for url in urls:
        for key, members in iter_groups(url, sink, limits):
            if limit is not None and done >= limit:
                return
            done += 1
            # Seeded by (seed, key): the prompt of a sample does not depend on shard order.
            prompt = pick_caption_prompt(random.Random(f"{seed}/{key}"), prompts)
            try:
                sample = group_to_sample(key, members, limits, prompt)
            except DecodeProblem as exc:
                counter[exc.reason] += 1
                yield None
                continue
            sample["key"] = keys(key)
            yield sample


def convert_img2dataset(
    shards: str | list[str],
    out_dir: str,
    *,
    seed: int = 0,
    prompts: Sequence[str] | None = None,
    prefix: str = "caption",
    max_samples_per_shard: int = 1000,
    limit: int | None = None,
    max_image_pixels: int = 64_000_000,
    progress: bool = True,
) -> ConversionSummary:
    """Convert img2dataset caption shards to caption conversations.

    Args:
        shards: Shard spec: path, brace range ("d/{00000..00009}.tar"), directory or list.
        out_dir: Output directory for `{prefix}-{n:06d}.tar` shards.
        seed: Seed of the per-sample choice of caption instruction.
        prompts: Caption instruction pool (default: vlm_lit.data.prompts.CAPTION_PROMPTS).
        prefix: Shard file name prefix.
        max_samples_per_shard: Samples per shard.
        limit: Convert only the first `limit` samples.
        max_image_pixels: Images declaring more pixels are skipped and counted.
        progress: Show a progress bar and print the final summary.
    """
    pool = tuple(prompts) if prompts else CAPTION_PROMPTS
    counter = SampleCounter()
    limits = DecodeLimits(max_image_pixels=max_image_pixels)
    return run_conversion(
        _samples(expand_urls(shards), limits, counter, seed, pool, limit),
        out_dir,
        counter,
        prefix=prefix,
        max_samples_per_shard=max_samples_per_shard,
        total=None,
        description="img2dataset",
        progress=progress,
    )
