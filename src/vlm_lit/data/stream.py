"""The training and validation streams: shard split by rank then worker, mixing, batching."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from collections.abc import Iterator
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from vlm_lit.data.collate import Batch, batch_examples, collate_examples, padding_batch
from vlm_lit.data.example import ExamplePreparer
from vlm_lit.data.packing import collate_packed, pack_examples
from vlm_lit.data.shards import read_samples
from vlm_lit.data.sources import EvalShard, Source, check_shard_counts
from vlm_lit.data.tar_stream import OK, SampleCounter


def shuffle_buffer(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Approximate shuffle of a finite stream through a buffer of ``size`` items."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        index = rng.randrange(size)
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer


def _split(items: list[Any], index: int, count: int) -> list[Any]:
    return items[index::count]


class _Stats:
    """Counters of one iterator; ``delta()`` returns what changed since the previous call, so
    each batch carries only its own increments and the main process can sum them."""

    def __init__(self) -> None:
        self.reader = SampleCounter()  # filled by read_samples: reason -> skipped samples
        self.own: Counter[str] = Counter()
        self._sent: Counter[str] = Counter()

    def delta(self) -> dict[str, int]:
        now = Counter({f"skipped/{k}": v for k, v in self.reader.items() if k != OK})
        now.update(self.own)
        out = {k: v - self._sent[k] for k, v in now.items() if v != self._sent[k]}
        self._sent = now
        return out


def _worker(
    worker: int | None, num_workers: int | None
) -> tuple[int, int]:  # (worker id, worker count)
    if worker is not None and num_workers is not None:
        return worker, num_workers
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class TrainStream(IterableDataset):
    """Endless weighted mix of sources, cut to a fixed number of batches per rank and epoch.

    With ``packing`` a batch is ``batch_size`` rows of whole samples packed up to the
    preparer's ``max_length`` (see ``vlm_lit.data.packing``); validation is never packed.
    Every rank yields exactly ``batches_per_rank`` batches (split over its workers), so DDP
    never waits on a rank that ran dry: a worker whose shards run out reads them again in a
    new order (see the DataModule docs for the trade-off). Shards are shuffled with
    (seed, epoch) identically on every rank, split by rank, then by worker. ``allow_pipe``
    lets ``pipe:`` shard URLs run their shell command (refused by default).
    """

    def __init__(
        self,
        sources: list[Source],
        prepare: ExamplePreparer,
        *,
        batch_size: int,
        batches_per_rank: int,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        group_by_length: bool = False,
        strict: bool = False,
        rank: int = 0,
        world_size: int = 1,
        packing: bool = False,
        allow_pipe: bool = False,
    ) -> None:
        super().__init__()
        if packing and not prepare.max_length:
            raise ValueError(
                "--data.packing true packs samples into rows of --data.max_length tokens; "
                "set --data.max_length"
            )
        if not sources or any(s.weight < 0 for s in sources) or sum(s.weight for s in sources) <= 0:
            raise ValueError("train sources need at least one source and weights >= 0 with sum > 0")
        self.sources, self.prepare = sources, prepare
        self.batch_size, self.batches_per_rank = batch_size, batches_per_rank
        self.seed, self.shuffle_buffer, self.group_by_length = seed, shuffle_buffer, group_by_length
        self.strict, self.rank, self.world_size = strict, rank, world_size
        self.packing, self.allow_pipe = packing, allow_pipe
        self.epoch = 0

    def check_shards(self, num_workers: int, world_size: int | None = None) -> None:
        """Raise when a source has fewer shards than ranks x workers."""
        check_shard_counts(self.sources, world_size or self.world_size, num_workers)

    def shard_order(self, source: Source) -> list[str]:
        """The epoch's shard order of ``source``: the same on every rank and worker."""
        urls = list(source.urls)
        random.Random(f"shards/{self.seed}/{self.epoch}/{source.name}").shuffle(urls)
        return urls

    def _cycle(self, source: Source, shards: list[str], tag: str, stats: _Stats) -> Iterator:
        for rounds in itertools.count():
            rng = random.Random(f"samples/{tag}/{rounds}")
            order = shards if rounds == 0 else rng.sample(shards, len(shards))
            # The buffer holds checked, still-encoded samples; images are decoded on the way out.
            read = read_samples(
                order,
                strict=self.strict,
                counter=stats.reader,
                allow_pipe=self.allow_pipe,
                reorder=lambda raws, rng=rng: shuffle_buffer(raws, self.shuffle_buffer, rng),
            )
            empty = True
            for sample in read:
                empty = False
                yield sample
            if empty:
                raise RuntimeError(
                    f"train source {source.name!r}: shards {order} gave no readable sample; "
                    "check them with read_samples(..., strict=True)"
                )

    def iterate(
        self,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        worker: int | None = None,
        num_workers: int | None = None,
    ) -> Iterator[Batch]:
        """Yield this (rank, worker)'s batches; the overrides simulate distribution in tests."""
        rank = self.rank if rank is None else rank
        world = self.world_size if world_size is None else world_size
        worker, workers = _worker(worker, num_workers)
        self.check_shards(workers, world)
        tag = f"{self.seed}/{self.epoch}/{rank}/{worker}"
        stats = _Stats()
        streams = []
        for source in self.sources:
            mine = _split(_split(self.shard_order(source), rank, world), worker, workers)
            streams.append(self._cycle(source, mine, f"{tag}/{source.name}", stats))
        weights = [s.weight for s in self.sources]
        mixer = random.Random(f"mix/{tag}")

        def examples() -> Iterator[dict[str, Any]]:
            while True:
                index = mixer.choices(range(len(streams)), weights)[0]
                source = self.sources[index].name
                example = self.prepare.maybe(
                    next(streams[index]), source, stats.own, strict=self.strict
                )
                if example is not None:
                    stats.own[f"samples/{source}"] += 1
                    yield example

        quota = self.batches_per_rank // workers + (worker < self.batches_per_rank % workers)
        collate: Any = collate_examples
        if self.packing:
            # Rows of whole samples up to max_length; a batch is batch_size rows.
            batches: Iterator[list[Any]] = pack_examples(
                examples(),
                self.batch_size,
                int(self.prepare.max_length),
                buffer_size=max(4 * self.batch_size, 64),
                rng=random.Random(f"packing/{tag}"),
            )
            collate = collate_packed
        else:
            batches = batch_examples(
                examples(),
                self.batch_size,
                group_by_length=self.group_by_length,
                rng=random.Random(f"lengths/{tag}"),
            )
        for group in itertools.islice(batches, quota):
            batch = collate(group, **self.prepare.collate_args())
            batch["counters"] = stats.delta()
            yield batch

    def __iter__(self) -> Iterator[Batch]:
        return self.iterate()


