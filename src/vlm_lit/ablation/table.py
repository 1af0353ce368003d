"""A Markdown table of a grid's summary: accuracy mean ± std per arm, with its cost columns."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from vlm_lit.ablation.plots import accuracy_metrics

#: Per-arm cost columns shown next to the accuracies (means over seeds).
COST_COLUMNS: tuple[str, ...] = ("trainable_params", "tokens_per_image", "wall_seconds")


def _cell(summary: Mapping[str, Any], key: str) -> str:
    mean, std = summary.get(f"{key}_mean"), summary.get(f"{key}_std")
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if key in COST_COLUMNS:
        return f"{mean:,.0f}" if key != "wall_seconds" else f"{mean:.0f} s"
    return f"{mean:.3f} ± {std:.3f}"


def format_summary(
    summary: Sequence[Mapping[str, Any]], metrics: Sequence[str] | None = None
) -> str:
    """Markdown table: one row per arm (``summarize`` output), accuracy columns as mean ± std.

    ``metrics`` defaults to every accuracy metric present (``val/acc`` first).
    """
    if not summary:
        return "(no finished arms yet)"
    if metrics is None:
        bare = [
            {k.removesuffix("_mean"): v for k, v in s.items() if k.endswith("_mean")}
            for s in summary
        ]
        metrics = accuracy_metrics(bare)
    columns = [*metrics, *COST_COLUMNS]
    header = ["arm", "seeds", *(c.removeprefix("val/") for c in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summary:
        cells = [str(s["arm"]), str(s.get("seeds", "")), *(_cell(s, c) for c in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
