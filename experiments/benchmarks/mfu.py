"""Benchmark: model FLOP utilisation of a training step against this machine's measured matmul peak.

FLOPs of one step (forward + backward; the optimizer's element-wise work is not counted) come
from ``torch.utils.flop_counter.FlopCounterMode``. The peak is the FLOP/s of ``torch.mm`` on
square matrices (n = 2048; 512 with ``--quick``) at the same dtype and thread count, timed in
the same run, alternating with the training step (A/B), so both see the same machine load.
MFU = median over rounds of (step FLOPs / step time) / (mm FLOPs / mm time). Configs: ``tiny``
(the ``size="tiny"`` default model) and ``small`` (LM width 512, 8 layers, 512 LM tokens).
Below 0.5 the profiler's top operators show where the time goes.

    python experiments/benchmarks/mfu.py [--quick] [--device cuda] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import _bench  # noqa: E402
import torch  # noqa: E402
from _models import (  # noqa: E402
    QUICK,
    Size,
    build_ours,
    synthetic_batch,
    to_device,
    trainable,
    vlm_step,
)
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

SMALL = Size(
    image=64,
    patch=8,
    v_width=256,
    v_layers=4,
    v_heads=4,
    lm_width=512,
    lm_layers=8,
    lm_heads=8,
    batch=4,
    text_len=448,
    answer_len=128,
    queries=32,
)
TINY = Size(
    image=32,
    patch=8,
    v_width=32,
    v_layers=2,
    v_heads=2,
    lm_width=64,
    lm_layers=2,
    lm_heads=4,
    batch=8,
    text_len=48,
    answer_len=8,
    queries=4,
)
GOAL = 0.5


def matmul_peak(n: int, args: argparse.Namespace) -> tuple[Any, float]:
    """A closure timing one ``torch.mm`` of two n x n matrices, and its FLOPs (2 n^3)."""
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    a = torch.randn(n, n, device=args.device, dtype=dtype)
    b = torch.randn(n, n, device=args.device, dtype=dtype)
    return (lambda: torch.mm(a, b)), 2.0 * n**3


def count_step_flops(step: Any) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def top_ops(step: Any, device: str, k: int = 10) -> list[dict[str, Any]]:
    """The profiler's top-k operators by self time over two steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            step()
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:k]
    total = sum(getattr(e, key) for e in prof.key_averages()) or 1.0
    return [
        {
            "op": e.key,
            "self_ms": getattr(e, key) / 1000 / 2,
            "share": getattr(e, key) / total,
            "calls_per_step": e.count / 2,
        }
        for e in events
    ]


def measure(name: str, size: Size, family: str, n: int, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    module = build_ours(family, size, "full").to(args.device)
    module.train()
    batch = to_device(synthetic_batch(module, size), args.device)
    optimizer = torch.optim.AdamW(trainable(module), lr=1e-5)
    amp = _bench.autocast(args)

    def step() -> float:
        return vlm_step(module, optimizer, batch, amp)

    mm, mm_flops = matmul_peak(n, args)
    flops = count_step_flops(step)
    times = _bench.alternate({"step": step, "mm": mm}, args.pairs, args.warmup, args.device)
    mfu = statistics.median(
        (flops / s) / (mm_flops / m) for s, m in zip(times["step"], times["mm"], strict=True)
    )
    step_s, mm_s = statistics.median(times["step"]), statistics.median(times["mm"])
    lm_tokens = int(batch["attention_mask"].sum()) + size.batch * (
        module.model.tokens_per_image - 1
    )
    row = {
        "config": name,
        "family": family,
        "lm_width": size.lm_width,
        "lm_layers": size.lm_layers,
        "lm_tokens_per_row": lm_tokens // size.batch,
        "batch": size.batch,
        "step_gflop": flops / 1e9,
        "step_ms": 1000 * step_s,
        "achieved_gflops": flops / step_s / 1e9,
        "peak_mm_gflops": mm_flops / mm_s / 1e9,
        "mfu": mfu,
    }
    if mfu < GOAL:
        row["top_ops"] = top_ops(step, args.device)
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _bench.add_common_args(parser, "mfu")
    parser.add_argument("--family", default="mlp")
    parser.add_argument("--mm-size", type=int, default=2048)
    args = parser.parse_args(argv)
    _bench.setup_torch(args)
    configs = {"tiny": TINY, "small": SMALL}
    if args.quick:
        configs, args.pairs, args.warmup, args.mm_size = {"quick": QUICK}, 2, 1, 512
    rows = [measure(name, size, args.family, args.mm_size, args) for name, size in configs.items()]
    columns = [
        "config",
        "lm_width",
        "lm_layers",
        "lm_tokens_per_row",
        "step_gflop",
        "step_ms",
        "achieved_gflops",
        "peak_mm_gflops",
        "mfu",
    ]
    _bench.print_table(rows, columns)
    for row in rows:
        if "top_ops" in row:
            print(f"\n{row['config']}: MFU {row['mfu']:.3f} < {GOAL}; top ops by self time:")
            _bench.print_table(row["top_ops"], ["op", "self_ms", "share", "calls_per_step"])
    result = {
        "machine": _bench.machine_info(args),
        "mm_size": args.mm_size,
        "peak_dtype": args.dtype,
        "rows": rows,
    }
    return _bench.write_result(args.out, result)


if __name__ == "__main__":
    main()
