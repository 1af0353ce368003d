"""Multi-process CPU run (2 ranks, gloo) launched by tests/test_ddp.py; writes per-rank results.

Usage: python dist_run.py MODE DATA_DIR OUT_DIR, MODE one of:
  ddp    -- validate, then fit one epoch on even shards (find_unused_parameters=False, some
            batches text-only), then fit one epoch on uneven shards
  spawn  -- ddp_spawn, freeze=align: the frozen embedding rows must stay unchanged
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy

from vlm_lit.data.datamodule import VLMDataModule
from vlm_lit.models import build_vlm

TENSORS = ("input_ids", "labels", "attention_mask", "pixel_values", "image_sample_index")


class Recorder(L.Callback):
    """Keys seen, steps taken, the first batch and the first step's (all-reduced) gradients."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.steps = 0
        self.first_batch: dict[str, torch.Tensor] | None = None
        self.grads: dict[str, torch.Tensor] | None = None

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, idx: int) -> None:
        self.keys.extend(batch["keys"])
        if self.first_batch is None:
            self.first_batch = {k: batch[k].detach().cpu() for k in TENSORS}

    def on_before_optimizer_step(self, trainer: Any, module: Any, optimizer: Any) -> None:
        if self.grads is None:
            self.grads = {
                n: p.grad.detach().cpu().clone()
                for n, p in module.named_parameters()
                if p.grad is not None
            }

    def on_train_batch_end(self, *args: Any) -> None:
        self.steps += 1


def trainer(strategy: Any, recorder: Recorder, root: Path) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=1,
        callbacks=[recorder],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
    )


def datamodule(train: Path, val: Path | None = None) -> VLMDataModule:
    # shuffle_buffer=1 keeps each shard's samples in order: one 2-sample shard = one batch.
    return VLMDataModule(
        train=str(train), val=str(val) if val else None, batch_size=2, shuffle_buffer=1
    )


def save(out: Path, name: str, rank: int, recorder: Recorder, **extra: Any) -> None:
    record = {"keys": recorder.keys, "steps": recorder.steps, **extra}
    (out / f"{name}-rank{rank}.json").write_text(json.dumps(record))
    if recorder.grads is not None:
        torch.save(
            {"batch": recorder.first_batch, "grads": recorder.grads}, out / f"{name}-rank{rank}.pt"
        )


def run_ddp(data: Path, out: Path) -> None:
    torch.manual_seed(0)
    model = build_vlm("mlp", size="tiny", freeze="full", max_steps=10)
    strategy = DDPStrategy(find_unused_parameters=False, process_group_backend="gloo")
    recorder = Recorder()
    run = trainer(strategy, recorder, out)
    dm = datamodule(data / "even", data / "val")
    val = run.validate(model, datamodule=dm, verbose=False)[0]
    run.fit(model, datamodule=dm)
    save(out, "even", run.global_rank, recorder, val=val, global_step=run.global_step)
    uneven = Recorder()
    run2 = trainer(
        DDPStrategy(find_unused_parameters=False, process_group_backend="gloo"), uneven, out
    )
    run2.fit(build_vlm("mlp", size="tiny", max_steps=10), datamodule=datamodule(data / "uneven"))
    save(out, "uneven", run2.global_rank, uneven, global_step=run2.global_step)


def run_spawn(data: Path, out: Path) -> None:
    model = build_vlm("mlp", size="tiny", freeze="align", lr_connector=0.05, max_steps=10)
    lm = model.model.language_model
    matrices = {"input": lm.get_input_embeddings, "output": lm.get_output_embeddings}
    before = {k: get().weight.detach().clone() for k, get in matrices.items()}
    connector = [p.detach().clone() for p in model.connector.parameters()]
    run = trainer("ddp_spawn", Recorder(), out)
    run.fit(model, datamodule=datamodule(data / "even"))
    # ddp_spawn loads rank 0's trained weights back into this (main) process's model.
    record: dict[str, Any] = {"new_token_ids": model.new_token_ids}
    for name, get in matrices.items():
        moved = (get().weight.detach() != before[name]).any(1).nonzero().flatten()
        record[f"changed_{name}_rows"] = sorted(int(i) for i in moved)
    record["connector_changed"] = any(
        not torch.equal(a, b) for a, b in zip(connector, model.connector.parameters(), strict=True)
    )
    (out / "spawn.json").write_text(json.dumps(record))


if __name__ == "__main__":
    mode, data_dir, out_dir = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    torch.set_num_threads(1)
    {"ddp": run_ddp, "spawn": run_spawn}[mode](data_dir, out_dir)
