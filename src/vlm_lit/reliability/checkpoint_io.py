"""A CheckpointIO that never replaces the last good checkpoint with a partial one.

Lightning's ``TorchCheckpointIO`` serialises to memory and lets fsspec write a temporary
file in the *system* temp directory, then ``shutil.move`` it into place. When ``/tmp`` and
the run directory are on different filesystems (the usual case on clusters), that move is a
copy into the final path: a crash or a full disk mid-copy leaves a truncated ``last.ckpt``
where the good one was. There is also no ``fsync``, so a power loss right after the rename
can leave an empty file. Here the temporary file lives next to the target, is flushed and
fsynced, and only then renamed over it (``os.replace`` is atomic within one filesystem).
Loading always uses ``weights_only=True``: a checkpoint is data, never code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write ``path.tmp-<pid>`` in the target's directory, fsync, rename; load weights-only."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options (local files only)")
        target = Path(path)
        if "://" in str(path):
            # Remote stores have their own (object-level) atomicity: use Lightning's writer.
            super().save_checkpoint(checkpoint, path)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        try:
            with open(temp, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, target)
        except BaseException:
            # Interrupted (error, KeyboardInterrupt, disk full): the old file is untouched.
            temp.unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)

    def load_checkpoint(
        self,
        path: str | os.PathLike[str],
        map_location: Any = None,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if weights_only is False:
            raise ValueError(
                f"refusing to load {path} with weights_only=False: vlm_lit checkpoints hold "
                "only tensors and plain values; unpickling code from a file is never needed"
            )
        if map_location is None:  # Lightning's default: keep tensors where they were saved
            return super().load_checkpoint(path, weights_only=True)
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself (the directory entry); not possible on every OS."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def use_atomic_checkpoints(trainer: L.Trainer) -> bool:
    """Give ``trainer`` an ``AtomicCheckpointIO`` when it uses the plain torch writer.

    Strategies with their own (sharded) checkpoint IO (FSDP sharded state, DeepSpeed) and
    user-configured plugins are left alone. Returns True when the plugin was installed.
    """
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is not TorchCheckpointIO:
        return False
    strategy.checkpoint_io = AtomicCheckpointIO()
    return True
