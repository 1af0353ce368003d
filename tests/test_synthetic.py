"""The shapes world: determinism, task coverage, answer correctness, POPE balance, speed."""

from __future__ import annotations

import hashlib
import random
import time
from collections import Counter
from pathlib import Path

import pytest

from vlm_lit.data.shapes_scene import RGB, Scene, object_prior
from vlm_lit.data.shapes_tasks import POPE_TYPES, q_exist
from vlm_lit.data.shards import read_samples
from vlm_lit.data.synthetic import (
    DEFAULT_TASK_WEIGHTS,
    TASKS,
    make_caption_pairs,
    make_synthetic_samples,
    make_synthetic_shards,
    render_scene,
    resolve_task_weights,
    sample_scene,
    world_text_corpus,
)


def _digest(paths: list[str]) -> str:
    return hashlib.sha256(b"".join(Path(p).read_bytes() for p in paths)).hexdigest()


def test_same_seed_gives_byte_identical_shards(tmp_path: Path) -> None:
    a = make_synthetic_shards(tmp_path / "a", num_samples=80, seed=5, max_samples_per_shard=30)
    b = make_synthetic_shards(tmp_path / "b", num_samples=80, seed=5, max_samples_per_shard=30)
    c = make_synthetic_shards(tmp_path / "c", num_samples=80, seed=6, max_samples_per_shard=30)
    v = make_synthetic_shards(tmp_path / "v", num_samples=80, seed=5, split="val")
    assert len(a) == 3 and _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    assert Path(v[0]).name == "shapes-val-000000.tar"
    train = [s.get("messages") for s in make_synthetic_samples(80, seed=5)]
    val = [s.get("messages") for s in read_samples(v)]
    assert (
        sum(t == w for t, w in zip(train, val, strict=True)) < 5
    )  # the splits are different streams


def test_shards_round_trip_the_in_memory_samples(tmp_path: Path) -> None:
    paths = make_synthetic_shards(tmp_path, num_samples=30, seed=2)
    for want, got in zip(make_synthetic_samples(30, seed=2), read_samples(paths), strict=True):
        assert (got["key"], got["meta"]) == (want["key"], want["meta"])
        assert [i.tobytes() for i in got["images"]] == [i.tobytes() for i in want["images"]]


def test_every_task_has_its_meta_and_short_answers() -> None:
    samples = list(make_synthetic_samples(300, seed=0, tasks=list(TASKS)))
    by_task = Counter(s["meta"]["task"] for s in samples)
    assert set(by_task) == set(TASKS)
    for s in samples:
        meta, task = s["meta"], s["meta"]["task"]
        assert meta["split"] == "train" and meta["source"] == "shapes"
        assert all(im.size == (64, 64) and im.mode == "RGB" for im in s["images"])
        if task == "document":
            assert sum(p["type"] == "image" for p in s["document"]) == len(s["images"]) >= 2
            continue
        answer = s["messages"][-1]["content"]
        answer = answer if isinstance(answer, str) else answer[0]["text"]
        assert meta["answers"] == [answer]
        if task.startswith("vqa_") or task in ("mc", "multiturn", "compare", "text"):
            assert len(answer.split()) == 1, (task, answer)
        if task == "text":
            assert s["images"] == []
        if task == "compare":
            assert len(s["images"]) == 2 and answer in ("yes", "no", "first", "second")
        if task == "mc":
            prompt = s["messages"][0]["content"][1]["text"]
            assert f"{answer}. {meta['answer_text']}" in prompt
        if task == "multiturn":
            assert len(s["messages"]) in (4, 6) and len(meta["turn_answers"]) * 2 == len(
                s["messages"]
            )
        if task == "vqa_exist":
            assert answer in ("yes", "no") and meta["pope_type"] in POPE_TYPES


