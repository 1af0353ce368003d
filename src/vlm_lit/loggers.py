"""What a training run logs and where: CSV always, TensorBoard when installed, throughput.

``default_loggers(root)`` gives the loggers ``python -m vlm_lit.fit`` uses when the user did
not choose any: a ``CSVLogger`` (``metrics.csv``, readable with nothing but pandas or the
``csv`` module, and what ``vlm_lit.ablate`` plots loss curves from) and, if ``tensorboard``
or ``tensorboardX`` is importable, a ``TensorBoardLogger`` writing into the same version
folder. ``ThroughputLogger`` adds ``train/samples_per_sec`` and
``train/supervised_tokens_per_sec`` (the tokens the loss is taken over, the number that is
comparable across connectors and padding schemes).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger


def tensorboard_available() -> bool:
    """True if Lightning's TensorBoardLogger can write event files here."""
    from lightning.fabric.loggers.tensorboard import (
        _TENSORBOARD_AVAILABLE,
        _TENSORBOARDX_AVAILABLE,
    )

    return bool(_TENSORBOARD_AVAILABLE or _TENSORBOARDX_AVAILABLE)


def default_loggers(root: str | Path, name: str = "lightning_logs") -> list[Logger]:
    """CSV (always) and TensorBoard (when installed), both in ``root/name/version_N``."""
    csv = CSVLogger(save_dir=str(root), name=name)
    loggers: list[Logger] = [csv]
    if tensorboard_available():
        # same version folder: one directory per run holds metrics.csv and the event files
        loggers.append(
            TensorBoardLogger(
                save_dir=str(root), name=name, version=csv.version, default_hp_metric=False
            )
        )
    return loggers


def batch_samples(batch: dict[str, Any]) -> int:
    """Samples in a batch: its keys (a packed row holds several), 0 for a padding batch."""
    if batch.get("is_padding"):
        return 0
    keys = batch.get("keys")
    return len(keys) if keys is not None else int(batch["input_ids"].shape[0])


class ThroughputLogger(L.Callback):
    """Log samples/s and supervised tokens/s over windows of ``every_n_steps`` batches.

    Samples are counted by key, so a packed batch counts every sample packed into its rows.
    The window is measured between ``on_train_batch_end`` calls, so it includes data loading,
    forward, backward and the optimizer step (what a researcher waits for); the first window
    starts at the first batch's end, so setup and dataloader start-up are left out.
    """

    def __init__(self, every_n_steps: int = 25) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._start: float | None = None
        self._samples = 0
        self._tokens = 0
        self._batches = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = None

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        now = time.perf_counter()
        if self._start is None:  # the window opens at the end of the first batch
            self._start, self._samples, self._tokens, self._batches = now, 0, 0, 0
            return
        self._samples += batch_samples(batch)
        self._tokens += int((batch["labels"] != -100).sum())
        self._batches += 1
        if self._batches < self.every_n_steps:
            return
        elapsed = max(now - self._start, 1e-9)
        metrics = {
            "train/samples_per_sec": self._samples / elapsed,
            "train/supervised_tokens_per_sec": self._tokens / elapsed,
            "train/sec_per_step": elapsed / self._batches,
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self._start, self._samples, self._tokens, self._batches = now, 0, 0, 0
