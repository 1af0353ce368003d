"""Shard writing/reading: round trips, every broken-shard case, bombs, and no unpickling."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import struct
import tarfile
import zlib
from pathlib import Path

import pytest
from PIL import Image

from vlm_lit.data.shards import (
    EncodedImage,
    SampleCounter,
    ShardError,
    expand_urls,
    read_samples,
    sanitize_key,
    write_shards,
)
from vlm_lit.data.synthetic import TASKS, make_synthetic_samples


def _png(color: tuple[int, ...] = (255, 0, 0), mode: str = "RGB", size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def _sample_json(key: str, num_images: int = 1, answer: str = "red") -> bytes:
    user = [{"type": "image"}] * num_images + [{"type": "text", "text": "Colour?"}]
    obj = {
        "key": key,
        "num_images": num_images,
        "messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "meta": {"task": "vqa_color"},
    }
    return json.dumps(obj).encode()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _good(key: str) -> list[tuple[str, bytes]]:
    return [(f"{key}.json", _sample_json(key)), (f"{key}.0.png", _png())]


def _read(url: str, **kwargs) -> tuple[list[dict], SampleCounter]:
    counter = SampleCounter()
    return list(read_samples(url, counter=counter, **kwargs)), counter


def test_round_trip_every_task_kind(tmp_path: Path) -> None:
    samples = list(make_synthetic_samples(60, seed=3, tasks=list(TASKS)))
    assert {s["meta"]["task"] for s in samples} == set(TASKS)
    paths = write_shards(samples, tmp_path, max_samples_per_shard=16, prefix="rt")
    assert [Path(p).name for p in paths] == [f"rt-{i:06d}.tar" for i in range(4)]
    back, counter = _read(str(tmp_path / "rt-{000000..000003}.tar"))
    assert counter == SampleCounter({"ok": 60})
    for want, got in zip(samples, back, strict=True):
        assert got["key"] == want["key"]
        assert got["meta"] == want["meta"]
        assert got.get("messages") == want.get("messages")
        assert got.get("document") == want.get("document")
        assert got["__url__"] in paths
        assert len(got["images"]) == len(want["images"])
        for a, b in zip(want["images"], got["images"], strict=True):
            assert b.mode == a.mode and a.tobytes() == b.tobytes()


def test_round_trip_modes_text_only_and_encoded_images(tmp_path: Path) -> None:
    jpeg = io.BytesIO()
    Image.new("RGB", (10, 6), (0, 200, 0)).save(jpeg, format="JPEG")
    doc = [{"type": "image"}, {"type": "text", "text": "a"}, {"type": "image"}]
    samples = [
        {"document": doc, "images": [Image.new("RGBA", (5, 5)), Image.new("L", (4, 4), 9)]},
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
        {
            "messages": [{"role": "user", "content": [{"type": "image"}]}],
            "images": [EncodedImage(jpeg.getvalue(), "jpg")],
        },
    ]
    write_shards(samples, tmp_path)
    back, counter = _read(str(tmp_path))
    assert [s["key"] for s in back] == ["shard-00000000", "shard-00000001", "shard-00000002"]
    assert [im.mode for im in back[0]["images"]] == ["RGBA", "L"]
    assert back[1]["images"] == [] and back[1]["meta"] == {}
    assert back[1]["messages"][1]["content"] == "4"
    assert back[2]["images"][0].format == "JPEG" and back[2]["images"][0].size == (10, 6)
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        assert "shard-00000002.0.jpg" in tar.getnames()


def test_write_is_deterministic_and_validates(tmp_path: Path) -> None:
    samples = list(make_synthetic_samples(20, seed=1))
    a = write_shards(samples, tmp_path / "a")
    b = write_shards(samples, tmp_path / "b")
    assert Path(a[0]).read_bytes() == Path(b[0]).read_bytes()
    text = {"messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(ValueError, match="invalid sample key"):
        write_shards([{**text, "key": "a.b"}], tmp_path / "c")
    with pytest.raises(ValueError, match="duplicate sample key"):
        write_shards([{**text, "key": "k"}, {**text, "key": "k"}], tmp_path / "d")
    with pytest.raises(ValueError, match="1 image part"):
        write_shards(
            [{"messages": [{"role": "user", "content": [{"type": "image"}]}]}], tmp_path / "e"
        )
    assert list((tmp_path / "e").iterdir()) == []  # no half-written shard left behind
    assert sanitize_key("coco/train2017/0001.jpg") == "coco_train2017_0001_jpg"


def _truncated_cases(path: Path) -> dict[str, int]:
    """Cut points: inside an image's data, inside a header, and exactly between members."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    inside_data = members[5].offset_data + 10
    inside_header = members[6].offset + 100
    boundary = members[6].offset  # the tar just stops after sample 2's image
    return {"inside_data": inside_data, "inside_header": inside_header, "boundary": boundary}


