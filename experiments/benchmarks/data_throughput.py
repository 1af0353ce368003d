"""Benchmark: VLMDataModule vs a LLaVA-style map-style loader (samples/s and peak memory).

Both read the same shapes-world samples (the same PNG bytes: written into the tar shards and
as files), tokenize with the same tokenizer and preparer code, transform images with the
same ``ImageTransform`` object and collate with the same function, in batches of the same
size. What differs is what each design does: tar shards streamed by ``VLMDataModule``, whose
examples carry uint8 pixels that the collate function normalises once per batch, vs LLaVA's
whole-JSON-list-in-memory ``Dataset`` that opens one PNG file per image with PIL and
normalises each image in ``__getitem__``. ``--check`` (always on with ``--quick``) first
verifies that both produce equal batches up to order: the same samples with identical
``input_ids``, ``labels``, ``pixel_values`` (bit for bit), ``meta`` and ``messages``, the same
batch count and layout.

Speed and memory are measured in separate runs: the memory probe (PSS of the process plus
its DataLoader workers from /proc, read every 50 ms in a thread) costs CPU and takes the
kernel's memory-map lock, and it slowed the two loaders by different amounts (README, "Data
loading throughput"), so timed runs do not sample.

- Speed at 0 workers: both loaders in one process, one batch from each in turn, each
  ``next()`` timed on its own (``run_interleaved``). On a shared machine the speed drifts
  by tens of percent from run to run; alternating batch by batch puts both loaders through
  the same drift, so the per-round ratio is steady where separate runs scatter by +-30%.
  Each round builds both loaders afresh; ``samples_per_s`` counts the first batch (the
  shuffle buffer filling) but not building the loader (``setup_seconds``, timed apart).
- Speed with workers: workers of two loaders would compete for the cores, so each loader
  runs alone in its own subprocess; ``cpu_seconds`` is the epoch's CPU time, workers
  included. Rounds alternate the order (A B, B A, ...).
- Memory: each configuration in its own subprocess, so nothing is warm from a previous one;
  ``peak_pss_mb`` and ``loader_pss_mb`` (that peak minus the same process's PSS just before
  the loader is built, i.e. the memory the loader itself adds).

``--rounds`` (default 8) speed rounds and ``--memory-rounds`` (default 2) memory rounds; a
ratio is the median of per-round ratios, printed with their range. ``--num-samples 20000``
shows how memory grows with the dataset (the LLaVA-style list is held in full, the
DataModule's buffer is bounded).
``--quick`` (a smoke run for tests) runs in-process instead, so its memory figures are not
comparable.

    python experiments/benchmarks/data_throughput.py [--quick] [--check] [--out results.json]
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

IMAGE_SIZE = 64
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
KINDS = ("datamodule", "llava_map")
SOURCE = "train"  # the DataModule's default source name, used by both sides


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from Linux /proc."""
    children = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            children += [int(c) for c in f.read().split()]
    return [pid] + [p for child in children for p in _tree(child)]


def _pss(pid: int) -> int:
    """Proportional set size (bytes) of ``pid`` plus its descendants, from Linux /proc.

    PSS, not RSS: forked DataLoader workers share the parent's pages copy-on-write, and RSS
    would count those pages once per worker. A worker forking or exiting while the processes
    are read changes every share, so the sum could count shared pages twice: such a reading
    is taken again. Returns 0 where /proc is unavailable.
    """
    for _ in range(10):
        try:
            pids = _tree(pid)
            total = 0
            for p in pids:
                with open(f"/proc/{p}/smaps_rollup") as f:
                    total += next(int(x.split()[1]) * 1024 for x in f if x.startswith("Pss:"))
            if _tree(pid) == pids:
                return total
        except (OSError, StopIteration, ValueError):  # a process (or thread) just exited
            continue
    return 0


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


