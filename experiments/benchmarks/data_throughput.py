"""Benchmark: VLMDataModule vs a LLaVA-style map-style loader (samples/s and peak memory).

Both read the same shapes-world samples, tokenize with the same tokenizer, transform images
with the same ``ImageTransform`` and collate with the same function; only the data access
differs: tar shards streamed by ``VLMDataModule`` vs LLaVA's whole-JSON-list-in-memory
``Dataset`` that opens one PNG file per image with PIL. Every configuration runs in its own
subprocess so peak memory (PSS of the process plus its DataLoader workers, sampled every
50 ms) is not polluted by the previous one; ``--quick`` (a smoke run for tests) runs them
in-process instead, so its memory figures are not comparable.

    python experiments/benchmarks/data_throughput.py [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

IMAGE_SIZE = 64
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _pss(pid: int) -> int:
    """Proportional set size (bytes) of ``pid`` plus its descendants, from Linux /proc.

    PSS, not RSS: forked DataLoader workers share the parent's pages copy-on-write, and RSS
    would count those pages once per worker. Returns 0 where /proc is unavailable.
    """
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            total = next(int(x.split()[1]) * 1024 for x in f if x.startswith("Pss:"))
        children = []
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children += [int(c) for c in f.read().split()]
    except (OSError, StopIteration, ValueError):  # the process (or a thread) just exited
        return 0
    return total + sum(_pss(child) for child in children)


class PeakMemory:
    """Samples the PSS of this process tree in a thread; ``peak`` in bytes."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _pss(os.getpid()))
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _pss(os.getpid()))


def prepare(root: Path, num_samples: int) -> None:
    """Write the same samples as tar shards and as a LLaVA-style JSON list + PNG files."""
    from vlm_lit.data.shards import write_shards
    from vlm_lit.data.synthetic import make_synthetic_samples

    samples = list(make_synthetic_samples(num_samples, image_size=IMAGE_SIZE))
    write_shards(samples, root / "shards", max_samples_per_shard=max(num_samples // 8, 1))
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for sample in samples:
        paths = []
        for i, image in enumerate(sample.get("images") or []):
            path = root / "images" / f"{sample['key']}_{i}.png"
            image.save(path)
            paths.append(str(path))
        body = {k: sample[k] for k in ("messages", "document") if k in sample}
        records.append({"id": sample["key"], "image": paths, **body})
    (root / "llava.json").write_text(json.dumps(records))


class LlavaStyleDataset:
    """LLaVA's pattern: the whole JSON list in memory, PIL open per image in ``__getitem__``."""

    def __init__(self, json_path: Path, prepare: Any) -> None:
        self.records = json.loads(Path(json_path).read_text())
        self.prepare = prepare

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from PIL import Image

        record = self.records[index]
        sample = {k: record[k] for k in ("messages", "document") if k in record}
        sample["images"] = [Image.open(path).convert("RGB") for path in record["image"]]
        sample["key"] = record["id"]
        return self.prepare(sample, "llava")


def run_one(kind: str, workers: int, root: Path, batch_size: int, max_length: int) -> dict:
    """Iterate one epoch with one loader; return samples, seconds and peak RSS."""
    import torch
    from torch.utils.data import DataLoader

    from vlm_lit.data.collate import collate_examples
    from vlm_lit.data.datamodule import VLMDataModule
    from vlm_lit.data.example import ExamplePreparer
    from vlm_lit.data.images import ImageTransform
    from vlm_lit.data.tokenize import ensure_image_token
    from vlm_lit.models.tiny import build_tiny_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    ensure_image_token(tokenizer)
    transform = ImageTransform(IMAGE_SIZE, MEAN, STD, mode="pad")
    if kind == "datamodule":
        dm = VLMDataModule(
            train=str(root / "shards"),
            batch_size=batch_size,
            num_workers=workers,
            max_length=max_length,
        )
        dm.connect(tokenizer, image_size=IMAGE_SIZE, image_mean=MEAN, image_std=STD)
        loader: Any = dm.train_dataloader()
    else:
        preparer = ExamplePreparer(tokenizer, transform, max_length=max_length)
        args = preparer.collate_args()
        loader = DataLoader(
            LlavaStyleDataset(root / "llava.json", preparer),
            batch_size=batch_size,
            shuffle=True,
            num_workers=workers,
            collate_fn=lambda examples: collate_examples(examples, **args),
        )
    samples = 0
    with PeakMemory() as memory:
        start = time.perf_counter()
        for batch in loader:
            samples += len(batch["keys"])
        seconds = time.perf_counter() - start
    return {
        "loader": kind,
        "num_workers": workers,
        "samples": samples,
        "seconds": round(seconds, 3),
        "samples_per_s": round(samples / seconds, 1),
        "peak_pss_mb": round(memory.peak / 2**20, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--quick", action="store_true", help="tiny run (64 samples) for tests")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/data_throughput.json"))
    parser.add_argument(
        "--one", nargs=3, metavar=("KIND", "WORKERS", "DIR"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.one:
        kind, workers, root = args.one
        result = run_one(kind, int(workers), Path(root), args.batch_size, args.max_length)
        print(json.dumps(result))
        return result
    if args.quick:
        args.num_samples, args.batch_size = 64, 8
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        prepare(Path(tmp), args.num_samples)
        for workers in args.workers:
            for kind in ("datamodule", "llava_map"):
                if args.quick:  # imports cost more than the run; skip the subprocesses
                    rows.append(run_one(kind, workers, Path(tmp), args.batch_size, args.max_length))
                    continue
                cmd = [sys.executable, __file__, "--one", kind, str(workers), tmp]
                cmd += ["--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
    by = {(r["loader"], r["num_workers"]): r for r in rows}
    ratios = {
        str(w): {
            "samples_per_s": round(
                by["datamodule", w]["samples_per_s"] / by["llava_map", w]["samples_per_s"], 3
            ),
            "peak_pss": round(
                by["datamodule", w]["peak_pss_mb"] / by["llava_map", w]["peak_pss_mb"], 3
            ),
        }
        for w in args.workers
    }
    print(f"{'workers':>7} {'loader':>11} {'samples':>7} {'samples/s':>10} {'peak PSS MB':>12}")
    for r in rows:
        print(
            f"{r['num_workers']:>7} {r['loader']:>11} {r['samples']:>7} "
            f"{r['samples_per_s']:>10} {r['peak_pss_mb']:>12}"
        )
    for w, ratio in ratios.items():
        print(
            f"workers={w}: datamodule/llava_map speed x{ratio['samples_per_s']}, "
            f"peak memory x{ratio['peak_pss']}"
        )
    result = {"num_samples": args.num_samples, "batch_size": args.batch_size, "rows": rows}
    result["ratios_datamodule_over_llava"] = ratios
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
