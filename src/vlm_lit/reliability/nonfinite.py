"""NonFiniteGuard: a NaN/inf loss or gradient skips the optimizer step (counted) or stops the run.

Why a callback and not ``return None`` from ``training_step``: Lightning refuses a ``None``
step under DDP (the other ranks would wait forever in the gradient all-reduce) and, on one
process, still calls ``optimizer.step`` for it. Here the decision is made after backward,
right before the step, and is all-reduced so every rank takes the same one:

- ``skip``: every gradient is set to ``None`` so the optimizer leaves weights *and* its own
  state (moments, step counts) untouched; the skip is counted (``skipped_steps``, logged as
  ``train/nonfinite_skipped``) and the learning-rate schedule moves on.
- ``raise``: a ``FloatingPointError`` names the global step, the epoch and the sample keys
  of the optimizer step's micro-batches. It fires before the weights change, so no
  checkpoint can ever hold the non-finite update.

Under fp16 loss scaling the GradScaler already skips inf-gradient steps (they are expected
while the scale settles), so only the loss is checked there.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from torch.optim import Optimizer

NonFiniteMode = Literal["skip", "raise"]
MODES: tuple[str, ...] = ("raise", "skip")


class NonFiniteGuard(L.Callback):
    """Skip-and-count or raise on a non-finite loss or gradient (see the module docstring).

    Args:
        mode: ``skip`` or ``raise``.
        check_gradients: also check the gradients right before the optimizer step (catches a
            finite loss whose backward overflowed).
    """

    def __init__(self, mode: NonFiniteMode = "raise", check_gradients: bool = True) -> None:
        if mode not in MODES:
            raise ValueError(
                f"unknown non-finite mode {mode!r} (--nonfinite_loss); valid: {sorted(MODES)}"
            )
        self.mode, self.check_gradients = mode, check_gradients
        self.skipped_steps = 0
        self.skipped_keys: list[list[str]] = []  # keys of each skipped step (last 100 steps)
        self._keys: list[str] = []
        self._bad_loss: float | None = None

    # --- bookkeeping of the current optimizer step ------------------------------------------
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        keys = batch.get("keys", []) if isinstance(batch, dict) else []
        self._keys.extend(str(k) for k in keys)

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        bad = _any_rank(trainer, not bool(torch.isfinite(loss.detach()).all()))
        if not bad:
            return
        value = float(loss.detach().float().reshape(-1)[0])
        if self.mode == "raise":
            raise FloatingPointError(self._message(trainer, f"non-finite loss ({value})"))
        self._bad_loss = value  # backward still runs (matched collectives); the step is dropped

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Optimizer
    ) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        reason = None if self._bad_loss is None else f"non-finite loss ({self._bad_loss})"
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        if reason is None and self.check_gradients and not scaled:
            local = any(
                p.grad is not None and not bool(torch.isfinite(p.grad).all()) for p in params
            )
            if _any_rank(trainer, local):
                reason = "non-finite gradient"
        if reason is not None:
            if self.mode == "raise":
                raise FloatingPointError(self._message(trainer, reason))
            for p in params:
                p.grad = None  # optimizers skip grad-less parameters: weights and state stay
            self.skipped_steps += 1
            self.skipped_keys = (self.skipped_keys + [list(self._keys)])[-100:]
        pl_module.log(
            "train/nonfinite_skipped",
            float(self.skipped_steps),
            on_step=True,
            batch_size=max(len(self._keys), 1),
        )
        self._keys, self._bad_loss = [], None

    def _message(self, trainer: L.Trainer, what: str) -> str:
        keys = self._keys[:16] + (["..."] if len(self._keys) > 16 else [])
        return (
            f"{what} at global step {trainer.global_step} (epoch {trainer.current_epoch}), "
            f"batch keys {keys}; the optimizer step was not taken, so the weights and every "
            "checkpoint are still finite. Inspect those samples, lower the learning rate, or "
            "train with --nonfinite_loss skip to skip and count such steps."
        )

    # --- the count survives a resume ----------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps, "skipped_keys": self.skipped_keys}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.skipped_keys = [list(k) for k in state_dict.get("skipped_keys", [])]


def _any_rank(trainer: L.Trainer, flag: bool) -> bool:
    """True when ``flag`` is set on any rank (one all-reduce; every rank must call it)."""
    if trainer.world_size == 1:
        return flag
    strategy = trainer.strategy
    value = torch.tensor(float(flag), device=strategy.root_device)
    return bool(strategy.reduce(value, reduce_op="sum") > 0)
