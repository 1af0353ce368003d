"""The shapes world: deterministic synthetic VLM data (samples, shards, captions, text)."""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

from PIL import Image

from vlm_lit.data.shapes_scene import Scene, render_scene, sample_scene
from vlm_lit.data.shapes_tasks import POPE_TYPES, TASK_BUILDERS, q_color, q_count, q_position
from vlm_lit.data.shapes_tasks import text_qa as _text_qa
from vlm_lit.data.shards import write_shards

__all__ = [
    "DEFAULT_TASK_WEIGHTS",
    "POPE_TYPES",
    "TASKS",
    "Scene",
    "make_caption_pairs",
    "make_synthetic_samples",
    "make_synthetic_shards",
    "render_scene",
    "resolve_task_weights",
    "sample_scene",
    "world_text_corpus",
]

Split = Literal["train", "val", "test"]
TASKS: tuple[str, ...] = tuple(TASK_BUILDERS)
# Captions dominate (the align stage needs them); VQA kinds share most of the rest.
DEFAULT_TASK_WEIGHTS: dict[str, float] = {
    "caption": 0.30,
    "vqa_color": 0.10,
    "vqa_count": 0.10,
    "vqa_position": 0.10,
    "vqa_exist": 0.10,
    "mc": 0.08,
    "multiturn": 0.07,
    "compare": 0.05,
    "document": 0.05,
    "text": 0.05,
}


def resolve_task_weights(tasks: Sequence[str] | Mapping[str, float] | None) -> dict[str, float]:
    """None -> the default mix; a list -> equal weights; a mapping -> those weights."""
    if tasks is None:
        return dict(DEFAULT_TASK_WEIGHTS)
    weights = dict(tasks) if isinstance(tasks, Mapping) else dict.fromkeys(tasks, 1.0)
    unknown = sorted(set(weights) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown shapes task(s) {unknown}; valid tasks: {sorted(TASKS)}")
    if not weights or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"task weights must be >= 0 with a positive sum, got {weights}")
    return {k: float(v) for k, v in weights.items() if v > 0}


def _rng(kind: str, seed: int, split: str, index: int) -> random.Random:
    # String seeds hash with SHA-512: stable across runs and PYTHONHASHSEED, distinct per
    # split so train and val never share a sample stream.
    return random.Random(f"shapes/{kind}/{split}/{seed}/{index}")


def make_synthetic_samples(
    num_samples: int,
    *,
    seed: int = 0,
    split: Split = "train",
    tasks: Sequence[str] | Mapping[str, float] | None = None,
    image_size: int = 64,
) -> Iterator[dict[str, Any]]:
    """Yield `num_samples` shapes-world samples in the library's sample schema.

    Each sample has `key`, `messages` or `document`, `images` (RGB PIL) and `meta` with
    `task`, `split`, `source="shapes"` and, where a short answer exists, `answers`.
    """
    weights = resolve_task_weights(tasks)
    names, probs = list(weights), list(weights.values())
    ordinals: Counter[str] = Counter()
    for index in range(num_samples):
        rng = _rng("sample", seed, split, index)
        task = rng.choices(names, probs)[0]
        sample = TASK_BUILDERS[task](rng, ordinals[task], image_size)
        ordinals[task] += 1
        sample["key"] = f"shapes-{split}-{index:08d}"
        sample["meta"].update(task=task, split=split, source="shapes")
        yield sample


def make_synthetic_shards(
    out_dir: str | os.PathLike[str],
    *,
    num_samples: int,
    seed: int = 0,
    split: Split = "train",
    tasks: Sequence[str] | Mapping[str, float] | None = None,
    image_size: int = 64,
    max_samples_per_shard: int = 1000,
) -> list[str]:
    """Write the shapes world to `out_dir/shapes-{split}-{n:06d}.tar`; return shard paths."""
    samples = make_synthetic_samples(
        num_samples, seed=seed, split=split, tasks=tasks, image_size=image_size
    )
    return write_shards(
        samples, out_dir, max_samples_per_shard=max_samples_per_shard, prefix=f"shapes-{split}"
    )


def make_caption_pairs(
    num_samples: int, *, seed: int = 0, split: Split = "train", image_size: int = 64
) -> Iterator[tuple[Image.Image, str]]:
    """(image, caption) pairs for contrastive pretraining of a vision tower."""
    for index in range(num_samples):
        scene = sample_scene(_rng("pair", seed, split, index))
        yield render_scene(scene, image_size), scene.caption()


def world_text_corpus(seed: int, n: int) -> list[str]:
    """`n` lines of shapes-world text for LM pretraining.

    Half are captions, a third pair a caption with a question and its answer (so the LM
    learns the world's vocabulary and answer format), the rest are image-free questions.
    """
    lines = []
    for index in range(n):
        rng = _rng("text", seed, "corpus", index)
        roll = rng.random()
        if roll < 0.5:
            lines.append(sample_scene(rng).caption())
        elif roll < 0.83:
            scene = sample_scene(rng)
            qa = rng.choice([q_color, q_count, q_position])(rng, scene, 0)
            qa = qa or q_color(rng, scene, 0)
            lines.append(f"{scene.caption()} . {qa[0]} {qa[1]}")
        else:
            question, answer = _text_qa(rng)
            lines.append(f"{question} {answer}")
    return lines
