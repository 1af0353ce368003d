"""A Lightning callback that scores generated answers during validation, synced across ranks."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from vlm_lit.eval.generative import GenerationScorer, is_scorable


def _select(batch: dict[str, Any], rows: list[int]) -> dict[str, Any]:
    """The sub-batch of ``rows`` (tensors indexed, lists filtered, images re-owned)."""
    index = torch.tensor(rows, dtype=torch.long, device=batch["input_ids"].device)
    owners = batch["image_sample_index"]
    keep = torch.isin(owners, index)
    remap = torch.full((batch["input_ids"].shape[0],), -1, dtype=torch.long, device=owners.device)
    remap[index] = torch.arange(len(rows), device=owners.device)
    sub = {k: batch[k][index] for k in ("input_ids", "labels", "attention_mask")}
    sub["pixel_values"] = batch["pixel_values"][keep]
    sub["image_sample_index"] = remap[owners[keep]]
    for key in ("keys", "meta", "messages"):
        sub[key] = [batch[key][r] for r in rows]
    return sub


class GenerationEvalCallback(L.Callback):
    """Generates answers for the validation samples the DataModule flagged (``generate``),
    once with their images and once with blank images, and logs the scores.

    The blank image is the zero tensor after normalisation, i.e. an image of exactly the
    normalisation mean colour: the question asked with no visual evidence. Ranks all-gather
    their counts before scoring, so every rank logs the same global numbers.
    """

    def __init__(self, num_samples: int | None = None, max_new_tokens: int = 8) -> None:
        self.num_samples = num_samples  # informational; the DataModule decides which samples
        self.max_new_tokens = max_new_tokens
        self.scorer = GenerationScorer()
        self.last_metrics: dict[str, float] = {}

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.scorer = GenerationScorer()

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking:
            return
        flags = batch.get("generate") or []
        rows = [
            r
            for r, flag in enumerate(flags)
            if flag and is_scorable(batch["meta"][r], batch["messages"][r])
        ]
        if not rows:
            return
        sub = _select(batch, rows)
        real = pl_module.generate(sub, max_new_tokens=self.max_new_tokens)
        blank = pl_module.generate(
            {**sub, "pixel_values": torch.zeros_like(sub["pixel_values"])},
            max_new_tokens=self.max_new_tokens,
        )
        for meta, pred, pred_blank in zip(sub["meta"], real, blank, strict=True):
            self.scorer.update(pred, pred_blank, meta)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.world_size > 1:
            import torch.distributed as dist

            states: list[Any] = [None] * trainer.world_size
            dist.all_gather_object(states, self.scorer.state())
            merged = GenerationScorer()
            for state in states:
                merged.merge(state)
            self.scorer = merged
        self.last_metrics = self.scorer.compute()
        for name, value in self.last_metrics.items():
            pl_module.log(name, value, rank_zero_only=False, sync_dist=False)
