"""One arm's complete ``vlm_lit.fit`` config: base files, grid settings, overrides, run paths."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from vlm_lit.ablation.grid import Arm, Grid
from vlm_lit.configs import default_config_files

#: Keys the runner owns (paths of this run); ignored when comparing a finished arm's config.
RUNNER_KEYS: tuple[str, ...] = ("trainer.default_root_dir", "trainer.logger")


def nest(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1, "a": {"c": 2}}`` -> ``{"a": {"b": 1, "c": 2}}`` (dotted keys become levels)."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        parts = str(key).split(".")
        value = nest(value) if isinstance(value, Mapping) else copy.deepcopy(value)
        out = deep_merge(out, _wrap(parts, value))
    return out


def flatten(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The inverse of :func:`nest`: nested mappings -> dotted keys."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _wrap(parts: list[str], value: Any) -> dict[str, Any]:
    for part in reversed(parts):
        value = {part: value}
    return value


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``: mappings merge key by key; lists and scalars replace."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def drop_keys(config: Mapping[str, Any], dotted: tuple[str, ...]) -> dict[str, Any]:
    """A copy of ``config`` without the dotted keys ``dotted`` (missing ones are fine)."""
    out = copy.deepcopy(dict(config))
    for key in dotted:
        *parents, leaf = key.split(".")
        node: Any = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


#: Sub-directory of a run holding the CSVLogger's ``metrics.csv`` and ``hparams.yaml`` (its own
#: directory: the logger clears a non-empty one's ``metrics.csv`` and warns about it).
LOG_DIR = "logs"


def csv_logger(run_dir: Path) -> dict[str, Any]:
    """A CSVLogger writing ``run_dir/logs/metrics.csv`` and ``run_dir/logs/hparams.yaml``."""
    return {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": str(run_dir), "name": LOG_DIR, "version": ""},
    }


def base_config(grid: Grid, connector: str | None = None) -> dict[str, Any]:
    """The grid's config files merged in order; none given: the embedded default recipe of
    ``connector`` (the grid's base connector when None), as ``vlm_lit.fit`` would use it."""
    if connector is None:
        connector = str(nest(grid.base_settings).get("connector", "mlp"))
    merged: dict[str, Any] = {}
    for path in grid.base_configs or default_config_files(connector):
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, Mapping):
            raise ValueError(f"base.config {path} of grid {grid.name!r} is not a YAML mapping")
        merged = deep_merge(merged, nest(data))
    return deep_merge(merged, nest(grid.base_settings))


def arm_config(
    grid: Grid, arm: Arm, run_dir: Path, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The full config ``vlm_lit.fit --config`` gets for ``arm``.

    Order, later wins: base configs, ``base`` settings, the arm's axis settings, its seed,
    ``overrides`` (the runner's ``--max-steps`` / ``--world`` / ``--set``), then the run's
    own directory and a CSVLogger there (the loss curves are read from its ``metrics.csv``).
    """
    settings = nest(arm.settings)
    connector = settings.get("connector", nest(grid.base_settings).get("connector", "mlp"))
    config = deep_merge(base_config(grid, str(connector)), settings)
    config["seed"] = arm.seed
    config = deep_merge(config, nest(overrides or {}))
    run = {"trainer": {"default_root_dir": str(run_dir), "logger": csv_logger(run_dir)}}
    return deep_merge(config, run)


def same_experiment(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two arm configs describe the same run, ignoring where its files go."""
    return drop_keys(a, RUNNER_KEYS) == drop_keys(b, RUNNER_KEYS)
