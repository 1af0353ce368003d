"""PNG plots of a grid: training-loss curves per arm, and per-task accuracy (seed mean ± std)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from vlm_lit.ablation.grid import Arm

#: The majority-answer floor is a property of the validation data, the same for every arm.
NOT_PLOTTED: frozenset[str] = frozenset({"val/acc_majority"})


def accuracy_metrics(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Accuracy columns present in ``rows``: ``val/acc`` first, then per-task ones, sorted."""
    keys = {
        k
        for row in rows
        for k in row
        if (k.startswith("val/acc") or k == "val/pope_accuracy") and k not in NOT_PLOTTED
    }
    return sorted(keys, key=lambda k: (k != "val/acc", k))


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def plot_loss_curves(
    arms: Sequence[Arm], curves: Mapping[str, Sequence[tuple[int, float]]], path: Path
) -> Path:
    """One colour per arm, one line per seed: ``train/loss`` against the optimizer step.

    ``curves`` maps ``arm.run_id`` to its ``(step, loss)`` points (see ``results.loss_curve``).
    """
    names = list(dict.fromkeys(arm.name for arm in arms))
    colour = dict(zip(names, _colors(len(names)), strict=True))
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    labelled: set[str] = set()
    for arm in arms:
        points = curves.get(arm.run_id) or []
        if not points:
            continue
        steps, losses = zip(*points, strict=True)
        label = arm.name if arm.name not in labelled else None
        labelled.add(arm.name)
        marker = "o" if len(points) < 5 else None  # a 2-step smoke run is still visible
        ax.plot(
            steps, losses, color=colour[arm.name], alpha=0.8, lw=1.2, marker=marker, label=label
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train/loss (token mean)")
    ax.set_title("training loss per arm (one line per seed)")
    ax.grid(alpha=0.3)
    if labelled:
        ax.legend(fontsize="small", loc="best")
    fig.savefig(path, dpi=110)
    return path


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, 0.0
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), std


def plot_accuracy(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Grouped bars: x = accuracy metric, one bar per arm at its seed mean, error bar = std."""
    done = [r for r in rows if r.get("status") == "done"]
    metrics = accuracy_metrics(done)
    names = list(dict.fromkeys(r["arm"] for r in done))
    width_in = min(16.0, 3.0 + len(metrics) * (0.5 + 0.25 * len(names)))
    fig = Figure(figsize=(max(6.0, width_in), 5), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(names))
    for i, (name, colour) in enumerate(zip(names, _colors(len(names)), strict=True)):
        group = [r for r in done if r["arm"] == name]
        stats = [_mean_std([float(r[m]) for r in group if r.get(m) is not None]) for m in metrics]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(metrics))]
        ax.bar(
            xs,
            [s[0] for s in stats],
            width,
            yerr=[s[1] for s in stats],
            capsize=2,
            color=colour,
            label=f"{name} (n={len(group)})",
        )
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels([m.removeprefix("val/") for m in metrics], rotation=35, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (mean ± std over seeds)")
    ax.set_title("validation accuracy per task")
    ax.grid(axis="y", alpha=0.3)
    if names:
        ax.legend(fontsize="small", loc="best")
    fig.savefig(path, dpi=110)
    return path