@pytest.mark.parametrize("where", ["inside_data", "inside_header", "boundary"])
def test_truncated_tar_never_yields_half_a_sample(tmp_path: Path, where: str) -> None:
    samples = list(make_synthetic_samples(6, seed=0, tasks=["vqa_color"]))
    (shard,) = write_shards(samples, tmp_path / "full")
    cut = _truncated_cases(Path(shard))[where]
    broken = tmp_path / "broken.tar"
    broken.write_bytes(Path(shard).read_bytes()[:cut])
    back, counter = _read(str(broken))
    assert counter["bad_tar"] == 1
    assert 1 <= len(back) < 6
    for got, want in zip(back, samples[: len(back)], strict=True):
        assert got["key"] == want["key"] and len(got["images"]) == 1
        assert got["images"][0].tobytes() == want["images"][0].tobytes()
    with pytest.raises(ShardError, match="broken.tar"):
        list(read_samples(str(broken), strict=True))


BAD_CASES = {
    "bad_image": [("k.json", _sample_json("k")), ("k.0.png", b"\x89PNG\r\n\x1a\nnot really")],
    "invalid_json": [("k.json", b"{not json"), ("k.0.png", _png())],
    "missing_json": [("k.0.png", _png())],
    "image_index_out_of_range": [
        ("k.json", _sample_json("k")),
        ("k.0.png", _png()),
        ("k.1.png", _png()),
    ],
    "missing_image": [("k.json", _sample_json("k", num_images=2)), ("k.0.png", _png())],
    "image_count_mismatch": [
        ("k.json", _sample_json("k", 2).replace(b'"num_images": 2', b'"num_images": 1')),
        ("k.0.png", _png()),
    ],
    "invalid_schema": [("k.json", json.dumps({"num_images": 0, "messages": "x"}).encode())],
    "json_too_deep": [("k.json", b'{"a":' * 100 + b"1" + b"}" * 100)],
}


@pytest.mark.parametrize("reason", sorted(BAD_CASES))
def test_bad_sample_is_skipped_counted_or_raised(tmp_path: Path, reason: str) -> None:
    url = _tar(tmp_path / "bad.tar", _good("a") + BAD_CASES[reason] + _good("z"))
    back, counter = _read(url)
    assert [s["key"] for s in back] == ["a", "z"]
    assert counter == SampleCounter({"ok": 2, reason: 1})
    with pytest.raises(ShardError) as info:
        list(read_samples(url, strict=True))
    assert info.value.reason == reason and info.value.key == "k"
    assert "bad.tar" in str(info.value) and "'k'" in str(info.value)


