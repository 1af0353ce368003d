"""Exact resume: N steps, stop (or SIGKILL), resume from the checkpoint, N more == 2N straight.

Same sample keys in the same order and bit-identical trainable weights, with 0 and 2 data
workers. The model trains LoRA with dropout 0.05, so the RNG state matters too (Lightning
saves none; ``RNGStateCallback`` does); AdamW moments and the LR schedule come back through
Lightning's own checkpoint, the stream position through ``VLMDataModule.state_dict``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ddp_scripts.resume_run import CHECKPOINT_EVERY, TOTAL_STEPS, train
from subprocess_utils import run_script
from vlm_lit.data import make_synthetic_shards

N = CHECKPOINT_EVERY


@pytest.fixture
def data(tmp_path: Path) -> Path:
    # 8 shards x 3 samples, batch 2: 12 batches per epoch, so step N is mid-epoch.
    make_synthetic_shards(tmp_path / "data", num_samples=24, max_samples_per_shard=3, image_size=32)
    return tmp_path / "data"


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stop_and_resume_equals_straight_run(tmp_path: Path, data: Path, num_workers: int) -> None:
    straight_keys, straight = train(
        data, tmp_path / "a", "straight", num_workers=num_workers, max_steps=2 * N
    )
    first_keys, _ = train(data, tmp_path / "b", "first", num_workers=num_workers, max_steps=N)
    ckpt = tmp_path / "b" / "ckpt" / f"step={N}.ckpt"
    state = torch.load(ckpt, weights_only=True)
    assert state["VLMDataModule"]["batches_consumed"] == N  # the stream position is saved
    assert state["VLMDataModule"]["num_workers"] == num_workers
    rest_keys, resumed = train(
        data, tmp_path / "b", "rest", num_workers=num_workers, max_steps=2 * N, ckpt=ckpt
    )
    assert len(first_keys) == 2 * N and first_keys + rest_keys == straight_keys
    _assert_identical(resumed, straight)
    assert TOTAL_STEPS == 2 * N  # the schedule spans the whole straight run


def test_without_rng_state_dropout_diverges(tmp_path: Path, data: Path) -> None:
    """The control: the same resume without RNGStateCallback is *not* bit-identical."""
    _, straight = train(data, tmp_path / "a", "straight", num_workers=0, max_steps=2 * N)
    train(data, tmp_path / "b", "first", num_workers=0, max_steps=N, rng_callback=False)
    ckpt = tmp_path / "b" / "ckpt" / f"step={N}.ckpt"
    _, resumed = train(
        data, tmp_path / "b", "rest", num_workers=0, max_steps=2 * N, ckpt=ckpt, rng_callback=False
    )
    assert any(not torch.equal(straight[k], resumed[k]) for k in straight)


def test_sigkill_after_checkpoint_then_resume_equals_straight_run(
    tmp_path: Path, data: Path
) -> None:
    """A real crash: the process SIGKILLs itself right after the step-N checkpoint."""
    runs = {"straight": ("0", "-"), "killed": (str(N), "-")}
    for tag, (kill, ckpt) in runs.items():
        out = tmp_path / tag
        out.mkdir()
        result = run_script(
            "resume_run.py",
            str(data),
            str(out),
            tag,
            "2",
            str(2 * N),
            kill,
            ckpt,
            timeout=420,
            cwd=tmp_path,
        )
        expected = -9 if kill != "0" else 0
        assert result.returncode == expected, result.stdout[-3000:]
    killed = tmp_path / "killed"
    assert not (killed / "weights-killed.pt").exists()  # it really died mid-run
    ckpt = killed / "ckpt" / f"step={N}.ckpt"
    result = run_script(
        "resume_run.py",
        str(data),
        str(killed),
        "rest",
        "2",
        str(2 * N),
        "0",
        str(ckpt),
        timeout=420,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    keys = (killed / "keys-killed.txt").read_text().split()
    keys += (killed / "keys-rest.txt").read_text().split()
    assert keys == (tmp_path / "straight" / "keys-straight.txt").read_text().split()
    _assert_identical(
        torch.load(killed / "weights-rest.pt", weights_only=True),
        torch.load(tmp_path / "straight" / "weights-straight.pt", weights_only=True),
    )