def _png(image: Any) -> bytes:
    """PNG bytes as ``write_shards`` encodes them by default (compress_level=1)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def prepare(root: Path, num_samples: int) -> None:
    """Write the same samples, with the same PNG bytes, as tar shards and as a LLaVA-style
    JSON list + PNG files."""
    from vlm_lit.data.shards import EncodedImage, write_shards
    from vlm_lit.data.synthetic import make_synthetic_samples

    (root / "images").mkdir(parents=True, exist_ok=True)
    records, shard_samples = [], []
    for sample in make_synthetic_samples(num_samples, image_size=IMAGE_SIZE):
        encoded = [_png(image) for image in sample.get("images") or []]
        paths = []
        for i, data in enumerate(encoded):
            path = root / "images" / f"{sample['key']}_{i}.png"
            path.write_bytes(data)
            paths.append(str(path))
        shard_samples.append({**sample, "images": [EncodedImage(d, "png") for d in encoded]})
        body = {k: sample[k] for k in ("messages", "document", "meta") if k in sample}
        records.append({"id": sample["key"], "image": paths, **body})
    write_shards(shard_samples, root / "shards", max_samples_per_shard=max(num_samples // 8, 1))
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
        sample = {k: record[k] for k in ("messages", "document", "meta") if k in record}
        sample["images"] = [Image.open(path).convert("RGB") for path in record["image"]]
        sample["key"] = record["id"]
        return self.prepare(sample, SOURCE)


def _tokenizer_and_transform() -> tuple[Any, Any]:
    from vlm_lit.data.images import ImageTransform
    from vlm_lit.data.tokenize import ensure_image_token
    from vlm_lit.models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    ensure_image_token(tokenizer)
    return tokenizer, ImageTransform(IMAGE_SIZE, MEAN, STD, mode="pad")


def build_loader(
    kind: str, workers: int, root: Path, batch_size: int, max_length: int, shared: tuple
) -> Any:
    """One epoch's loader over ``root``; ``shared`` = (tokenizer, transform), the same objects
    and settings for both kinds."""
    from torch.utils.data import DataLoader

    from vlm_lit.data.collate import collate_examples
    from vlm_lit.data.datamodule import VLMDataModule
    from vlm_lit.data.example import ExamplePreparer

    tokenizer, transform = shared
    if kind == "datamodule":
        dm = VLMDataModule(
            train=str(root / "shards"),
            batch_size=batch_size,
            num_workers=workers,
            max_length=max_length,
        )
        dm.connect(
            tokenizer,
            image_size=IMAGE_SIZE,
            image_mean=MEAN,
            image_std=STD,
            image_transform=transform,
        )
        return dm.train_dataloader()
    preparer = ExamplePreparer(tokenizer, transform, max_length=max_length)
    return DataLoader(
        LlavaStyleDataset(root / "llava.json", preparer),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        collate_fn=functools.partial(collate_examples, **preparer.collate_args()),
    )


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (DataLoader workers are joined when
    their epoch ends): less sensitive than wall time to other jobs on a shared machine."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_one(
    kind: str, workers: int, root: Path, batch_size: int, max_length: int, measure: str
) -> dict:
    """Build one loader and iterate one epoch. ``measure="speed"``: samples, seconds and CPU
    time, nothing else running in the process; ``"memory"``: peak PSS with the probe on."""
    import contextlib

    import torch

    torch.manual_seed(0)
    shared = _tokenizer_and_transform()
    baseline = _pss(os.getpid()) if measure == "memory" else 0
    samples = 0
    with PeakMemory() if measure == "memory" else contextlib.nullcontext() as memory:
        start = time.perf_counter()
        loader = build_loader(kind, workers, root, batch_size, max_length, shared)
        setup = time.perf_counter() - start
        start, cpu = time.perf_counter(), _cpu_seconds()
        for batch in loader:
            samples += len(batch["keys"])
        seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    row = {"loader": kind, "num_workers": workers, "measure": measure, "samples": samples}
    if measure == "speed":
        return {
            **row,
            "setup_seconds": round(setup, 3),
            "seconds": round(seconds, 3),
            "samples_per_s": round(samples / seconds, 1),
            "cpu_seconds": round(cpu, 3),
        }
    return {
        **row,
        "peak_pss_mb": round(memory.peak / 2**20, 1),
        "loader_pss_mb": round((memory.peak - baseline) / 2**20, 1),
    }


def run_interleaved(root: Path, batch_size: int, max_length: int, rounds: int) -> list[dict]:
    """Both loaders at 0 workers in one process, one batch from each in turn, each
    ``next()`` timed on its own: the machine's speed drifts (other tenants, clocks) by tens
    of percent between runs, and alternating batch by batch makes both loaders live through
    the same drift. Each round builds both loaders afresh (setup timed apart) and alternates
    which one goes first; returns one speed row per loader and round."""
    import torch

    torch.manual_seed(0)
    shared = _tokenizer_and_transform()
    rows = []
    for round_ in range(rounds):
        order = list(KINDS) if round_ % 2 == 0 else list(KINDS)[::-1]
        setup, iterators = {}, {}
        for kind in order:
            start = time.perf_counter()
            iterators[kind] = iter(build_loader(kind, 0, root, batch_size, max_length, shared))
            setup[kind] = time.perf_counter() - start
        spent, samples, live = dict.fromkeys(KINDS, 0.0), dict.fromkeys(KINDS, 0), set(KINDS)
        while live:
            for kind in order:
                if kind not in live:
                    continue
                start = time.perf_counter()
                batch = next(iterators[kind], None)
                spent[kind] += time.perf_counter() - start
                if batch is None:
                    live.discard(kind)
                else:
                    samples[kind] += len(batch["keys"])
        for kind in KINDS:
            rows.append(
                {
                    "round": round_,
                    "loader": kind,
                    "num_workers": 0,
                    "measure": "speed",
                    "samples": samples[kind],
                    "setup_seconds": round(setup[kind], 3),
                    "seconds": round(spent[kind], 3),
                    "samples_per_s": round(samples[kind] / spent[kind], 1),
                }
            )
    return rows


def _by_sample(loader: Any) -> tuple[dict[str, Any], list[tuple]]:
    """Per-key sample contents and the sorted batch layouts of one epoch."""
    samples: dict[str, Any] = {}
    layouts = []
    for batch in loader:
        fields = tuple(sorted((k, str(getattr(v, "dtype", type(v)))) for k, v in batch.items()))
        layouts.append((len(batch["keys"]), fields))
        for row, key in enumerate(batch["keys"]):
            length = int(batch["attention_mask"][row].sum())
            samples[key] = (
                batch["input_ids"][row, :length].tolist(),
                batch["labels"][row, :length].tolist(),
                batch["pixel_values"][batch["image_sample_index"] == row],
                batch["meta"][row],
                batch["messages"][row],
                batch["sources"][row],
            )
    return samples, sorted(layouts)


def check_equal_batches(root: Path, batch_size: int, max_length: int) -> dict[str, int]:
    """Raise unless both loaders give equal batches up to order (same samples, identical
    tokens, labels, pixels, meta and messages; same batch count and layout)."""
    import torch

    shared = _tokenizer_and_transform()
    seen = {k: _by_sample(build_loader(k, 0, root, batch_size, max_length, shared)) for k in KINDS}
    (dm, dm_layout), (llava, llava_layout) = seen["datamodule"], seen["llava_map"]
    if set(dm) != set(llava) or dm_layout != llava_layout:
        raise AssertionError(
            f"different samples or batches: {len(dm)} vs {len(llava)} samples, "
            f"{len(dm_layout)} vs {len(llava_layout)} batches"
        )
    for key, (ids, labels, pixels, *rest) in dm.items():
        other = llava[key]
        if ids != other[0] or labels != other[1] or rest != list(other[3:]):
            raise AssertionError(f"sample {key!r}: tokens, labels, meta or messages differ")
        if not torch.equal(pixels, other[2]):
            raise AssertionError(f"sample {key!r}: pixel_values differ")
    return {"samples": len(dm), "batches": len(dm_layout)}


def _round_ratios(rows: list[dict], workers: int, field: str) -> list[float] | None:
    """Per-round datamodule / llava_map of ``field`` (pairs of the same round and measure);
    None when there is none or a llava_map value is not positive (in-process ``--quick``
    memory deltas)."""
    pair = {
        (r["round"], r["loader"]): r[field]
        for r in rows
        if r["num_workers"] == workers and field in r
    }
    rounds = sorted({r for r, _ in pair})
    if not rounds or any(pair[r, "llava_map"] <= 0 for r in rounds):
        return None
    return [pair[r, "datamodule"] / pair[r, "llava_map"] for r in rounds]


def _median_ratio(rows: list[dict], workers: int, field: str) -> float | None:
    """Median over rounds of datamodule / llava_map for ``field``."""
    ratios = _round_ratios(rows, workers, field)
    return None if ratios is None else round(statistics.median(ratios), 3)


def _spread(rows: list[dict], workers: int, field: str) -> tuple[float, float] | None:
    """Smallest and largest per-round ratio of ``field``: the noise the median sits in."""
    ratios = _round_ratios(rows, workers, field)
    return None if ratios is None else (round(min(ratios), 3), round(max(ratios), 3))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument(
        "--rounds", type=int, default=8, help="speed runs per configuration, order alternated"
    )
    parser.add_argument(
        "--memory-rounds", type=int, default=2, help="memory runs per configuration (probe on)"
    )
    parser.add_argument(
        "--check", action="store_true", help="first verify both loaders give equal batches"
    )
    parser.add_argument("--quick", action="store_true", help="tiny run (64 samples) for tests")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/data_throughput.json"))
    parser.add_argument(
        "--one", nargs=4, metavar=("KIND", "WORKERS", "DIR", "MEASURE"), help=argparse.SUPPRESS
    )
    parser.add_argument("--interleaved", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        kind, workers, root, measure = args.one
        result = run_one(kind, int(workers), Path(root), args.batch_size, args.max_length, measure)
        print(json.dumps(result))
        return result
    if args.interleaved:
        rows = run_interleaved(
            Path(args.interleaved), args.batch_size, args.max_length, args.rounds
        )
        print(json.dumps(rows))
        return {"rows": rows}
    if args.quick:
        args.num_samples, args.batch_size, args.check = 64, 8, True
        args.rounds, args.memory_rounds = 1, 1
    rows = []
    result: dict[str, Any] = {"num_samples": args.num_samples, "batch_size": args.batch_size}
    plan = [("speed", r) for r in range(args.rounds)]
    plan += [("memory", r) for r in range(args.memory_rounds)]
    with tempfile.TemporaryDirectory() as tmp:
        prepare(Path(tmp), args.num_samples)
        if args.check:
            result["equal_batches"] = check_equal_batches(
                Path(tmp), args.batch_size, args.max_length
            )
            print(f"equal batches: {result['equal_batches']}")
        if 0 in args.workers and args.rounds:  # speed at 0 workers: batch by batch
            if args.quick:
                rows += run_interleaved(Path(tmp), args.batch_size, args.max_length, args.rounds)
            else:
                cmd = [sys.executable, __file__, "--interleaved", tmp]
                cmd += ["--rounds", str(args.rounds), "--batch-size", str(args.batch_size)]
                cmd += ["--max-length", str(args.max_length)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True)
                rows += json.loads(out.stdout.strip().splitlines()[-1])
        for measure, round_ in plan:
            for workers in args.workers:
                if measure == "speed" and workers == 0:
                    continue  # measured interleaved above
                for kind in KINDS if round_ % 2 == 0 else KINDS[::-1]:
                    if args.quick:  # imports cost more than the run; skip the subprocesses
                        row = run_one(
                            kind, workers, Path(tmp), args.batch_size, args.max_length, measure
                        )
                    else:
                        cmd = [sys.executable, __file__, "--one", kind, str(workers), tmp, measure]
                        cmd += ["--batch-size", str(args.batch_size)]
                        cmd += ["--max-length", str(args.max_length)]
                        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
                        row = json.loads(out.stdout.strip().splitlines()[-1])
                    rows.append({"round": round_, **row})
    fields = {"samples_per_s": "samples_per_s", "cpu_seconds": "cpu_seconds"}
    fields.update(peak_pss="peak_pss_mb", loader_pss="loader_pss_mb")
    ratios = {
        str(w): {name: _median_ratio(rows, w, field) for name, field in fields.items()}
        for w in args.workers
    }
    spreads = {str(w): _spread(rows, w, "samples_per_s") for w in args.workers}
    for measure, columns in (
        ("speed", ("samples", "setup_seconds", "seconds", "samples_per_s", "cpu_seconds")),
        ("memory", ("samples", "peak_pss_mb", "loader_pss_mb")),
    ):
        header = ("round", "num_workers", "loader", *columns)
        print(f"{measure} runs:")
        print(" ".join(f"{c:>13}" for c in header))
        for r in rows:
            if r["measure"] == measure:
                print(" ".join(f"{r.get(c, '-')!s:>13}" for c in header))
    for w, ratio in ratios.items():
        low, high = spreads[w] or (None, None)
        print(
            f"workers={w}: datamodule/llava_map speed x{ratio['samples_per_s']} (median of "
            f"{args.rounds} {'batch-interleaved ' if w == '0' else ''}rounds, range "
            f"x{low}-x{high}; CPU time x{ratio['cpu_seconds']}), "
            f"peak memory x{ratio['peak_pss']}, loader memory x{ratio['loader_pss']} (median "
            f"of {args.memory_rounds})"
        )
    result.update(
        rounds=args.rounds,
        memory_rounds=args.memory_rounds,
        rows=rows,
        ratios_datamodule_over_llava=ratios,
        speed_ratio_range=spreads,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
