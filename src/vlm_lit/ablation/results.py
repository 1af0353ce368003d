"""Read finished arms (metrics, CSV logs, saved model) into ``results.csv`` and ``summary.csv``."""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from vlm_lit.ablation.config import LOG_DIR
from vlm_lit.ablation.grid import Arm, Grid

ARM_RECORD = "ablate.json"
#: Columns every row has before the run's own metrics (axis columns go after ``seed``).
FIXED_COLUMNS: tuple[str, ...] = (
    "status",
    "wall_seconds",
    "trainable_params",
    "total_params",
    "tokens_per_image",
    "global_step",
    "supervised_tokens_seen",
)


def model_stats(run_dir: Path) -> dict[str, int]:
    """Trainable / total parameters and visual tokens per image of the saved ``model/``.

    Rebuilt with ``VLMModule.from_pretrained`` (which re-applies the freezing preset) and
    counted with ``count_parameters``: the same numbers the run printed, without parsing text.
    """
    from vlm_lit.models import VLMModule
    from vlm_lit.models.freezing import count_parameters

    module = VLMModule.from_pretrained(run_dir / "model")
    trainable, frozen = count_parameters(module)["total"]
    return {
        "trainable_params": int(trainable),
        "total_params": int(trainable + frozen),
        "tokens_per_image": int(module.model.tokens_per_image),
    }


def read_log(run_dir: Path) -> list[dict[str, str]]:
    """Rows of the CSVLogger's ``metrics.csv`` (empty when the run had no CSV logger)."""
    path = run_dir / LOG_DIR / "metrics.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def loss_curve(run_dir: Path, key: str = "train/loss") -> list[tuple[int, float]]:
    """``(step, value)`` of every logged ``key`` (train steps are logged every
    ``trainer.log_every_n_steps``)."""
    return [(int(r["step"]), float(r[key])) for r in read_log(run_dir) if r.get(key)]


def supervised_tokens_seen(run_dir: Path, global_step: int) -> float | None:
    """Supervised training tokens over the whole run.

    Each logged row holds one batch's count; rows exist every ``log_every_n_steps`` steps,
    so the total is the logged mean times the batches trained (exactly the sum when every
    step is logged without accumulation). None when nothing was logged.
    """
    counts = [float(v) for _, v in loss_curve(run_dir, "train/supervised_tokens")]
    if not counts:
        return None
    accumulate = 1
    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        trainer = (yaml.safe_load(config_path.read_text()) or {}).get("trainer") or {}
        accumulate = int(trainer.get("accumulate_grad_batches") or 1)
    if len(counts) == global_step and accumulate == 1:
        return sum(counts)
    return statistics.fmean(counts) * global_step * accumulate


def arm_row(arm: Arm, run_dir: Path, axis_names: Sequence[str]) -> dict[str, Any] | None:
    """One results row, or None when the arm has not run yet."""
    row: dict[str, Any] = {"arm": arm.name, "seed": arm.seed}
    row.update({name: arm.labels.get(name, "") for name in axis_names})
    if (run_dir / "error.txt").is_file() and not (run_dir / "metrics.json").is_file():
        return {**row, "status": "failed"}
    if not (run_dir / "metrics.json").is_file():
        return None
    metrics = json.loads((run_dir / "metrics.json").read_text())
    record_path = run_dir / ARM_RECORD
    if record_path.is_file():
        record = json.loads(record_path.read_text())
    else:  # finished, but interrupted before the record: recount from the saved model
        record = {"wall_seconds": None, **model_stats(run_dir)}
        try:  # never over a record the arm's own runner wrote meanwhile (concurrent arms)
            with record_path.open("x") as f:
                f.write(json.dumps(record, indent=2) + "\n")
        except FileExistsError:
            record = json.loads(record_path.read_text())
    step = int(metrics.get("global_step", 0))
    row.update(status="done", global_step=step, supervised_tokens_seen=None)
    row.update({k: record.get(k) for k in FIXED_COLUMNS if k in record})
    row["supervised_tokens_seen"] = supervised_tokens_seen(run_dir, step)
    row.update({k: v for k, v in metrics.items() if k != "global_step"})
    return row


def collect_rows(grid: Grid, arms: Sequence[Arm], out_dir: Path) -> list[dict[str, Any]]:
    """Rows of every arm that has finished or failed, in grid order."""
    rows = [arm_row(arm, out_dir / arm.run_id, grid.axis_names) for arm in arms]
    return [row for row in rows if row is not None]


def columns_of(rows: Sequence[dict[str, Any]], leading: Sequence[str]) -> list[str]:
    """``leading`` columns, then every other key of any row, sorted."""
    rest = sorted({k for row in rows for k in row} - set(leading))
    return [*leading, *rest]


def write_csv(rows: Sequence[dict[str, Any]], path: Path, columns: Sequence[str]) -> Path:
    """Write ``rows`` with ``columns`` (missing values empty)."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})
    return path


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per arm, ``<col>_mean`` and ``<col>_std`` (sample std over seeds; 0 for one seed)
    of every numeric column over its finished seeds, plus ``seeds`` (how many)."""
    by_arm: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("status") == "done":
            by_arm.setdefault(row["arm"], []).append(row)
    out = []
    for arm, group in by_arm.items():
        summary: dict[str, Any] = {"arm": arm, "seeds": len(group)}
        keys = [k for k in group[0] if k != "seed"]
        for key in keys:
            values = [r.get(key) for r in group]
            if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
                numbers = [float(v) for v in values if not math.isnan(float(v))]
                if numbers:
                    summary[f"{key}_mean"] = statistics.fmean(numbers)
                    summary[f"{key}_std"] = statistics.stdev(numbers) if len(numbers) > 1 else 0.0
            elif len({str(v) for v in values}) == 1:
                summary[key] = values[0]  # axis labels, status
        out.append(summary)
    return out


def write_reports(grid: Grid, arms: Sequence[Arm], out_dir: Path, *, plots: bool) -> list[Path]:
    """``results.csv`` and ``summary.csv`` (and with ``plots``, the PNGs) in ``out_dir``."""
    rows = collect_rows(grid, arms, out_dir)
    leading = ["arm", "seed", *grid.axis_names, *FIXED_COLUMNS]
    written = [write_csv(rows, out_dir / "results.csv", columns_of(rows, leading))]
    summary = summarize(rows)
    written.append(
        write_csv(
            summary,
            out_dir / "summary.csv",
            columns_of(summary, ["arm", "seeds", *grid.axis_names]),
        )
    )
    if plots and summary:
        from vlm_lit.ablation.plots import plot_accuracy, plot_loss_curves

        curves = {arm.run_id: loss_curve(out_dir / arm.run_id) for arm in arms}
        written.append(plot_loss_curves(arms, curves, out_dir / "loss_curves.png"))
        written.append(plot_accuracy(rows, out_dir / "accuracy.png"))
    return written
