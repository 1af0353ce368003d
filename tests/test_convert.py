"""Converters (LLaVA, img2dataset, MMC4) on tiny inputs written here, plus the CLI."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from vlm_lit.data.convert import main
from vlm_lit.data.converters.img2dataset import convert_img2dataset
from vlm_lit.data.converters.llava import convert_llava
from vlm_lit.data.converters.mmc4 import convert_mmc4
from vlm_lit.data.prompts import CAPTION_PROMPTS
from vlm_lit.data.shards import read_samples


def _image(color: tuple[int, int, int], fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 6), color).save(buf, format=fmt)
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _turns(*pairs: str) -> list[dict[str, str]]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(pairs)]


@pytest.fixture
def llava_input(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "images"
    (images / "coco").mkdir(parents=True)
    (images / "coco" / "a.jpg").write_bytes(_image((255, 0, 0), "JPEG"))
    (images / "b.png").write_bytes(_image((0, 0, 255)))
    (images / "broken.png").write_bytes(b"garbage")
    secret = tmp_path / "secret.png"
    secret.write_bytes(_image((1, 2, 3)))
    os.symlink(secret, images / "link.png")  # a symlink that leads out of the folder
    records = [
        {"id": "a.1", "image": "coco/a.jpg", "conversations": _turns("<image>\nWhat colour?", "Red.")},
        {"id": "two", "image": ["coco/a.jpg", "b.png"],
         "conversations": _turns("<image> vs <image>: same?", "No.", "Sure?", "Yes.")},
        {"id": "notoken", "image": "b.png", "conversations": _turns("Colour?", "Blue.")},
        {"id": "text", "conversations": _turns("2+2?", "4")},
        {"id": "up", "image": "../secret.png", "conversations": _turns("<image>", "x")},
        {"id": "abs", "image": str(secret), "conversations": _turns("<image>", "x")},
        {"id": "link", "image": "link.png", "conversations": _turns("<image>", "x")},
        {"id": "gone", "image": "nope.png", "conversations": _turns("<image>", "x")},
        {"id": "bad", "image": "broken.png", "conversations": _turns("<image>", "x")},
        {"id": "mismatch", "image": "b.png", "conversations": _turns("<image><image>", "x")},
        {"id": "a.1", "conversations": _turns("dup id", "ok")},
        {"id": "role", "conversations": [{"from": "robot", "value": "?"}]},
        {"id": "odd", "conversations": [{"from": ["gpt"], "value": "?"}]},
    ]  # fmt: skip
    annotations = tmp_path / "llava.json"
    annotations.write_text(json.dumps(records))
    return annotations, images


def test_llava_converter(llava_input: tuple[Path, Path], tmp_path: Path) -> None:
    annotations, images = llava_input
    summary = convert_llava(str(annotations), str(images), str(tmp_path / "out"), progress=False)
    assert summary.written == 5
    assert summary.skipped == {"bad_image": 1, "image_token_mismatch": 1, "invalid_record": 2,
                               "missing_image": 1, "path_escape": 3}  # fmt: skip
    samples = {s["key"]: s for s in read_samples(summary.shards, strict=True)}
    assert sorted(samples) == ["a_1", "a_1-dup1", "notoken", "text", "two"]
    first = samples["a_1"]
    assert first["messages"] == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
    ]
    assert first["images"][0].format == "JPEG" and first["images"][0].getpixel((3, 3))[0] > 200
    assert first["meta"] == {"source": "llava", "id": "a.1", "task": "instruct"}
    two = samples["two"]
    assert [p["type"] for p in two["messages"][0]["content"]] == ["image", "text", "image", "text"]
    assert len(two["messages"]) == 4 and two["images"][1].getpixel((0, 0)) == (0, 0, 255)
    assert samples["notoken"]["messages"][0]["content"][0] == {"type": "image"}
    assert samples["text"]["images"] == []


def test_img2dataset_converter(tmp_path: Path) -> None:
    members = []
    for i in range(12):
        key = f"{i:09d}"
        members += [
            (f"{key}.jpg", _image((i * 20, 0, 0), "JPEG")),
            (f"{key}.txt", f"cap {i}".encode()),
        ]
        members.append((f"{key}.json", json.dumps({"url": f"http://x/{i}.jpg"}).encode()))
    members += [("000000100.jpg", _image((0, 0, 0), "JPEG"))]  # no caption
    members += [("000000101.webp", b"not an image"), ("000000101.txt", b"broken")]
    members += [("000000102.png", _image((0, 9, 0))), ("000000102.txt", b"  ")]
    members += [("000000103.txt", b"caption without image"), ("000000103.pyd", b"\x80junk")]
    url = _tar(tmp_path / "00000.tar", members)
    summary = convert_img2dataset(url, str(tmp_path / "out"), seed=1, progress=False)
    assert summary.written == 12
    assert summary.skipped == {"bad_image": 1, "empty_caption": 1, "ignored_member": 1,
                               "missing_caption": 1, "missing_image": 1}  # fmt: skip
    samples = list(read_samples(summary.shards, strict=True))
    prompts = [s["messages"][0]["content"][1]["text"] for s in samples]
    assert set(prompts) <= set(CAPTION_PROMPTS) and len(set(prompts)) > 2
    first = samples[0]
    assert first["key"] == "000000000" and first["meta"]["url"] == "http://x/0.jpg"
    assert first["messages"][1]["content"][0]["text"] == "cap 0"
    assert first["meta"]["answers"] == ["cap 0"] and first["meta"]["task"] == "caption"
    again = convert_img2dataset(url, str(tmp_path / "again"), seed=1, progress=False)
    other = convert_img2dataset(url, str(tmp_path / "other"), seed=2, progress=False)
    prompts_of = lambda s: [x["messages"][0]["content"][1]["text"] for x in read_samples(s.shards)]  # noqa: E731
    assert prompts_of(again) == prompts and prompts_of(other) != prompts


def test_mmc4_converter(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "b.png").write_bytes(_image((0, 255, 0)))
    (tmp_path / "outside.png").write_bytes(_image((9, 9, 9)))
    red = base64.b64encode(_image((255, 0, 0))).decode()
    doc = {
        "url": "http://doc",
        "text_list": ["First sentence.", "Second one.", "Third."],
        "image_info": [
            {"image_name": "b.png", "matched_text_index": 2, "matched_sim": 0.3},
            {"image_name": "a.png", "matched_text_index": 0, "image_base64": red},
            {"image_name": "../outside.png", "matched_text_index": 1},
            {"image_name": "b.png", "matched_text_index": 7},
        ],
    }
    only_bad = {
        "text_list": ["Just text."],
        "image_info": [{"image_name": "zzz.png", "matched_text_index": 0}],
    }
    members = [("d1.json", json.dumps(doc).encode()), ("d2.json", json.dumps(only_bad).encode())]
    members += [("d3.json", b"{broken")]
    url = _tar(tmp_path / "mmc4.tar", members)
    summary = convert_mmc4(url, str(tmp_path / "out"), image_folder=str(folder), progress=False)
    assert summary.written == 1
    assert summary.skipped == {"image:bad_matched_index": 1, "image:missing_image": 1,
                               "image:path_escape": 1, "invalid_json": 1, "no_images": 1}  # fmt: skip
    (sample,) = read_samples(summary.shards, strict=True)
    assert sample["document"] == [
        {"type": "image"},
        {"type": "text", "text": "First sentence. Second one."},
        {"type": "image"},
        {"type": "text", "text": "Third."},
    ]
    assert [im.getpixel((0, 0)) for im in sample["images"]] == [(255, 0, 0), (0, 255, 0)]
    assert sample["meta"] == {"source": "mmc4", "task": "document", "url": "http://doc"}
    kept = convert_mmc4(url, str(tmp_path / "o2"), min_similarity=0.5, keep_text_only=True,
                        progress=False)  # fmt: skip
    # Without a matched_sim an image cannot pass the threshold: both documents lose theirs.
    assert kept.written == 2 and kept.skipped["image:low_similarity"] == 4
    assert all(s["images"] == [] for s in read_samples(kept.shards))


def test_cli_runs_converters_and_prints_summary(
    llava_input: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    annotations, images = llava_input
    out = tmp_path / "cli"
    summary = main(["llava", "--annotations", str(annotations), "--image_folder", str(images),
                    "--out_dir", str(out), "--max_samples_per_shard", "2"])  # fmt: skip
    assert summary.written == 5 and len(summary.shards) == 3
    err = capsys.readouterr().err
    assert "wrote 5 samples" in err and "path_escape=3" in err


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    run = [sys.executable, "-m", "vlm_lit.data.convert", "--help"]
    result = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert all(name in result.stdout for name in ("llava", "img2dataset", "mmc4"))
    with pytest.raises(SystemExit) as exited:
        main(["mmc4", "--help"])
    assert exited.value.code == 0 and "--min_similarity" in capsys.readouterr().out
