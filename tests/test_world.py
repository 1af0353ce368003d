"""The embedded shapes world: what each cached part holds."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from vlm_lit.data.shards import read_samples
from vlm_lit.world import ensure_world
from vlm_lit.world.build import INSTRUCTION_TASK_WEIGHTS


def _tasks(shards: list[str]) -> Counter[str]:
    return Counter(sample["meta"]["task"] for sample in read_samples(shards))


def test_parts_hold_instruction_captions_and_default_mix(micro_world_home: Path) -> None:
    world = ensure_world(profile="micro")
    train = _tasks(world.shards("train"))
    # train is instruction data: answers dominate, captions are a small share
    assert sum(train.values()) == 96
    assert set(train) <= set(INSTRUCTION_TASK_WEIGHTS)
    vqa = sum(n for task, n in train.items() if task.startswith("vqa_"))
    assert vqa >= 0.45 * 96, train
    assert train["caption"] <= 0.15 * 96, train
    # align is captions only (LLaVA's first stage), val is the library's default mix
    assert set(_tasks(world.shards("align"))) == {"caption"}
    assert _tasks(world.shards("val"))["caption"] >= 0.15 * 32
