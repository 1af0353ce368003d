"""Hostile input, end to end through the DataModule, the CLI and the loaders.

Unit-level cases live next to their code (see RELIABILITY.md): test_shards.py (pickle
members, bombs, pipe: in read_samples), test_convert.py (path traversal), test_serialization.py
and test_vision.py (pickled weights), test_language.py (trust_remote_code).
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import tarfile
import zlib
from pathlib import Path

import lightning as L
import pytest
import torch

from vlm_lit.data.datamodule import VLMDataModule
from vlm_lit.data.shards import write_shards
from vlm_lit.fit import main
from vlm_lit.models import build_vlm
from vlm_lit.reliability import AtomicCheckpointIO


class _Payload:
    """Unpickling this creates ``path``: proof of code execution if it ever runs."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.path,))


def _chat(key: str, images: int = 0) -> dict:
    parts = [{"type": "image"}] * images + [{"type": "text", "text": "what is it"}]
    return {
        "key": key,
        "messages": [
            {"role": "user", "content": parts},
            {"role": "assistant", "content": "a shape"},
        ],
    }


def _sample_json(key: str, images: int = 1, **extra: object) -> bytes:
    body = {**_chat(key, images), "num_images": images, "meta": {}, **extra}
    body.pop("key")
    return json.dumps({"key": key, **body}).encode()


def _png_header(side: int) -> bytes:
    """A tiny PNG that *declares* side x side pixels (a decompression bomb's header)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_hostile_shard_through_the_datamodule(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_shards(
        [_chat(f"good{i}") for i in range(4)], data, prefix="good", max_samples_per_shard=4
    )
    marker = tmp_path / "pwned"
    pth = io.BytesIO()
    torch.save(_Payload(marker), pth)
    deep = json.dumps(
        {
            "document": [{"type": "text", "text": "x"}],
            "num_images": 0,
            "meta": json.loads("[" * 100 + "]" * 100),
        }
    ).encode()
    _tar(
        data / "hostile.tar",
        [
            ("evil.json", _sample_json("evil", images=0)),
            ("evil.pyd", pickle.dumps(_Payload(marker))),
            ("evil.pickle", pickle.dumps(_Payload(marker))),
            ("evil.pth", pth.getvalue()),
            ("bomb.json", _sample_json("bomb")),
            ("bomb.0.png", _png_header(100_000)),  # 10^10 declared pixels, 100 bytes on disk
            ("deep.json", deep),  # nesting 101 > max_json_depth 64
            ("big.json", b'{"pad": "' + b"x" * (9 << 20) + b'"}'),  # > max_json_bytes (8 MiB)
        ],
    )
    dm = VLMDataModule(train=str(data), batch_size=1, epoch_samples=10, shuffle_buffer=1)
    dm.connect(
        build_vlm("mlp", size="tiny").tokenizer,
        image_size=32,
        image_mean=(0.5,) * 3,
        image_std=(0.5,) * 3,
    )
    keys = [k for batch in dm.train_dataloader() for k in batch["keys"]]
    assert set(keys) == {"good0", "good1", "good2", "good3", "evil"}  # the text survives
    counters = dm.counters()
    for reason in ("ignored_member", "image_too_large", "json_too_deep", "json_too_large"):
        assert counters[f"train/skipped/{reason}"] >= 1, (reason, counters)
    assert not marker.exists()  # no member was ever unpickled


def test_pipe_url_in_a_config_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    write_shards([_chat("a"), _chat("b")], tmp_path / "d", max_samples_per_shard=1)
    spec = f"pipe:touch {marker}; cat {tmp_path / 'd' / 'shard-000000.tar'}"
    with pytest.raises(ValueError, match="allow_pipe"):
        main(
            [
                "--model.size",
                "tiny",
                "--data.train",
                spec,
                "--trainer.max_steps",
                "1",
                "--trainer.default_root_dir",
                str(tmp_path / "run"),
                "--trainer.logger",
                "false",
            ]
        )
    assert not marker.exists()


def test_checkpoint_with_pickle_payload_is_refused_on_resume(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "epoch": 0, "global_step": 0, "payload": _Payload(marker)}, evil)
    write_shards([_chat(f"k{i}") for i in range(4)], tmp_path / "d", max_samples_per_shard=2)
    for plugins in ([], [AtomicCheckpointIO()]):  # Lightning's own reader, and ours
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=1,
            logger=False,
            plugins=plugins,
            enable_progress_bar=False,
            default_root_dir=tmp_path,
        )
        dm = VLMDataModule(train=str(tmp_path / "d"), batch_size=2)
        with pytest.raises(pickle.UnpicklingError, match="[Ww]eights only"):
            trainer.fit(build_vlm("mlp", size="tiny", max_steps=1), datamodule=dm, ckpt_path=evil)
    assert not marker.exists()


def test_adapter_weights_with_pickle_payload_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    saved = build_vlm("mlp", size="tiny").save_pretrained(tmp_path / "stage1")
    with open(saved / "model.safetensors", "wb") as handle:
        pickle.dump({"connector.proj.0.weight": _Payload(marker)}, handle)
    with pytest.raises(ValueError, match="never unpickles"):
        build_vlm("mlp", size="tiny", init_from=str(saved))  # --model.init_from
    assert not marker.exists()


def test_trust_remote_code_is_off_unless_set(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--model.size", "tiny", "--print_config"])
    assert "trust_remote_code: false" in capsys.readouterr().out
    assert build_vlm("mlp", size="tiny").hparams.trust_remote_code is False
