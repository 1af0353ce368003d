"""Faults during a run: corrupt shards, NaN/inf steps, interrupted checkpoint writes, bad paths.

Each test injects the fault into a real (tiny) Lightning run or into the real writer.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from vlm_lit.data import make_synthetic_shards
from vlm_lit.data.datamodule import VLMDataModule
from vlm_lit.fit import main
from vlm_lit.models import build_vlm
from vlm_lit.reliability import (
    AtomicCheckpointIO,
    DataCountersLogger,
    NonFiniteGuard,
    check_backbone_paths,
    use_atomic_checkpoints,
)


def _trainer(tmp_path: Path, max_steps: int, callbacks: list, **kwargs: Any) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **{"logger": False, **kwargs},
    )


def _shards(root: Path) -> list[str]:
    return make_synthetic_shards(root, num_samples=24, max_samples_per_shard=3, image_size=32)


class _Poison(L.Callback):
    """Make the connector output NaN during one optimizer step (a diverging batch)."""

    def __init__(self, step: int, where: str = "output") -> None:
        self.step, self.where, self.before, self.after = step, where, {}, {}

    def on_fit_start(self, trainer: L.Trainer, module: Any) -> None:
        def hook(_: Any, __: Any, output: torch.Tensor) -> torch.Tensor | None:
            if trainer.global_step == self.step and module.training:
                return output * float("nan")
            return None

        def grad_hook(grad: torch.Tensor) -> torch.Tensor:
            return grad * float("inf") if trainer.global_step == self.step else grad

        if self.where == "output":
            module.connector.register_forward_hook(hook)
        else:  # a finite loss whose backward overflows
            next(module.connector.parameters()).register_hook(grad_hook)

    def on_train_batch_start(self, trainer: L.Trainer, module: Any, *args: Any) -> None:
        self.before[trainer.global_step] = _trainable(module)

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, *args: Any) -> None:
        self.after[trainer.global_step - 1] = _trainable(module)


def _trainable(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_corrupt_shards_mid_stream_are_skipped_counted_and_logged(tmp_path: Path) -> None:
    paths = _shards(tmp_path / "data")
    data = Path(paths[2]).read_bytes()
    Path(paths[2]).write_bytes(data[: len(data) // 2])  # truncated mid-member
    Path(paths[5]).write_bytes(b"\x00garbage" * 200)  # not a tar at all
    dm = VLMDataModule(train=str(tmp_path / "data"), batch_size=2, shuffle_buffer=2)
    trainer = _trainer(
        tmp_path, 8, [DataCountersLogger(every_n_steps=1)], logger=CSVLogger(tmp_path, name="log")
    )
    trainer.fit(build_vlm("mlp", size="tiny", max_steps=8), datamodule=dm)
    assert trainer.global_step == 8  # the run went on
    counters = dm.counters()
    assert counters["train/skipped/bad_tar"] >= 2  # both broken shards, counted by reason
    rows = list(csv.DictReader(open(next((tmp_path / "log").rglob("metrics.csv")))))
    logged = [
        float(r["data/train/skipped/bad_tar"]) for r in rows if r.get("data/train/skipped/bad_tar")
    ]
    assert logged and max(logged) == counters["train/skipped/bad_tar"]


@pytest.mark.parametrize("where", ["output", "gradient"])
def test_nonfinite_step_is_skipped_exactly_and_counted(tmp_path: Path, where: str) -> None:
    _shards(tmp_path / "data")
    poison, guard = _Poison(step=1, where=where), NonFiniteGuard("skip")
    module = build_vlm("mlp", size="tiny", max_steps=3)
    dm = VLMDataModule(train=str(tmp_path / "data"), batch_size=2)
    trainer = _trainer(tmp_path, 3, [guard, poison])
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 3
    assert guard.skipped_steps == 1 and len(guard.skipped_keys[0]) == 2
    assert _equal(poison.before[1], poison.after[1])  # the bad step changed nothing
    assert not _equal(poison.before[2], poison.after[2])  # the next one trained again
    assert all(bool(torch.isfinite(p).all()) for p in module.parameters())
    state = trainer.optimizers[0].state
    steps = {int(s["step"]) for s in state.values()}
    assert steps == {2}  # AdamW moments / step counts untouched by the skipped step


def test_nonfinite_loss_raises_naming_step_and_keys_and_checkpoints_stay_finite(
    tmp_path: Path,
) -> None:
    _shards(tmp_path / "data")
    keys: list[list[str]] = []

    class Keys(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, m: Any, batch: Any, i: int) -> None:
            keys.append(batch["keys"])

    saver = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=1, save_top_k=-1
    )
    trainer = _trainer(
        tmp_path,
        4,
        [NonFiniteGuard("raise"), _Poison(step=2), Keys(), saver],
        plugins=[AtomicCheckpointIO()],
    )
    dm = VLMDataModule(train=str(tmp_path / "data"), batch_size=2)
    with pytest.raises(FloatingPointError, match="global step 2") as info:
        trainer.fit(build_vlm("mlp", size="tiny", max_steps=4), datamodule=dm)
    assert all(k in str(info.value) for k in keys[2])  # the offending batch's keys
    written = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert written == ["step=1.ckpt", "step=2.ckpt"]  # nothing for the bad step
    for name in written:
        state = torch.load(tmp_path / "ckpt" / name, weights_only=True)["state_dict"]
        assert all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


def test_nonfinite_guard_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match=r"\['raise', 'skip'\]"):
        NonFiniteGuard("ignore")  # type: ignore[arg-type]


def test_interrupted_checkpoint_write_keeps_the_last_good_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    io = AtomicCheckpointIO()
    target = tmp_path / "run" / "last.ckpt"
    good = {"state_dict": {"w": torch.ones(3)}, "global_step": 1}
    io.save_checkpoint(good, target)

    def crash(obj: Any, handle: Any, *args: Any, **kwargs: Any) -> None:
        handle.write(b"PK\x03\x04 half a checkpoint")  # bytes reach the disk, then the crash
        raise KeyboardInterrupt  # e.g. preemption mid-write

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, target)
    monkeypatch.undo()
    loaded = io.load_checkpoint(target)
    assert loaded["global_step"] == 1 and torch.equal(loaded["state_dict"]["w"], torch.ones(3))
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]  # no temp left
    with pytest.raises(ValueError, match="weights_only=False"):
        io.load_checkpoint(target, weights_only=False)


def test_fit_installs_the_atomic_writer() -> None:
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)
    assert use_atomic_checkpoints(trainer)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert not use_atomic_checkpoints(trainer)  # a configured plugin is left alone


def _world_must_not_build(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("data work started before the backbone paths were checked")


@pytest.mark.parametrize(
    ("flag", "spec", "error"),
    [
        ("--model.language_model", {"path": "/nonexistent/lm-dir"}, FileNotFoundError),
        (
            "--model.vision",
            {
                "backend": "open_clip",
                "model_name": "ViT-B-32",
                "pretrained": "/nonexistent/clip.safetensors",
            },
            FileNotFoundError,
        ),
    ],
)
def test_missing_backbone_path_fails_at_start_naming_it(
    monkeypatch: pytest.MonkeyPatch, flag: str, spec: dict, error: type
) -> None:
    import vlm_lit.world

    monkeypatch.setattr(vlm_lit.world, "ensure_world", _world_must_not_build)
    with pytest.raises(
        error, match=str(next(v for k, v in spec.items() if k in ("path", "pretrained")))
    ):
        main([flag, json.dumps(spec)])


def test_empty_or_garbage_backbone_file_is_refused_naming_it(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(PermissionError, match="empty.pt"):
        check_backbone_paths({"backend": "open_clip", "pretrained": str(empty)}, None)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint" * 10)
    vision = {
        "backend": "open_clip",
        "model_cfg": {
            "embed_dim": 32,
            "vision_cfg": {
                "image_size": 32,
                "patch_size": 8,
                "width": 32,
                "layers": 1,
                "head_width": 16,
            },
        },
        "pretrained": str(garbage),
    }
    with pytest.raises(RuntimeError, match="garbage.pt"):
        build_vlm("mlp", size="tiny", vision=vision)
