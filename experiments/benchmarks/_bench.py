"""Shared benchmark plumbing: flags, A/B alternation, peak memory, machine info, output."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Literal

import torch

Device = Literal["cpu", "cuda"]
DType = Literal["fp32", "bf16"]


def add_common_args(parser: argparse.ArgumentParser, name: str) -> None:
    """``--quick``, ``--device``, ``--dtype``, ``--threads``, ``--pairs``, ``--warmup``, ``--out``."""
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (used by a test)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = bf16 autocast (mixed)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--pairs", type=int, default=7, help="measured A/B pairs after warm-up")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps of each side")
    parser.add_argument("--out", type=Path, default=Path(f"runs/benchmarks/{name}.json"))
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory runs")


def setup_torch(args: argparse.Namespace) -> None:
    """Threads and determinism settings shared by every benchmark."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")


def autocast(args: argparse.Namespace) -> Any:
    """bf16 autocast for ``--dtype bf16`` (weights stay fp32, as Lightning's bf16-mixed)."""
    if args.dtype == "bf16":
        return torch.autocast(args.device, dtype=torch.bfloat16)
    return nullcontext()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def alternate(
    sides: dict[str, Callable[[], Any]], pairs: int, warmup: int, device: str
) -> dict[str, list[float]]:
    """Time each side's step in alternation: warm-up, then ``pairs`` rounds, order flipped
    every round (A B, B A, ...) so a load change on the shared machine hits both sides."""
    for fn in sides.values():
        for _ in range(warmup):
            fn()
    names = list(sides)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(pairs):
        for name in names if i % 2 == 0 else names[::-1]:
            times[name].append(time_call(sides[name], device))
    return times


def median_ratio(a: list[float], b: list[float]) -> float:
    """Median of the per-round ratios a_i / b_i (each pair measured side by side)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


# ----- peak memory -------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


@contextmanager
def peak_memory(device: str) -> Iterator[dict[str, float]]:
    """Peak memory of the enclosed code, in MiB, written into the yielded dict.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset (``peak_mb``). CPU: the process's
    resident-set high-water mark (``VmHWM``), reset through ``/proc/self/clear_refs`` when the
    kernel allows it; ``peak_mb`` is the high-water mark minus the RSS on entry, i.e. what the
    enclosed steps added on top of the built model. Meant to run in a fresh subprocess per
    configuration (``run_child``, which also fixes glibc's mmap threshold: with its default
    dynamic threshold, pages freed before entry stay resident and later steps reuse them, so
    the same step measured 2x apart depending on what ran before).
    """
    out: dict[str, float] = {}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield out
        out["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        out["method"] = "cuda.max_memory_allocated - allocated on entry"  # type: ignore[assignment]
        return
    base = _status_kb("VmRSS")
    reset = True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5" resets the peak RSS (Linux >= 4.0)
    except OSError:
        reset = False
    yield out
    hwm = _status_kb("VmHWM")
    out["peak_mb"] = (hwm - base) / 1024
    out["peak_rss_mb"] = hwm / 1024
    out["method"] = (  # type: ignore[assignment]
        "VmHWM - VmRSS on entry" + ("" if reset else " (HWM not resettable: upper bound)")
    )


def run_child(script: str, payload: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Run ``script --child JSON`` in a fresh interpreter; it prints one JSON line last."""
    cmd = [sys.executable, script, "--child", json.dumps(payload), "--device", args.device]
    cmd += ["--dtype", args.dtype]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    # A fixed mmap threshold makes glibc return every tensor-sized block to the OS on free
    # (no dynamic threshold, no cached heap pages), so the RSS high-water mark tracks the
    # memory that was really live at the peak, whatever ran in the process before.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----- reporting ---------------------------------------------------------------------------


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import transformers

    info = {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "device": args.device,
        "dtype": args.dtype,
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """A plain fixed-width table of ``columns`` from ``rows``."""
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return "-" if value is None else str(value)


def write_result(path: Path, result: dict[str, Any]) -> dict[str, Any]:
    """Write ``result`` as JSON (creating the directory) and return it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return result
