"""RNGStateCallback: checkpoints carry every rank's RNG states so a resumed run draws the same
dropout masks as an uninterrupted one (Lightning saves no RNG state of its own)."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch

KEY = "vlm_lit_rng"


def capture() -> dict[str, Any]:
    """This process's torch (CPU, CUDA), Python and NumPy RNG states, weights_only-loadable."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # int64 tensor + Python scalars: loadable with torch.load(weights_only=True)
        "numpy": (
            str(kind),
            torch.from_numpy(keys.astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(gauss),
        ),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture`."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RNGStateCallback(L.Callback):
    """Save each rank's RNG states in checkpoints; restore them at the matching point.

    When: a checkpoint written mid-epoch is restored at the first training batch after the
    resume; one written at an epoch end at the next epoch's start. Both are the points the
    uninterrupted run reaches with exactly that state: restoring at load time instead would
    let the resumed run's extra work (building the data loader, which draws a seed from the
    global generator) shift every later draw. Ranks are matched by global rank; a checkpoint
    from a different world size restores what it has and warns nothing (dropout streams
    then differ, the run is still correct).
    """

    def __init__(self) -> None:
        self._in_epoch = False
        self._pending: dict[str, Any] | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._in_epoch = True
        if self._pending is not None and not self._pending["mid_epoch"]:
            self._apply()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is not None:
            self._apply()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._in_epoch = False  # runs before ModelCheckpoint's epoch-end save (it goes last)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        states = [capture()]
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            # Every rank dumps the checkpoint (only rank 0 writes it): gather all states.
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, states[0])
            states = gathered
        checkpoint[KEY] = {"mid_epoch": self._in_epoch, "ranks": states}

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        saved = checkpoint.get(KEY)
        if not saved or not saved.get("ranks"):
            return
        ranks = saved["ranks"]
        rank = trainer.global_rank
        if rank < len(ranks):
            self._pending = {"mid_epoch": bool(saved["mid_epoch"]), "state": ranks[rank]}

    def _apply(self) -> None:
        assert self._pending is not None
        restore(self._pending["state"])
        self._pending = None