def test_existence_is_balanced_per_pope_split() -> None:
    samples = list(make_synthetic_samples(600, seed=1, tasks=["vqa_exist"]))
    answers = Counter(s["meta"]["answers"][0] for s in samples)
    assert answers["yes"] == answers["no"] == 300
    per_split = Counter((s["meta"]["pope_type"], s["meta"]["answers"][0]) for s in samples)
    assert all(abs(per_split[(t, "yes")] - per_split[(t, "no")]) <= 1 for t in POPE_TYPES)
    assert all(per_split[(t, "no")] >= 90 for t in POPE_TYPES)


def test_existence_answers_are_true_to_the_scene() -> None:
    rng = random.Random(0)
    prior = object_prior()
    for ordinal in range(300):
        scene = sample_scene(rng)
        question, answer, extra = q_exist(rng, scene, ordinal)
        name = question.removeprefix("Is there a ").removesuffix(" in the image?")
        assert (name in scene.names()) == (answer == "yes")
        if answer == "no" and extra["pope_type"] == "adversarial":
            color, shape = name.split()
            assert any(o.color == color or o.shape == shape for o in scene.objects)
        if answer == "no" and extra["pope_type"] == "popular":
            absent = sorted((p for n, p in prior.items() if n not in scene.names()), reverse=True)
            assert prior[name] >= absent[2]


def test_render_draws_each_object_in_its_colour_and_cell() -> None:
    background = render_scene(Scene(()), image_size=16).getpixel((0, 0))
    for seed in range(30):
        scene = sample_scene(random.Random(seed))
        image = render_scene(scene, image_size=96)
        assert image.size == (96, 96) and image.mode == "RGB"
        by_cell = {o.cell: o for o in scene.objects}
        for cell in range(9):
            row, col = divmod(cell, 3)
            colours = Counter(
                image.crop((col * 32, row * 32, col * 32 + 32, row * 32 + 32)).getdata()
            )
            colours.pop(background, None)
            if cell not in by_cell:
                assert not colours, (seed, cell)  # nothing spills into empty cells
            else:
                main, count = colours.most_common(1)[0]
                assert main == RGB[by_cell[cell].color] and count >= 20, (seed, by_cell[cell])


def test_task_selection_and_errors() -> None:
    assert resolve_task_weights(None) == DEFAULT_TASK_WEIGHTS
    assert max(DEFAULT_TASK_WEIGHTS, key=DEFAULT_TASK_WEIGHTS.get) == "caption"
    only = {s["meta"]["task"] for s in make_synthetic_samples(40, tasks={"text": 1, "mc": 0})}
    assert only == {"text"}
    with pytest.raises(ValueError, match=r"valid tasks: \['caption'"):
        list(make_synthetic_samples(1, tasks=["vqa_colour"]))
    with pytest.raises(ValueError, match="positive sum"):
        resolve_task_weights({"text": 0})


def test_caption_pairs_and_text_corpus_are_deterministic() -> None:
    pairs = list(make_caption_pairs(5, seed=3))
    again = list(make_caption_pairs(5, seed=3))
    assert [c for _, c in pairs] == [c for _, c in again]
    assert [i.tobytes() for i, _ in pairs] == [i.tobytes() for i, _ in again]
    assert all(" , " in c or len(c.split()) == 4 for _, c in pairs)
    corpus = world_text_corpus(seed=0, n=200)
    assert corpus == world_text_corpus(seed=0, n=200) != world_text_corpus(seed=1, n=200)
    assert len(corpus) == 200 and all(isinstance(line, str) and line for line in corpus)
    assert any("How many" in line for line in corpus)


def test_generation_is_fast() -> None:
    start = time.perf_counter()
    n = sum(1 for _ in make_synthetic_samples(1000, seed=0))
    assert n == 1000 and time.perf_counter() - start < 20  # ~0.2 s on one idle core


@pytest.mark.slow
def test_ten_thousand_samples_to_shards_well_under_a_minute(tmp_path: Path) -> None:
    start = time.perf_counter()
    paths = make_synthetic_shards(tmp_path, num_samples=10_000, seed=0)
    assert len(paths) == 10 and time.perf_counter() - start < 60
