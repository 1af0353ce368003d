"""Benchmark: training-step time and peak memory vs visual tokens per image, for each family.

The vision tower's tokens per image P (= image patches: 16, 64, 256, 576 at patch 8, i.e.
32 to 192 px) is the knob. The MLP projector passes all P tokens into the LM (K = P); the
Q-Former compresses them to 32 queries and the Perceiver to 32 latents, so only the
vision tower and the cross-attention to the patches grow with P. Within each P the three
families' steps are timed round-robin (``--pairs`` rounds after warm-up; medians reported).
Peak memory: one fresh subprocess per (family, P) (see ``_bench.peak_memory``). Writes JSON
and a PNG plot next to it.

    python experiments/benchmarks/token_scaling.py [--quick] [--device cuda] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import json
import math
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
    scaled,
    synthetic_batch,
    to_device,
    trainable,
    vlm_step,
)

FAMILIES = ("mlp", "qformer", "flamingo")


def make_step(family: str, size: Size, args: argparse.Namespace) -> Any:
    torch.manual_seed(0)
    module = build_ours(family, size, "align").to(args.device)
    module.train()
    batch = to_device(synthetic_batch(module, size), args.device)
    optimizer = torch.optim.AdamW(trainable(module), lr=1e-4)
    amp = _bench.autocast(args)
    return lambda: vlm_step(module, optimizer, batch, amp)


def size_for(base: Size, tokens: int) -> Size:
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"--tokens must be perfect squares (a square patch grid), got {tokens}")
    return scaled(base, image=side * base.patch)


def child(payload: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    step = make_step(payload["family"], Size(**payload["size"]), args)
    with _bench.peak_memory(args.device) as mem:
        for _ in range(3):
            step()
    return mem


def plot(rows: list[dict[str, Any]], path: Path, has_memory: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if has_memory else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
    for family in FAMILIES:
        mine = [r for r in rows if r["family"] == family]
        if not mine:
            continue
        x = [r["visual_tokens"] for r in mine]
        axes[0][0].plot(x, [r["step_ms"] for r in mine], marker="o", label=family)
        if has_memory:
            axes[0][1].plot(x, [r["peak_mb"] for r in mine], marker="o", label=family)
    for ax, label in zip(axes[0], ["step time (ms)", "peak memory added (MiB)"], strict=False):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("vision tokens per image (patches)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _bench.add_common_args(parser, "token_scaling")
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 64, 256, 576])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _bench.setup_torch(args)
    if args.child:
        result = child(json.loads(args.child), args)
        print(json.dumps(result))
        return result
    base = Size(queries=32)
    if args.quick:
        base, args.tokens = QUICK, [4, 16]
        args.pairs, args.warmup, args.no_memory = 1, 1, True
    rows = []
    for tokens in args.tokens:
        size = size_for(base, tokens)
        steps = {family: make_step(family, size, args) for family in FAMILIES}
        times = _bench.alternate(steps, args.pairs, args.warmup, args.device)
        for family in FAMILIES:
            row = {
                "family": family,
                "visual_tokens": tokens,
                "image_px": size.image,
                "step_ms": 1000 * statistics.median(times[family]),
            }
            if not args.no_memory:
                payload = {"family": family, "size": size.__dict__}
                mem = _bench.run_child(__file__, payload, args)
                row["peak_mb"], row["memory_method"] = mem["peak_mb"], mem["method"]
            rows.append(row)
        del steps
    first = {r["family"]: r["step_ms"] for r in rows if r["visual_tokens"] == args.tokens[0]}
    for r in rows:
        r["time_vs_smallest"] = r["step_ms"] / first[r["family"]]
    columns = ["family", "visual_tokens", "image_px", "step_ms", "time_vs_smallest"]
    _bench.print_table(rows, columns + ([] if args.no_memory else ["peak_mb"]))
    growth = {f: [r for r in rows if r["family"] == f] for f in FAMILIES}
    span = args.tokens[-1] / args.tokens[0]
    for family, mine in growth.items():
        factor = mine[-1]["step_ms"] / mine[0]["step_ms"]
        exponent = math.log(factor) / math.log(span)
        print(f"{family}: x{span:.0f} visual tokens -> step time x{factor:.2f} (~P^{exponent:.2f})")
    png = args.out.with_suffix(".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, png, not args.no_memory)
    print(f"wrote {png}")
    result = {
        "machine": _bench.machine_info(args),
        "size": base.__dict__,
        "rows": rows,
        "plot": str(png),
    }
    return _bench.write_result(args.out, result)


if __name__ == "__main__":
    main()
