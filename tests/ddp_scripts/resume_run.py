"""A tiny training run that can stop, be SIGKILLed after a checkpoint, and resume.

Used in-process by tests/test_resume.py and as a script for the real-kill test:
``python resume_run.py DATA OUT TAG NUM_WORKERS MAX_STEPS KILL_AT CKPT`` (KILL_AT 0 = never,
CKPT "-" = fresh start). Keys are appended to ``OUT/keys-TAG.txt`` as batches start (so a
killed run leaves them behind); trainable weights go to ``OUT/weights-TAG.pt`` at the end.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from vlm_lit.data.datamodule import VLMDataModule
from vlm_lit.models import build_vlm
from vlm_lit.reliability import AtomicCheckpointIO, RNGStateCallback

TOTAL_STEPS = 6  # the schedule length, identical for straight, stopped and resumed runs
CHECKPOINT_EVERY = 3


class KeyLog(L.Callback):
    """Append each training batch's keys to a file (flushed: survives SIGKILL)."""

    def __init__(self, path: Path, kill_at: int = 0) -> None:
        self.path, self.kill_at = path, kill_at

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, idx: int) -> None:
        if self.kill_at and trainer.global_step == self.kill_at:
            # The checkpoint of step `kill_at` was written in the previous on_train_batch_end.
            os.kill(os.getpid(), signal.SIGKILL)
        with open(self.path, "a") as handle:
            handle.write("\n".join(batch["keys"]) + "\n")
            handle.flush()


def trainable(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def train(
    data: Path,
    out: Path,
    tag: str,
    *,
    num_workers: int,
    max_steps: int,
    kill_at: int = 0,
    ckpt: Path | None = None,
    rng_callback: bool = True,
) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Fit the tiny LoRA model (dropout 0.05: RNG matters) and return (keys seen, weights)."""
    torch.manual_seed(1234)  # every run starts from the same global RNG; resume overrides it
    module = build_vlm(
        "mlp",
        size="tiny",
        freeze="lora",
        lora_dropout=0.05,
        max_steps=TOTAL_STEPS,
        warmup_steps=2,
        lr_connector=1e-2,
        lr_lm=1e-2,
    )
    dm = VLMDataModule(train=str(data), batch_size=2, num_workers=num_workers, shuffle_buffer=4)
    out.mkdir(parents=True, exist_ok=True)
    log = out / f"keys-{tag}.txt"
    callbacks: list[L.Callback] = [
        KeyLog(log, kill_at),
        ModelCheckpoint(
            dirpath=out / "ckpt",
            filename="{step}",
            every_n_train_steps=CHECKPOINT_EVERY,
            save_top_k=-1,
        ),
    ]
    if rng_callback:
        callbacks.append(RNGStateCallback())
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    weights = trainable(module)
    torch.save(weights, out / f"weights-{tag}.pt")
    return log.read_text().split(), weights


if __name__ == "__main__":
    data, out, tag, workers, steps, kill, ckpt = sys.argv[1:8]
    torch.set_num_threads(1)
    train(
        Path(data),
        Path(out),
        tag,
        num_workers=int(workers),
        max_steps=int(steps),
        kill_at=int(kill),
        ckpt=None if ckpt == "-" else Path(ckpt),
    )