def test_duplicate_keys_and_orphan_members(tmp_path: Path) -> None:
    members = _good("a") + _good("b") + _good("a") + [("b2.json", _sample_json("b2"))]
    members += [("b2.0.png", _png()), ("b2.txt", b"stray"), ("c.0.png", _png())]
    back, counter = _read(_tar(tmp_path / "dup.tar", members))
    assert [s["key"] for s in back] == ["a", "b", "b2"]
    assert counter == SampleCounter(
        {"ok": 3, "duplicate_key": 1, "orphan_member": 1, "missing_json": 1}
    )


@pytest.mark.parametrize("kind", ["zero_bytes", "no_members"])
def test_empty_shard(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "empty.tar"
    if kind == "zero_bytes":
        path.write_bytes(b"")
    else:
        _tar(path, [])
    back, counter = _read(str(path))
    assert back == [] and counter == SampleCounter({"empty_shard": 1})
    with pytest.raises(ShardError, match="empty_shard"):
        list(read_samples(str(path), strict=True))


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares a huge size but holds almost no data (a decompression bomb)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1000)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [9000, 100_000])  # below and far above PIL's own limit
def test_decompression_bomb_refused(tmp_path: Path, side: int) -> None:
    members = [("k.json", _sample_json("k")), ("k.0.png", _png_header(side, side))]
    url = _tar(tmp_path / "bomb.tar", _good("a") + members)
    back, counter = _read(url)
    assert [s["key"] for s in back] == ["a"] and counter["image_too_large"] == 1
    back, counter = _read(url, max_image_pixels=32)  # the bound is configurable
    assert back == [] and counter["image_too_large"] == 2


def test_json_nesting_beyond_the_parser_limit_is_counted_not_raised() -> None:
    from vlm_lit.data.safe_decode import DecodeProblem, decode_json

    with pytest.raises(DecodeProblem) as info:
        decode_json(b"[" * 200_000 + b"]" * 200_000)
    assert info.value.reason == "json_too_deep"


def test_json_too_large_is_not_read(tmp_path: Path) -> None:
    big = _sample_json("k").replace(b'"task"', b'"pad": "' + b"x" * 5000 + b'", "task"')
    url = _tar(tmp_path / "big.tar", _good("a") + [("k.json", big), ("k.0.png", _png())])
    back, counter = _read(url, max_json_bytes=4096)
    assert [s["key"] for s in back] == ["a"] and counter["json_too_large"] == 1


