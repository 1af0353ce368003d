"""``python -m vlm_lit.soup``: uniform and greedy weight averages ("model soups") of runs.

Uniform: every run averaged (see ``vlm_lit.export.average`` for what may be averaged and how
LoRA runs are merged first). Greedy (POINTS-1.5, after Wortsman et al.'s model soups): runs
in descending metric order, each kept only if the validation metric of the soup does not get
worse; validating a candidate uses an ``evaluate`` hook (default: the fit CLI's validation).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vlm_lit.export.average import ARCH_KEYS, check_compatible, write_soup
from vlm_lit.export.inputs import ExportError, ExportSource, resolve_source
from vlm_lit.export.validate import Evaluator, fit_validation

__all__ = [
    "ARCH_KEYS",
    "Evaluator",
    "GreedyResult",
    "check_compatible",
    "fit_validation",
    "greedy_soup",
    "main",
    "write_soup",
]

SOUP_NAME = "soup.json"
MetricMode = Literal["max", "min"]


def _score(metrics: dict[str, float], metric: str, where: str) -> float:
    if metric not in metrics:
        raise ExportError(f"--metric {metric!r} is not among {where}'s metrics {sorted(metrics)}")
    return float(metrics[metric])


@dataclass
class GreedyResult:
    """Which runs the greedy soup kept, in the order tried, with each candidate's score."""

    kept: list[str]
    trials: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


def greedy_soup(
    sources: Sequence[ExportSource],
    out_dir: str | Path,
    *,
    metric: str = "val/acc",
    mode: MetricMode = "max",
    evaluate: Evaluator | None = None,
    log: Callable[[str], Any] = print,
) -> GreedyResult:
    """Greedy soup into ``out_dir``: rank runs by ``metric`` (their metrics.json, else
    ``evaluate``), start from the best, add each next run only if the soup's metric is not
    worse. ``evaluate`` defaults to :func:`fit_validation` over the best run's config.yaml."""
    check_compatible(sources)
    if mode not in ("max", "min"):
        raise ExportError(f"unknown --mode {mode!r}; valid: ['max', 'min']")
    if evaluate is None:
        evaluate = fit_validation(sources[0].run_config)
    sign = 1.0 if mode == "max" else -1.0
    scored = []
    for source in sources:
        metrics = source.metrics if metric in source.metrics else evaluate(source.model_dir)
        scored.append((_score(metrics, metric, source.name), source, metrics))
    scored.sort(key=lambda item: -sign * item[0])  # best first; stable for ties
    best_score, best, best_metrics = scored[0]
    kept = [best]
    result = GreedyResult(kept=[best.name], metrics=dict(best_metrics))
    result.trials.append({"run": best.name, metric: best_score, "kept": True})
    log(f"[soup] start from {best.name}: {metric}={best_score:.4g}")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    for _, candidate, _ in scored[1:]:
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".soup-candidate-") as tmp:
            metrics = evaluate(write_soup([*kept, candidate], tmp))
        value = _score(metrics, metric, "the candidate soup")
        keep = sign * value >= sign * best_score  # "does not drop"
        result.trials.append({"run": candidate.name, metric: value, "kept": keep})
        log(f"[soup] + {candidate.name}: {metric}={value:.4g} -> {'keep' if keep else 'drop'}")
        if keep:
            kept.append(candidate)
            best_score, result.metrics = value, dict(metrics)
            result.kept.append(candidate.name)
    write_soup(kept, out)
    return result


def _write_records(out: Path, record: dict[str, Any], metrics: dict[str, float]) -> None:
    from vlm_lit.export.model_card import write_model_card

    (out / SOUP_NAME).write_text(json.dumps(record, indent=2) + "\n")
    if metrics:
        flat = {k: float(v) for k, v in sorted(metrics.items())}
        (out / "metrics.json").write_text(json.dumps(flat, indent=2) + "\n")
    facts = {"soup": f"{record['method']} average of {len(record['kept'])} runs: {record['kept']}"}
    write_model_card(out, resolve_source(out), "vlm-lit soup", facts)


def main(argv: list[str] | None = None) -> Path:
    """Parse ``argv`` and write the soup; errors exit with status 2 and the reason."""
    parser = argparse.ArgumentParser(prog="python -m vlm_lit.soup", description=__doc__)
    parser.add_argument("runs", nargs="+", help="run directories (or save_pretrained dirs)")
    parser.add_argument("--out", required=True, help="output save_pretrained directory (new)")
    parser.add_argument("--greedy", action="store_true", help="greedy soup instead of uniform")
    parser.add_argument("--metric", default="val/acc", help="validation metric for --greedy")
    parser.add_argument(
        "--mode", choices=["max", "min"], default=None, help="default: min for *loss, else max"
    )
    parser.add_argument(
        "--evaluate", action="store_true", help="uniform: validate the soup, write metrics.json"
    )
    parser.add_argument("--overwrite", action="store_true", help="allow a non-empty --out")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    try:
        if out.exists() and any(out.iterdir()) and not args.overwrite:
            raise ExportError(f"--out {out} is not empty; pick a new directory or --overwrite")
        sources = [resolve_source(r) for r in args.runs]
        if args.greedy:
            mode = args.mode or ("min" if args.metric.endswith("loss") else "max")
            result = greedy_soup(sources, out, metric=args.metric, mode=mode)
            record = {
                "method": "greedy",
                "metric": args.metric,
                "mode": mode,
                "kept": result.kept,
                "trials": result.trials,
            }
            metrics = result.metrics
        else:
            check_compatible(sources)
            print(f"[soup] averaging {len(sources)} runs")
            write_soup(sources, out)
            metrics = fit_validation(sources[0].run_config)(out) if args.evaluate else {}
            record = {"method": "uniform", "kept": [s.name for s in sources]}
        _write_records(out, record, metrics)
    except (ExportError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    print(f"[soup] wrote {out}")
    return out


if __name__ == "__main__":
    main()
