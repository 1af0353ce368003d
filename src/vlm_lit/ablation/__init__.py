"""Ablation grids over ``vlm_lit.fit``: define axes, run every arm resumably, tabulate, plot."""

from __future__ import annotations

from vlm_lit.ablation.config import arm_config
from vlm_lit.ablation.grid import Arm, Axis, AxisValue, Grid, load_grid
from vlm_lit.ablation.results import collect_rows, loss_curve, model_stats, summarize
from vlm_lit.ablation.runner import ArmOutcome, RunOptions, is_finished, plan, run_grid
from vlm_lit.ablation.table import format_summary

__all__ = [
    "Arm",
    "ArmOutcome",
    "Axis",
    "AxisValue",
    "Grid",
    "RunOptions",
    "arm_config",
    "collect_rows",
    "format_summary",
    "is_finished",
    "load_grid",
    "loss_curve",
    "model_stats",
    "plan",
    "run_grid",
    "summarize",
]
