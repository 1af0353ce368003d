"""TrainStream / EvalStream: rank x worker split, equal batch counts, mixing, determinism."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch

from vlm_lit.data.collate import supervised_tokens
from vlm_lit.data.shards import write_shards
from vlm_lit.data.sources import Source, eval_shards, parse_sources
from vlm_lit.data.stream import EvalStream, TrainStream, shuffle_buffer


class FakePreparer:
    """Stands in for ExamplePreparer: no tokenizer, so 10k samples stream in seconds."""

    def __init__(self, drop_every: int = 0) -> None:
        self.drop_every = drop_every

    def collate_args(self) -> dict[str, int]:
        return {"pad_token_id": 0, "image_size": 4}

    def maybe(self, sample: dict, source: str, counter, *, strict: bool = False) -> dict | None:
        index = int(sample["key"].rsplit("_", 1)[1])
        if self.drop_every and index % self.drop_every == 0:
            counter["dropped/too_long"] += 1
            return None
        return {
            "input_ids": torch.tensor([1, 2, 3]),
            "labels": torch.tensor([-100, 2, 3]),
            "key": sample["key"],
            "source": source,
        }


def text_shards(out: Path, name: str, sizes: list[int]) -> list[str]:
    """Shards of text-only chats with the given sample counts; keys ``{name}_{i}``."""
    paths, start = [], 0
    for shard, size in enumerate(sizes):
        samples = [
            {
                "key": f"{name}_{i}",
                "messages": [
                    {"role": "user", "content": f"question {i}"},
                    {"role": "assistant", "content": f"answer {i}"},
                ],
            }
            for i in range(start, start + size)
        ]
        start += size
        paths += write_shards(samples, out, prefix=f"{name}{shard}", max_samples_per_shard=size)
    return paths


def train_stream(urls: list[str], batches_per_rank: int, **kwargs) -> TrainStream:
    sources = kwargs.pop("sources", None) or [Source("a", tuple(urls))]
    return TrainStream(
        sources,
        FakePreparer(),  # type: ignore[arg-type]
        batch_size=kwargs.pop("batch_size", 4),
        batches_per_rank=batches_per_rank,
        shuffle_buffer=kwargs.pop("shuffle_buffer", 8),
        **kwargs,
    )


def run_ranks(stream, world: int = 2, workers: int = 2) -> dict[int, list[dict]]:
    """Every batch each simulated rank yields, its workers' batches concatenated."""
    return {
        rank: [
            batch
            for worker in range(workers)
            for batch in stream.iterate(
                rank=rank, world_size=world, worker=worker, num_workers=workers
            )
        ]
        for rank in range(world)
    }


def test_uneven_shards_give_equal_batch_counts_per_rank(tmp_path: Path) -> None:
    urls = text_shards(tmp_path, "u", [10, 3, 17, 5, 9, 1, 6])  # 7 uneven shards
    stream = train_stream(urls, batches_per_rank=6)
    per_rank = run_ranks(stream)
    assert [len(b) for b in per_rank.values()] == [6, 6]
    assert all(len(b["keys"]) == 4 for batches in per_rank.values() for b in batches)
    # the rank holding the 1-sample shard cycles it instead of running dry
    keys = [k for batches in per_rank.values() for b in batches for k in b["keys"]]
    assert len(keys) == 48 and len(set(keys)) < 48


def test_divisible_shards_give_every_key_exactly_once(tmp_path: Path) -> None:
    urls = text_shards(tmp_path, "d", [10] * 8)
    stream = train_stream(urls, batches_per_rank=8, batch_size=5, shuffle_buffer=4)
    per_rank = run_ranks(stream)
    keys = [k for batches in per_rank.values() for b in batches for k in b["keys"]]
    assert sorted(keys) == sorted(f"d_{i}" for i in range(80))
    assert len(per_rank[0]) == len(per_rank[1]) == 8


def test_shard_order_is_seeded_by_seed_and_epoch_and_equal_on_every_rank(tmp_path: Path) -> None:
    urls = text_shards(tmp_path, "o", [2] * 8)
    source = Source("a", tuple(urls))
    rank0 = train_stream(urls, 1, rank=0, world_size=2)
    rank1 = train_stream(urls, 1, rank=1, world_size=2)
    assert rank0.shard_order(source) == rank1.shard_order(source)
    before = rank0.shard_order(source)
    rank0.epoch = 1
    assert rank0.shard_order(source) != before
    assert sorted(rank0.shard_order(source)) == sorted(urls)
    other_seed = train_stream(urls, 1, seed=1)
    assert other_seed.shard_order(source) != before


