"""Ablation grids: axes of fit settings, their cartesian product, and one ``Arm`` per cell."""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

#: Keys a grid file may have at its top level.
GRID_KEYS: tuple[str, ...] = ("axes", "base", "description", "name", "seeds", "sweeps")


@dataclass(frozen=True)
class AxisValue:
    """One value of an axis: a label (used in arm names) and the fit settings it applies."""

    label: str
    settings: dict[str, Any]
    """dotted fit keys (``connector``, ``model.connector_kwargs.num_queries``) -> value"""


@dataclass(frozen=True)
class Axis:
    """A named list of values; a grid takes the cartesian product of its axes."""

    name: str
    values: tuple[AxisValue, ...]

    def __post_init__(self) -> None:
        if not self.values:
            raise ValueError(f"axis {self.name!r} has no values; give at least one")
        labels = [v.label for v in self.values]
        if len(set(labels)) != len(labels):
            raise ValueError(f"axis {self.name!r} repeats a label: {labels}")


@dataclass(frozen=True)
class Arm:
    """One cell of the grid at one seed: the run that ``vlm_lit.fit`` will do."""

    name: str
    """the cell's labels joined by ``__`` (the seed is not part of it)"""
    seed: int
    settings: dict[str, Any]
    """dotted fit keys -> value, merged over the grid's base"""
    labels: dict[str, str]
    """axis name -> label of this arm's value on that axis"""

    @property
    def run_id(self) -> str:
        """``NAME/seedN``: the arm's run directory relative to the grid's output directory."""
        return f"{self.name}/seed{self.seed}"


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True)
    text = text.strip().removesuffix("...").strip()
    # Labels become directory names: keep them portable.
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "empty"


def parse_axis(name: str, spec: Any, where: str) -> Axis:
    """An axis from its YAML form.

    - a list: values of the fit key ``name`` itself, labelled ``<last key part>-<value>``
      (``model.connector_kwargs.num_tokens: [1, 4]`` -> ``num_tokens-1``, ``num_tokens-4``);
    - a mapping ``{label: {dotted.key: value, ...}}``: labelled bundles of settings, for a
      value that needs several keys at once (``no-gate: {model.connector_kwargs.gated: false}``).
    """
    if isinstance(spec, Mapping):
        values = []
        for label, settings in spec.items():
            if not isinstance(settings, Mapping) or not settings:
                raise ValueError(
                    f"{where}: axis {name!r}, value {label!r} must map fit keys to values, "
                    f"e.g. {{model.connector_kwargs.gated: false}}; got {settings!r}"
                )
            values.append(AxisValue(_format_value(str(label)), dict(settings)))
        return Axis(name, tuple(values))
    if isinstance(spec, list):
        short = name.rsplit(".", 1)[-1]
        values = [AxisValue(f"{short}-{_format_value(v)}", {name: v}) for v in spec]
        return Axis(name, tuple(values))
    raise ValueError(
        f"{where}: axis {name!r} must be a list of values or a mapping of labelled settings, "
        f"got {type(spec).__name__}"
    )


@dataclass
class Grid:
    """Base settings shared by every arm, one or more sweeps (each a cartesian product of
    axes; the grid is their union) and the seeds every cell runs with."""

    name: str
    sweeps: list[list[Axis]]
    seeds: list[int] = field(default_factory=lambda: [0])
    base_configs: list[Path] = field(default_factory=list)
    """fit ``--config`` files merged first, in order (none: the embedded default recipe)"""
    base_settings: dict[str, Any] = field(default_factory=dict)
    """dotted or nested fit keys merged over the configs"""
    description: str = ""
    source: Path | None = None

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(
                f"grid {self.name!r}: seeds must be distinct and non-empty, got {self.seeds}"
            )
        names = [name for name, _, _ in self.cells()]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(
                f"grid {self.name!r}: sweeps produce the same arm twice: {dupes}; "
                "give the values distinct labels"
            )

    @property
    def axis_names(self) -> list[str]:
        """Every axis of every sweep, in first-seen order (the results table's columns)."""
        return list(dict.fromkeys(axis.name for sweep in self.sweeps for axis in sweep))

    def cells(self) -> list[tuple[str, dict[str, Any], dict[str, str]]]:
        """``(name, settings, labels)`` of every cell, sweeps in order, last axis fastest."""
        out = []
        for sweep in self.sweeps:
            for combo in itertools.product(*(axis.values for axis in sweep)):
                settings: dict[str, Any] = {}
                for value in combo:
                    settings.update(value.settings)
                labels = {axis.name: value.label for axis, value in zip(sweep, combo, strict=True)}
                out.append(("__".join(labels.values()) or "base", settings, labels))
        return out

    def arms(self, seeds: Sequence[int] | None = None) -> list[Arm]:
        """Every cell at every seed (``seeds`` replaces the grid's own), seeds innermost."""
        chosen = list(self.seeds if seeds is None else seeds)
        return [
            Arm(name, seed, settings, labels)
            for name, settings, labels in self.cells()
            for seed in chosen
        ]

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        root: Path | None = None,
        name: str = "grid",
        where: str = "grid",
    ) -> Grid:
        """Build from the YAML form; relative ``base.config`` paths resolve against ``root``."""
        unknown = sorted(set(data) - set(GRID_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; valid: {sorted(GRID_KEYS)}")
        if ("axes" in data) == ("sweeps" in data):
            raise ValueError(
                f"{where}: give exactly one of `axes` (one product) or `sweeps` "
                "(a list of products)"
            )
        sweep_specs = [data["axes"]] if "axes" in data else data["sweeps"]
        if not isinstance(sweep_specs, list) or not all(
            isinstance(s, Mapping) for s in sweep_specs
        ):
            raise ValueError(f"{where}: `sweeps` must be a list of axis mappings")
        sweeps = [[parse_axis(k, v, where) for k, v in spec.items()] for spec in sweep_specs]
        base = dict(data.get("base") or {})
        configs = base.pop("config", [])
        configs = [configs] if isinstance(configs, str) else list(configs)
        root = root or Path.cwd()
        seeds = data.get("seeds", [0])
        if not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds):
            raise ValueError(f"{where}: `seeds` must be a list of integers, got {seeds!r}")
        return cls(
            name=str(data.get("name", name)),
            sweeps=sweeps,
            seeds=seeds,
            base_configs=[(root / c).resolve() for c in configs],
            base_settings=base,
            description=str(data.get("description", "")).strip(),
        )


def load_grid(path: str | Path) -> Grid:
    """Read a grid YAML (see ``experiments/grids/``); its name defaults to the file stem."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise FileNotFoundError(f"grid file {path}: {exc.strerror}") from exc
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: a grid is a YAML mapping with `axes` or `sweeps`")
    grid = Grid.from_dict(data, root=path.parent, name=path.stem, where=str(path))
    for config in grid.base_configs:
        if not config.is_file():
            raise FileNotFoundError(f"{path}: base.config {config} does not exist")
    grid.source = path.resolve()
    return grid
