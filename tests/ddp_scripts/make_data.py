"""Shards for dist_run.py (also imported by tests/test_ddp.py): even, uneven and val."""

from __future__ import annotations

import sys
from pathlib import Path

from vlm_lit.data.shards import write_shards
from vlm_lit.data.synthetic import make_synthetic_samples


def _samples(tasks: list[str], n: int, tag: str) -> list[dict]:
    out = []
    for i, sample in enumerate(make_synthetic_samples(n, tasks=tasks, image_size=32, seed=1)):
        sample["key"] = f"{tag}-{i:03d}"
        out.append(sample)
    return out


def make_data(root: Path) -> dict[str, list[str]]:
    """even: 8 shards x 2 samples, 4 text-only and 4 captioned-image shards (every batch is
    one shard, so some batches have no image); uneven: shard sizes 5, 1, 3, 2; val: 3, 2, 4."""
    paths: dict[str, list[str]] = {"even": [], "uneven": [], "val": []}
    for i in range(8):
        task = "text" if i % 2 else "caption"
        paths["even"] += write_shards(
            _samples([task], 2, f"even{i}"), root / "even", prefix=f"e{i}", max_samples_per_shard=2
        )
    for i, n in enumerate((5, 1, 3, 2)):
        paths["uneven"] += write_shards(
            _samples(["caption", "text"], n, f"un{i}"),
            root / "uneven",
            prefix=f"u{i}",
            max_samples_per_shard=n,
        )
    for i, n in enumerate((3, 2, 4)):
        paths["val"] += write_shards(
            _samples(["vqa_color", "text"], n, f"val{i}"),
            root / "val",
            prefix=f"v{i}",
            max_samples_per_shard=n,
        )
    return paths


if __name__ == "__main__":
    make_data(Path(sys.argv[1]))