class EvalStream(IterableDataset):
    """Every validation sample exactly once per evaluation, across ranks and workers.

    Shards keep their order and are split by rank, then by worker. All ranks yield the same
    number of batches: a rank with fewer samples ends with ``is_padding`` batches (one pad
    token, no label), which carry no loss and must be skipped by metrics. ``allow_pipe`` lets
    ``pipe:`` shard URLs run their shell command (refused by default).
    """

    def __init__(
        self,
        shards: list[EvalShard],
        prepare: ExamplePreparer,
        *,
        batch_size: int,
        strict: bool = False,
        rank: int = 0,
        world_size: int = 1,
        allow_pipe: bool = False,
    ) -> None:
        super().__init__()
        self.shards, self.prepare, self.batch_size = shards, prepare, batch_size
        self.strict, self.rank, self.world_size = strict, rank, world_size
        self.allow_pipe = allow_pipe

    def planned_batches(self, rank: int, world: int, workers: int) -> list[int]:
        """Batches each worker of ``rank`` yields, before padding."""
        mine = _split(self.shards, rank, world)
        return [
            math.ceil(sum(s.num_samples for s in _split(mine, w, workers)) / self.batch_size)
            for w in range(workers)
        ]

    def iterate(
        self,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        worker: int | None = None,
        num_workers: int | None = None,
    ) -> Iterator[Batch]:
        """Yield this (rank, worker)'s validation batches, padded to the common count."""
        rank = self.rank if rank is None else rank
        world = self.world_size if world_size is None else world_size
        worker, workers = _worker(worker, num_workers)
        target = max(sum(self.planned_batches(r, world, workers)) for r in range(world))
        plan = self.planned_batches(rank, world, workers)
        # The rank's missing batches are worker 0's to pad, so the total is fixed.
        quota = plan[worker] + (target - sum(plan) if worker == 0 else 0)
        stats = _Stats()

        def examples() -> Iterator[dict[str, Any]]:
            for shard in _split(_split(self.shards, rank, world), worker, workers):
                read = read_samples(
                    [shard.url],
                    strict=self.strict,
                    counter=stats.reader,
                    allow_pipe=self.allow_pipe,
                )
                for position, sample in enumerate(read):
                    example = self.prepare.maybe(
                        sample, shard.source, stats.own, strict=self.strict
                    )
                    if example is not None:
                        example["generate"] = position < shard.num_generate
                        stats.own[f"samples/{shard.source}"] += 1
                        yield example

        produced = 0
        for group in batch_examples(examples(), self.batch_size):
            batch = collate_examples(group, **self.prepare.collate_args())
            batch["is_padding"] = False
            batch["counters"] = stats.delta()
            produced += 1
            yield batch
        for _ in range(quota - produced):  # dropped samples can only make produced smaller
            batch = padding_batch(**self.prepare.collate_args())
            stats.own["padding_batches"] += 1
            batch["counters"] = stats.delta()
            yield batch

    def __iter__(self) -> Iterator[Batch]:
        return self.iterate()