class _Payload:
    """Unpickling this creates `path`: proof of code execution if it ever runs."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_pickle_members_never_run(tmp_path: Path) -> None:
    import torch

    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control)))
    assert control.exists()  # the payload works when unpickled, so the test can fail
    marker = tmp_path / "pwned"
    pth = io.BytesIO()
    torch.save(_Payload(marker), pth)
    evil = [
        ("k.pyd", pickle.dumps(_Payload(marker))),
        ("k.pickle", pickle.dumps(_Payload(marker))),
        ("k.pth", pth.getvalue()),
        ("k.0.pyd", pickle.dumps(_Payload(marker))),
    ]
    url = _tar(tmp_path / "evil.tar", _good("k") + evil)
    back, counter = _read(url)
    assert [s["key"] for s in back] == ["k"] and counter["ignored_member"] == 4
    with pytest.raises(ShardError, match="ignored_member"):
        list(read_samples(url, strict=True))
    assert not marker.exists()


def test_pipe_urls_need_explicit_opt_in(tmp_path: Path) -> None:
    url = _tar(tmp_path / "ok.tar", _good("a"))
    with pytest.raises(ValueError, match="allow_pipe"):
        list(read_samples(f"pipe:cat {url}"))
    back = list(read_samples(f"pipe:cat {url}", allow_pipe=True))
    assert [s["key"] for s in back] == ["a"]


def test_pipe_urls_are_refused_wherever_the_spec_hides_them(tmp_path: Path) -> None:
    url = _tar(tmp_path / "ok.tar", _good("a"))
    marker = tmp_path / "pwned"
    pipe = f"pipe:touch {marker}"
    for spec in (
        f"{{{url},{pipe}}}",  # brace expansion list
        f"{url}::{pipe}",
        [url, pipe],
        f"PIPE:touch {marker}",  # gopen lowercases the scheme: still a pipe
        f" pipe:touch {marker}",  # and strips leading blanks
        f"{pipe}; cat {tmp_path}/missing.tar",  # refused before existence checks
    ):
        with pytest.raises(ValueError, match="allow_pipe"):
            expand_urls(spec)
        with pytest.raises(ValueError, match="allow_pipe"):
            list(read_samples(spec))
    assert not marker.exists()
    assert expand_urls([url, f"pipe:cat {url}"], allow_pipe=True) == [url, f"pipe:cat {url}"]


def test_gzip_shards_and_url_expansion(tmp_path: Path) -> None:
    _tar(tmp_path / "a.tar", _good("a"))
    raw = Path(_tar(tmp_path / "b.raw", _good("b"))).read_bytes()
    (tmp_path / "b.tar.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "b.raw").unlink()
    assert expand_urls(str(tmp_path)) == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar.gz")]
    spec = f"{tmp_path}/a.tar::{tmp_path}/b.tar.gz"
    assert [s["key"] for s in read_samples(spec)] == ["a", "b"]
    with pytest.raises(FileNotFoundError, match="not found"):
        expand_urls(str(tmp_path / "shard-{0..2}.tar"))


def test_counter_merges_and_pickles() -> None:
    a, b = SampleCounter(ok=3, bad_image=1), SampleCounter(ok=2, bad_tar=1)
    a.update(b)
    clone = pickle.loads(pickle.dumps(a))
    assert isinstance(clone, SampleCounter) and clone == {"ok": 5, "bad_image": 1, "bad_tar": 1}
    assert clone.problems() == {"bad_image": 1, "bad_tar": 1}
    assert clone.summary() == "ok=5; bad_image=1, bad_tar=1"


def test_reorder_holds_undecoded_samples_and_keeps_the_order(tmp_path: Path) -> None:
    import random

    from vlm_lit.data.shards import RawSample
    from vlm_lit.data.stream import shuffle_buffer

    samples = list(make_synthetic_samples(30, seed=4))
    write_shards(samples, tmp_path, max_samples_per_shard=8)
    held: list[RawSample] = []

    def buffer(raws):
        for raw in shuffle_buffer(raws, 6, random.Random(7)):
            held.append(raw)
            yield raw

    back, counter = _read(str(tmp_path), reorder=buffer)
    # what the buffer holds is member bytes; images are decoded as samples leave it
    assert all(
        isinstance(r.json, bytes) and all(isinstance(i, bytes) for i in r.images) for r in held
    )
    assert all(isinstance(im, Image.Image) for s in back for im in s["images"])
    # deferring the decoding does not change the shuffled order (same seed, same order)
    decoded_first = shuffle_buffer(read_samples(str(tmp_path)), 6, random.Random(7))
    assert [s["key"] for s in back] == [s["key"] for s in decoded_first]
    assert counter == SampleCounter({"ok": 30})
    by_key = {s["key"]: s for s in samples}
    for got in back:
        want = by_key[got["key"]]
        assert [a.tobytes() for a in got["images"]] == [b.tobytes() for b in want["images"]]


def test_bad_image_behind_a_buffer_is_counted_when_it_leaves(tmp_path: Path) -> None:
    members = [("k.json", _sample_json("k")), ("k.0.png", b"\x89PNG\r\n\x1a\nnot really")]
    members += [("b.json", _sample_json("b")), ("b.0.png", _png_header(100_000, 100_000))]
    url = _tar(tmp_path / "bad.tar", _good("a") + members + _good("z"))
    back, counter = _read(url, reorder=lambda raws: list(raws)[::-1])
    assert [s["key"] for s in back] == ["z", "a"]
    assert counter == SampleCounter({"ok": 2, "bad_image": 1, "image_too_large": 1})
    with pytest.raises(ShardError) as info:
        list(read_samples(url, strict=True, reorder=lambda raws: list(raws)[::-1]))
    assert info.value.reason == "image_too_large" and info.value.key == "b"


def test_json_brackets_inside_strings_are_not_nesting(tmp_path: Path) -> None:
    text = "[{" * 100  # 200 opening brackets, all inside a string: depth stays 4
    obj = json.loads(_sample_json("k", answer=text))
    back, counter = _read(
        _tar(tmp_path / "s.tar", [("k.json", json.dumps(obj).encode())] + [("k.0.png", _png())])
    )
    assert [s["key"] for s in back] == ["k"] and counter == SampleCounter({"ok": 1})
    assert back[0]["messages"][1]["content"][0]["text"] == text


def _format_tar(path: Path, fmt: int, members: list[tuple[str, bytes]], **extra) -> str:
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            for key, value in extra.items():
                setattr(info, key, value)
            tar.addfile(info, io.BytesIO(data))
        for name, kind in (("dir", tarfile.DIRTYPE), ("link.json", tarfile.SYMTYPE)):
            info = tarfile.TarInfo(name)
            info.type = kind
            tar.addfile(info)
    return str(path)


@pytest.mark.parametrize(
    "fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=str
)
def test_long_names_in_every_tar_format(tmp_path: Path, fmt: int) -> None:
    """ustar splits a long path into prefix + name, GNU writes a long-name member, pax an
    extended header (here with a non-ASCII path and pax mtime too)."""
    folder = "deep/" * 25 + ("é" if fmt == tarfile.PAX_FORMAT else "e")  # > 100 characters
    members = [(f"{folder}/{k}", data) for k, data in _good("one") + _good("two")]
    extra = {"mtime": 1.5} if fmt == tarfile.PAX_FORMAT else {}
    url = _format_tar(tmp_path / "long.tar", fmt, members, **extra)
    back, counter = _read(url)
    with tarfile.open(url) as tar:  # the standard library reads the same names
        assert {m.name.rsplit(".", 1)[0] for m in tar if m.isfile()} == {
            f"{folder}/one",
            f"{folder}/one.0",
            f"{folder}/two",
            f"{folder}/two.0",
        }
    assert [s["key"] for s in back] == [f"{folder}/one", f"{folder}/two"]
    assert counter == SampleCounter({"ok": 2, "ignored_member": 1})  # the symlink


@pytest.mark.parametrize("where", ["checksum", "pax_record"])
def test_garbled_header_mid_shard_is_bad_tar_not_a_short_shard(tmp_path: Path, where: str) -> None:
    folder = "deep/" * 25  # > 100 characters: every member gets a pax header
    members = [(f"{folder}{k}", d) for k, d in _good("a") + _good("b") + _good("c")]
    url = _format_tar(tmp_path / "ok.tar", tarfile.PAX_FORMAT, members)
    data = bytearray(Path(url).read_bytes())
    with tarfile.open(url) as tar:
        b_json = tar.getmembers()[2]
    if where == "checksum":  # b.json's own header: the stored checksum no longer matches
        data[b_json.offset_data - 512 + 200] ^= 0xFF
    else:  # the record length of b.json's pax header ("NNN path=...") is not a number
        pax_data = b_json.offset + 512  # b_json.offset is where its pax header starts
        assert data[pax_data : pax_data + 3].isdigit()
        data[pax_data : pax_data + 3] = b"zzz"
    broken = tmp_path / "broken.tar"
    broken.write_bytes(bytes(data))
    back, counter = _read(str(broken))
    # sample a is complete in the bytes, but nothing tells it had no further member
    assert back == [] and counter == SampleCounter({"bad_tar": 1})
    with pytest.raises(ShardError, match="bad_tar") as info:
        list(read_samples(str(broken), strict=True))
    assert info.value.key == f"{folder}a"
