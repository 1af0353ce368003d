"""VLMDataModule: weighted WebDataset sources -> tokenized, collated batches for Lightning."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import lightning as L
from torch.utils.data import DataLoader

from vlm_lit.data.collate import Batch, group_for_accumulation
from vlm_lit.data.example import ExamplePreparer
from vlm_lit.data.images import ImageTransform
from vlm_lit.data.sources import (
    EvalShard,
    Source,
    SourceArg,
    check_shard_counts,
    count_samples,
    eval_shards,
    parse_sources,
    refuse_pipe_sources,
)
from vlm_lit.data.stream import EvalStream, TrainStream
from vlm_lit.data.tokenize import ensure_image_token

log = logging.getLogger(__name__)


def _as_is(batch: Batch) -> Batch:
    """DataLoader ``collate_fn`` for a stream of collated batches (module level: picklable)."""
    return batch


class StreamLoader:
    """The iterable Lightning gets: a DataLoader over a stream, plus main-process work.

    It sums ``step_supervised_tokens`` over accumulation groups (workers interleave their
    batches, so no single worker sees a whole group), moves each batch's ``counters`` delta
    into the DataModule, and on resume skips the batches the checkpoint had consumed.
    No ``__len__``: Lightning must not trust a length an iterable may not meet (#19624).
    """

    def __init__(self, datamodule: VLMDataModule, dataset: Any, stage: Literal["train", "val"]):
        self.datamodule, self.dataset, self.stage = datamodule, dataset, stage

    def __iter__(self) -> Iterator[Batch]:
        dm = self.datamodule
        skip = 0
        if self.stage == "train":
            self.dataset.epoch = dm._current_epoch()
            skip = dm._take_resume_skip(self.dataset.epoch)
        # persistent_workers=False: workers are re-created each epoch, so they see the new
        # epoch number (and with it the new shard order). The stream yields finished batches:
        # _as_is spares DataLoader's default_convert walking every key, message and meta.
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=dm.num_workers,
            persistent_workers=False,
            collate_fn=_as_is,
        )
        batches: Iterator[Batch] = iter(loader)
        if self.stage == "train":
            batches = group_for_accumulation(batches, dm._accumulate())
        for index, batch in enumerate(batches):
            delta = batch.pop("counters", {})
            if index < skip:  # replayed: its counts are already in the restored counters
                continue
            dm._add_counters(self.stage, delta)
            if self.stage == "train" and dm.trainer is None:  # else on_after_batch_transfer
                dm._consumed["batches"] += 1
                dm._consumed["samples"] += len(batch["keys"])
            yield batch
        if self.stage == "train" and dm.trainer is None:
            dm._epoch += 1


class VLMDataModule(L.LightningDataModule):
    """Mixed, tokenized, collated WebDataset streams; knows no connector (see ``connect``).

    Sources: a shard spec string, one ``{"name", "shards", "weight"}`` dict or a list of them.

    Equal batches per rank: a training epoch is a sample budget, ``epoch_samples`` (default:
    the samples counted in the train shards). Each rank yields exactly
    ``epoch_samples // world_size // batch_size`` batches (rounded down to a multiple of the
    accumulation), split over its workers; a worker whose shards run dry reads them again in a
    new order. Trade-off: with uneven shards some samples repeat and others wait for the next
    epoch (whose shard shuffle differs), instead of DDP hanging or every rank truncating to
    the smallest. Validation is exact: see ``EvalStream``.

    Counters (``counters()``) are cumulative, keyed ``{stage}/{kind}/{name}`` with kinds
    ``skipped`` (shard reader), ``dropped`` (tokenizer), ``samples`` (per source). Workers
    attach their deltas to each batch; the main process sums them.

    ``state_dict`` holds the epoch, the batches and samples consumed in it (counted when a
    training batch reaches the device) and the counters. ``load_state_dict`` restores them and
    the next training epoch replays its deterministic stream and skips the consumed batches:
    exact when seed, world size, ``num_workers`` and data are unchanged, at the cost of
    re-reading the skipped part (otherwise a warning is logged and the epoch starts over).

    ``packing``: training batches are ``batch_size`` rows, each several whole samples packed
    up to ``max_length`` tokens, with ``segment_ids`` / ``position_ids`` (see
    ``vlm_lit.data.packing``); the supervised tokens are exactly the unpacked ones. With
    packing, ``epoch_samples`` still sets the number of batches (``// batch_size``), so an
    epoch then covers more samples. Validation batches are never packed.

    ``allow_pipe`` (default False): a ``pipe:`` shard URL runs a shell command, so a config
    (or anyone who can edit one) could run arbitrary code through ``train``/``val``. Such a
    URL is refused with a ``ValueError`` at construction, before anything is opened or run,
    unless ``allow_pipe=True`` (``--data.allow_pipe true``); then it is counted and streamed
    like any shard. Set it only for configs you trust.
    """

    def __init__(
        self,
        train: list[dict[str, Any]] | dict[str, Any] | str | None = None,
        val: list[dict[str, Any]] | dict[str, Any] | str | None = None,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        max_length: int | None = 512,
        image_mode: Literal["pad", "resize"] = "pad",
        max_image_pixels: int = 2048 * 2048,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        val_generation_subset: int | None = 64,
        strict: bool = False,
        group_by_length: bool = False,
        epoch_samples: int | None = None,
        accumulate_grad_batches: int = 1,
        rank: int = 0,
        world_size: int = 1,
        packing: bool = False,
        allow_pipe: bool = False,
    ) -> None:
        super().__init__()
        if packing and (max_length is None or group_by_length):
            raise ValueError(
                "--data.packing true packs samples into rows of --data.max_length tokens: it "
                f"needs --data.max_length (got {max_length}) and replaces "
                f"--data.group_by_length (got {group_by_length}; set it false)"
            )
        if batch_size < 1 or num_workers < 0 or shuffle_buffer < 1:
            raise ValueError(
                f"need --data.batch_size >= 1, --data.num_workers >= 0, --data.shuffle_buffer"
                f" >= 1; got {batch_size}, {num_workers}, {shuffle_buffer}"
            )
        if not allow_pipe:  # before any shard is opened: a pipe: URL is a shell command
            refuse_pipe_sources(train, default_name="train")
            refuse_pipe_sources(val, default_name="val")
        self.train_spec: SourceArg = train
        self.val_spec: SourceArg = val
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.max_length = num_workers, max_length
        self.image_mode, self.max_image_pixels = image_mode, max_image_pixels
        self.seed, self.shuffle_buffer, self.strict = seed, shuffle_buffer, strict
        self.val_generation_subset, self.group_by_length = val_generation_subset, group_by_length
        self.epoch_samples, self.accumulate_grad_batches = epoch_samples, accumulate_grad_batches
        self.rank, self.world_size = rank, world_size
        self.packing, self.allow_pipe = packing, allow_pipe
        self.tokenizer: Any = None
        self.transform: ImageTransform | None = None
        self.train_sources: list[Source] = []
        self.val_shards: list[EvalShard] = []
        self._counters: Counter[str] = Counter()
        self._epoch = 0
        self._consumed = {"epoch": -1, "batches": 0, "samples": 0}
        self._resume: dict[str, int] | None = None

    # ----- wiring -------------------------------------------------------------------------
    def connect(
        self,
        tokenizer: Any,
        *,
        image_size: int,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        image_transform: ImageTransform | None = None,
    ) -> None:
        """Give the DataModule the model's tokenizer and image preprocessing (model side
        calls this). Adds ``<image>`` to the tokenizer when it lacks it."""
        ensure_image_token(tokenizer)
        self.tokenizer = tokenizer
        self.transform = image_transform or ImageTransform(
            image_size,
            image_mean,
            image_std,
            mode=self.image_mode,
            max_pixels=self.max_image_pixels,
        )

    def _dist(self) -> tuple[int, int]:
        if self.trainer is not None:
            return int(self.trainer.global_rank), int(self.trainer.world_size)
        return self.rank, self.world_size

    def _accumulate(self) -> int:
        if self.trainer is not None:
            return int(self.trainer.accumulate_grad_batches)
        return self.accumulate_grad_batches

    def _current_epoch(self) -> int:
        return int(self.trainer.current_epoch) if self.trainer is not None else self._epoch

    def _preparer(self, *, drop_unsupervised: bool) -> ExamplePreparer:
        if self.tokenizer is None or self.transform is None:
            raise RuntimeError(
                "VLMDataModule has no tokenizer yet: call datamodule.connect(tokenizer, "
                "image_size=..., image_mean=..., image_std=...) before asking for dataloaders"
            )
        return ExamplePreparer(
            self.tokenizer,
            self.transform,
            max_length=self.max_length,
            drop_unsupervised=drop_unsupervised,
            normalize_in_collate=True,
        )

    # ----- Lightning hooks ----------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Expand shard specs, check shard counts against ranks x workers, count val samples."""
        _, world = self._dist()
        if self.train_spec is not None and not self.train_sources:
            self.train_sources = parse_sources(
                self.train_spec, default_name="train", allow_pipe=self.allow_pipe
            )
        check_shard_counts(self.train_sources, world, self.num_workers)
        if self.val_spec is not None and not self.val_shards:
            sources = parse_sources(self.val_spec, default_name="val", allow_pipe=self.allow_pipe)
            self.val_shards = eval_shards(
                sources, self.val_generation_subset, allow_pipe=self.allow_pipe
            )

    def batches_per_rank(self) -> int:
        """Training batches every rank yields per epoch (identical on all ranks)."""
        _, world = self._dist()
        total = self.epoch_samples
        if total is None:
            total = sum(
                count_samples(u, allow_pipe=self.allow_pipe)
                for s in self.train_sources
                for u in s.urls
            )
            self.epoch_samples = total
        batches = total // world // self.batch_size
        k = self._accumulate()
        batches -= batches % k if batches >= k else 0
        if batches < 1:
            raise ValueError(
                f"epoch_samples={total} over world_size={world} and batch_size="
                f"{self.batch_size} gives no full batch per rank; raise --data.epoch_samples "
                "or lower --data.batch_size"
            )
        return batches

    def train_dataset(self) -> TrainStream:
        """The training stream (for tests and benchmarks; ``train_dataloader`` wraps it)."""
        if not self.train_sources:
            self.setup("fit")
        if not self.train_sources:
            raise ValueError("no training data: pass --data.train (a shard spec or sources)")
        rank, world = self._dist()
        return TrainStream(
            self.train_sources,
            self._preparer(drop_unsupervised=True),
            batch_size=self.batch_size,
            batches_per_rank=self.batches_per_rank(),
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            group_by_length=self.group_by_length,
            strict=self.strict,
            rank=rank,
            world_size=world,
            packing=self.packing,
            allow_pipe=self.allow_pipe,
        )

    def val_dataset(self) -> EvalStream:
        """The validation stream, exact once per evaluation across ranks."""
        if not self.val_shards:
            self.setup("validate")
        rank, world = self._dist()
        return EvalStream(
            self.val_shards,
            self._preparer(drop_unsupervised=False),
            batch_size=self.val_batch_size,
            strict=self.strict,
            rank=rank,
            world_size=world,
            allow_pipe=self.allow_pipe,
        )

    def train_dataloader(self) -> StreamLoader:
        return StreamLoader(self, self.train_dataset(), "train")

    def val_dataloader(self) -> StreamLoader | list:
        if self.val_spec is None:
            return []
        return StreamLoader(self, self.val_dataset(), "val")

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count training batches as they reach the model (prefetched ones are not consumed)."""
        trainer = self.trainer
        if trainer is not None and trainer.training and not trainer.sanity_checking:
            epoch = int(trainer.current_epoch)
            if self._consumed["epoch"] != epoch:
                self._consumed = {"epoch": epoch, "batches": 0, "samples": 0}
            self._consumed["batches"] += 1
            self._consumed["samples"] += len(batch.get("keys", ()))
        return batch

    # ----- counters and state -------------------------------------------------------------
    def _add_counters(self, stage: str, delta: dict[str, int]) -> None:
        self._counters.update({f"{stage}/{k}": v for k, v in delta.items()})

    def counters(self) -> dict[str, int]:
        """Cumulative counters ``{stage}/{skipped|dropped|samples}/{name}`` (sorted)."""
        return dict(sorted((k, v) for k, v in self._counters.items() if v))

    def source_counts(self, stage: Literal["train", "val"] = "train") -> dict[str, int]:
        """Samples yielded so far per source name."""
        prefix = f"{stage}/samples/"
        return {k[len(prefix) :]: v for k, v in self.counters().items() if k.startswith(prefix)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self._consumed["epoch"] if self._consumed["epoch"] >= 0 else self._epoch,
            "batches_consumed": self._consumed["batches"],
            "samples_consumed": self._consumed["samples"],
            "num_workers": self.num_workers,
            "world_size": self._dist()[1],
            "seed": self.seed,
            "counters": dict(self._counters),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._counters = Counter(state_dict.get("counters", {}))
        self._epoch = int(state_dict.get("epoch", 0))
        same = all(
            state_dict.get(k) == v
            for k, v in (
                ("num_workers", self.num_workers),
                ("world_size", self._dist()[1]),
                ("seed", self.seed),
            )
        )
        if not same:
            log.warning(
                "data stream position not restored: seed/world_size/num_workers changed since "
                "the checkpoint (%s); epoch %d restarts from its beginning",
                {k: state_dict.get(k) for k in ("seed", "world_size", "num_workers")},
                self._epoch,
            )
        elif state_dict.get("batches_consumed", 0) > 0:
            self._resume = {
                "epoch": self._epoch,
                "batches": int(state_dict["batches_consumed"]),
                "samples": int(state_dict.get("samples_consumed", 0)),
            }

    def _take_resume_skip(self, epoch: int) -> int:
        """Batches to skip at the start of ``epoch`` (once, after ``load_state_dict``)."""
        resume, self._resume = self._resume, None
        if resume is None or resume["epoch"] != epoch:
            self._consumed = {"epoch": epoch, "batches": 0, "samples": 0}
            return 0
        self._consumed = dict(resume)
        return resume["batches"]
