"""DataCountersLogger: the DataModule's skip/drop counters reach the logger and the log file.

``VLMDataModule`` counts what it skipped (broken shards and samples, bombs, bad JSON) and
dropped (no supervised token) but a run that keeps going over a corrupted shard should also
*say* so: this callback logs every counter as ``data/<stage>/<kind>/<name>`` (this rank's
cumulative value, not synced: ranks can meet different problems, so their key sets differ)
and writes a warning line whenever a skip counter grows.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L

log = logging.getLogger(__name__)


class DataCountersLogger(L.Callback):
    """Log ``datamodule.counters()`` every ``every_n_steps`` training steps and per epoch."""

    def __init__(self, every_n_steps: int = 50) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._warned: dict[str, int] = {}

    def _counters(self, trainer: L.Trainer) -> dict[str, int]:
        datamodule = getattr(trainer, "datamodule", None)
        counters = getattr(datamodule, "counters", None)
        return dict(counters()) if callable(counters) else {}

    def _emit(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        counters = self._counters(trainer)
        grown = {
            k: v for k, v in counters.items() if "/skipped/" in k and v > self._warned.get(k, 0)
        }
        if grown:
            log.warning(
                "rank %d: data problems skipped so far: %s (the run continues; use "
                "--data.strict true to stop at the first one)",
                trainer.global_rank,
                ", ".join(f"{k}={v}" for k, v in sorted(grown.items())),
            )
            self._warned.update(grown)
        if counters:
            metrics = {f"data/{k}": float(v) for k, v in counters.items()}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._emit(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._emit(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._emit(trainer, pl_module)
