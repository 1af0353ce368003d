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
from typing import Any

import lightning as L
import pytest
import torch

from tokenizers_fixtures import make_tokenizer
from vlm_lit.data.datamodule import VLMDataModule
from vlm_lit.data.shards import read_samples, write_shards
from vlm_lit.data.sources import EvalShard, Source, count_samples, eval_shards, parse_sources
from vlm_lit.data.stream import EvalStream, TrainStream
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


def test_pipe_source_in_any_form_is_refused_at_construction(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    plain = write_shards([_chat("a")], tmp_path / "d")[0]
    pipe = f"pipe:touch {marker} && cat {plain}"
    forms = [  # (train, val, the URL the error must name)
        (pipe, None, pipe),
        ({"name": "x", "shards": pipe}, None, pipe),
        ([{"shards": plain}, {"name": "y", "shards": [plain, pipe], "weight": 2}], None, pipe),
        (plain, pipe, pipe),
        (plain, [{"name": "v", "shards": pipe}], pipe),
        (f"{{{plain},{pipe}}}", None, pipe),  # inside a brace expansion list
        (f"{plain}::{pipe}", None, pipe),
        (f"PIPE:touch {marker}", None, f"PIPE:touch {marker}"),  # gopen lowercases schemes
        (f" pipe:touch {marker}", None, f" pipe:touch {marker}"),
    ]
    for train, val, url in forms:
        with pytest.raises(ValueError, match="allow_pipe") as error:
            VLMDataModule(train=train, val=val)
        assert repr(url) in str(error.value), (train, val)
    # a spec changed after construction is still refused when setup expands it
    dm = VLMDataModule(train=plain, val=plain)
    dm.train_spec, dm.val_spec = pipe, None
    with pytest.raises(ValueError, match="allow_pipe"):
        dm.setup("fit")
    dm.train_spec, dm.val_spec = plain, pipe
    with pytest.raises(ValueError, match="allow_pipe"):
        dm.setup("validate")
    assert not marker.exists()


class _NoPreparer:
    """A stream's preparer that must never see a sample (the shard is refused first)."""

    def maybe(self, *args: object, **kwargs: object) -> None:
        raise AssertionError("a sample was read from a refused shard")


def test_pipe_urls_are_refused_by_every_layer_by_default(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    plain = write_shards([_chat("a")], tmp_path / "d")[0]
    pipe = f"pipe:touch {marker} && cat {plain}"
    unused: Any = _NoPreparer()
    train_stream = TrainStream([Source("t", (pipe,))], unused, batch_size=1, batches_per_rank=1)
    eval_stream = EvalStream([EvalShard(pipe, "v", 1)], unused, batch_size=1)
    refusals = [
        lambda: parse_sources({"shards": pipe}, default_name="train"),
        lambda: count_samples(pipe),
        lambda: eval_shards([Source("v", (pipe,))], None),
        lambda: list(read_samples([plain, pipe])),
        lambda: next(iter(train_stream)),
        lambda: next(iter(eval_stream)),
    ]
    for refuse in refusals:
        with pytest.raises(ValueError, match="allow_pipe"):
            refuse()
    assert not marker.exists()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_allowed_pipe_source_streams_like_the_plain_path(tmp_path: Path, num_workers: int) -> None:
    marker = tmp_path / "ran"
    train = write_shards(
        [_chat(f"t{i}") for i in range(12)], tmp_path / "t", max_samples_per_shard=6
    )
    val = write_shards([_chat(f"v{i}") for i in range(6)], tmp_path / "v", max_samples_per_shard=3)
    piped_train = [f"pipe:cat {train[0]}", f"pipe:touch {marker} && cat {train[1]}"]
    piped_val = [f"pipe:cat {u}" for u in val]

    def keys(train_urls: list[str], val_urls: list[str], allow_pipe: bool) -> list[list[str]]:
        dm = VLMDataModule(
            train={"name": "s", "shards": train_urls},
            val={"name": "s", "shards": val_urls},
            batch_size=2,
            num_workers=num_workers,
            shuffle_buffer=4,
            allow_pipe=allow_pipe,
        )
        dm.connect(
            make_tokenizer("chatml"), image_size=16, image_mean=(0.5,) * 3, image_std=(0.5,) * 3
        )
        loaders = (dm.train_dataloader(), dm.val_dataloader())
        # samples were counted through the pipes too
        assert dm.epoch_samples == 12 and [s.num_samples for s in dm.val_shards] == [3, 3]
        return [[k for batch in loader for k in batch["keys"]] for loader in loaders]

    expected = keys(train, val, allow_pipe=False)
    assert not marker.exists()
    assert keys(piped_train, piped_val, allow_pipe=True) == expected
    assert marker.exists()  # the command really ran
    assert sorted(expected[1]) == sorted(f"v{i}" for i in range(6))


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
