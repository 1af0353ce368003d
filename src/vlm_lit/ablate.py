"""``python -m vlm_lit.ablate GRID.yaml``: run an ablation grid of ``vlm_lit.fit`` arms."""

from __future__ import annotations

import argparse
import inspect
import sys
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from vlm_lit.ablation.config import flatten, nest
from vlm_lit.ablation.grid import Grid, load_grid
from vlm_lit.ablation.results import collect_rows, summarize
from vlm_lit.ablation.runner import RunOptions, plan, run_grid
from vlm_lit.ablation.table import format_summary


@dataclass
class AblateArgs:
    """Run every arm of an ablation grid (connectors x presets x any fit key x seeds).

    Arms run one after another in this process; an interrupted grid resumes where it
    stopped (an arm whose run directory has metrics.json is not run again). Writes
    OUT/results.csv (one row per arm and seed), OUT/summary.csv (seed mean and std),
    OUT/loss_curves.png and OUT/accuracy.png.
    """

    grid: Path = field(metadata={"help": "grid YAML, e.g. experiments/grids/visual_tokens.yaml"})
    out: Path | None = field(
        default=None, metadata={"help": "output directory (default: runs/ablations/GRID_NAME)"}
    )
    dry_run: bool = field(default=False, metadata={"help": "print the arms and exit"})
    seeds: list[int] | None = field(
        default=None, metadata={"metavar": "SEED", "help": "replace the grid's seeds"}
    )
    max_steps: int | None = field(
        default=None, metadata={"metavar": "N", "help": "trainer.max_steps of every arm"}
    )
    world: Literal["default", "micro"] | None = field(
        default=None, metadata={"help": "shapes-world size ('micro' builds in seconds)"}
    )
    set: list[str] = field(
        default_factory=list,
        metadata={
            "metavar": "KEY=VALUE",
            "help": "fit settings for every arm (value parsed as YAML), "
            "e.g. --set data.batch_size=8 model.lr_connector=3e-4",
        },
    )
    processes: int = field(
        default=1,
        metadata={"metavar": "N", "help": "arms at once; > 1 runs one subprocess per arm"},
    )
    devices: list[str] | None = field(
        default=None,
        metadata={"metavar": "ID", "help": "CUDA device ids, one per concurrent subprocess arm"},
    )


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(inner type, optional) of ``X | None``."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return annotation, False


def build_parser(spec: type = AblateArgs) -> argparse.ArgumentParser:
    """An argparse parser from a dataclass: ``snake_case`` fields become ``--kebab-case``
    flags; required fields are positional; bools are switches; lists take several values."""
    hints = typing.get_type_hints(spec)
    parser = argparse.ArgumentParser(
        prog="python -m vlm_lit.ablate",
        description=inspect.cleandoc(spec.__doc__ or ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for f in fields(spec):
        kind, _ = _unwrap(hints[f.name])
        kwargs: dict[str, Any] = {"help": f.metadata.get("help", "")}
        if "metavar" in f.metadata:
            kwargs["metavar"] = f.metadata["metavar"]
        if f.default is MISSING and f.default_factory is MISSING:
            parser.add_argument(f.name, type=kind, **kwargs)
            continue
        default = f.default if f.default is not MISSING else f.default_factory()
        if kind is bool:
            kwargs.update(action="store_true")
        elif typing.get_origin(kind) is list:
            (item,) = typing.get_args(kind)
            kwargs.update(nargs="+", type=item, action="extend")
        elif typing.get_origin(kind) is Literal:
            kwargs.update(choices=list(typing.get_args(kind)))
        else:
            kwargs.update(type=kind)
        parser.add_argument("--" + f.name.replace("_", "-"), default=default, **kwargs)
    return parser


def parse_settings(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[1, 2]"]`` -> ``{"a.b": 1, "c": [1, 2]}`` (values parsed as YAML)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --set {item!r}: expected KEY=VALUE, e.g. data.batch_size=8")
        out[key] = yaml.safe_load(value)
    return out


def options_for(grid: Grid, args: AblateArgs) -> RunOptions:
    """The runner options the command-line arguments ask for."""
    return RunOptions(
        out_dir=args.out or Path("runs") / "ablations" / grid.name,
        seeds=args.seeds,
        max_steps=args.max_steps,
        world=args.world,
        overrides=parse_settings(args.set),
        processes=args.processes,
        devices=args.devices,
    )


def describe(grid: Grid, options: RunOptions) -> str:
    """The arms as text: run directory and the settings each arm adds to the base."""
    planned = plan(grid, options)
    lines = [
        f"grid {grid.name}: {len(planned)} arms ({len(grid.cells())} cells x "
        f"{len(options.seeds or grid.seeds)} seeds) -> {options.out_dir}"
    ]
    for arm, _, _ in planned:
        settings = " ".join(f"{k}={v}" for k, v in flatten(arm.settings).items())
        lines.append(f"  {arm.run_id:<48} seed={arm.seed} {settings}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse, then print the arms (``--dry-run``) or run them; 1 if any arm failed."""
    namespace = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    args = AblateArgs(**vars(namespace))
    try:
        grid = load_grid(args.grid)
        options = options_for(grid, args)
        nest(options.overrides)  # a malformed key fails here, before any arm runs
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    if args.dry_run:
        print(describe(grid, options))
        return 0
    try:
        outcomes = run_grid(grid, options)
    except ValueError as exc:  # e.g. a finished arm whose config the grid no longer matches
        raise SystemExit(f"error: {exc}") from exc
    failed = [o for o in outcomes if o.status == "failed"]
    rows = collect_rows(grid, grid.arms(options.seeds), options.out_dir)
    print(format_summary(summarize(rows)))
    print(f"results: {options.out_dir / 'results.csv'}")
    for outcome in failed:
        print(f"FAILED {outcome.arm.run_id}: {outcome.error} (see {outcome.run_dir}/error.txt)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