def test_same_seed_same_order_and_different_seed_differs(tmp_path: Path) -> None:
    urls = text_shards(tmp_path, "s", [7, 9, 8, 6])

    def keys(seed: int, epoch: int = 0) -> list[str]:
        stream = train_stream(urls, batches_per_rank=10, seed=seed)
        stream.epoch = epoch
        return [k for b in stream.iterate(worker=0, num_workers=1) for k in b["keys"]]

    assert keys(0) == keys(0)
    assert keys(0) != keys(1)
    assert keys(0, epoch=0) != keys(0, epoch=1)


def test_mixing_weights_within_tolerance_over_10k_samples(tmp_path: Path) -> None:
    weights = {"captions": 0.5, "vqa": 0.3, "text": 0.2}
    sources = [
        Source(name, tuple(text_shards(tmp_path / name, name, [250] * 4)), weight)
        for name, weight in weights.items()
    ]
    stream = train_stream([], batches_per_rank=500, batch_size=20, sources=sources)
    counts: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    for batch in stream.iterate(worker=0, num_workers=1):
        counts.update(batch["sources"])
        total.update(batch["counters"])
    assert sum(counts.values()) == 10_000
    for name, weight in weights.items():
        assert abs(counts[name] / 10_000 - weight) < 0.02, (name, counts)
        assert total[f"samples/{name}"] == counts[name]  # per-source counters agree


def test_fewer_shards_than_ranks_times_workers_is_a_clear_error(tmp_path: Path) -> None:
    urls = text_shards(tmp_path, "f", [5, 5, 5])
    stream = train_stream(urls, batches_per_rank=2)
    with pytest.raises(ValueError, match=r"3 shard\(s\).*2 rank\(s\) x 2 worker\(s\) = 4"):
        next(stream.iterate(rank=0, world_size=2, worker=0, num_workers=2))


def test_dropped_samples_are_counted_and_batches_stay_full(tmp_path: Path) -> None:
    urls = text_shards(tmp_path, "x", [10, 10])
    stream = train_stream(urls, batches_per_rank=3)
    stream.prepare = FakePreparer(drop_every=4)  # type: ignore[assignment]
    batches = list(stream.iterate(worker=0, num_workers=1))
    dropped = sum(b["counters"].get("dropped/too_long", 0) for b in batches)
    assert len(batches) == 3 and all(len(b["keys"]) == 4 for b in batches)
    assert dropped >= 3
    assert not any(int(k.rsplit("_", 1)[1]) % 4 == 0 for b in batches for k in b["keys"])


def test_shuffle_buffer_is_a_permutation() -> None:
    import random

    out = list(shuffle_buffer(iter(range(50)), 8, random.Random(0)))
    assert sorted(out) == list(range(50)) and out != list(range(50))


@pytest.mark.parametrize("workers", [1, 2])
def test_validation_covers_every_sample_exactly_once_across_ranks(
    tmp_path: Path, workers: int
) -> None:
    urls = text_shards(tmp_path, "v", [7, 3, 12, 1, 5])  # 28 samples, uneven
    shards = eval_shards(parse_sources(urls, default_name="val"), generation_subset=10)
    assert sum(s.num_samples for s in shards) == 28
    stream = EvalStream(shards, FakePreparer(), batch_size=4)  # type: ignore[arg-type]
    per_rank = run_ranks(stream, world=2, workers=workers)
    assert len(per_rank[0]) == len(per_rank[1])  # no rank waits on the other
    real = [b for batches in per_rank.values() for b in batches if not b["is_padding"]]
    keys = [k for b in real for k in b["keys"]]
    assert sorted(keys) == sorted(f"v_{i}" for i in range(28))  # each exactly once
    padding = [b for batches in per_rank.values() for b in batches if b["is_padding"]]
    assert padding and all(supervised_tokens(b["labels"]) == 0 for b in padding)
    assert sum(g for b in real for g in b["generate"]) == 10


def test_validation_pads_when_samples_are_dropped(tmp_path: Path) -> None:
    urls = text_shards(tmp_path, "w", [8, 8])
    shards = eval_shards(parse_sources(urls, default_name="val"), generation_subset=0)
    stream = EvalStream(shards, FakePreparer(drop_every=2), batch_size=4)  # type: ignore[arg-type]
    per_rank = run_ranks(stream, world=2, workers=1)
    assert [len(b) for b in per_rank.values()] == [2, 2]  # 4 planned per rank kept
    assert sum(len(b["keys"]) for r in per_rank.values() for b in r if not b["is_padding"]) == 8
