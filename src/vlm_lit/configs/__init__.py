"""Packaged YAML recipes: the embedded default run and its per-family overrides."""

from __future__ import annotations

from pathlib import Path

#: The shared embedded recipe: used when neither ``--config`` nor ``--data.train`` is given.
DEFAULT_CONFIG = Path(__file__).parent / "shapes_default.yaml"


def default_config_files(family: str) -> list[Path]:
    """The embedded recipe of ``family``, in merge order: ``shapes_default.yaml``, then the
    family's own overrides (``shapes_default_<family>.yaml``) when it has some."""
    own = DEFAULT_CONFIG.with_name(f"shapes_default_{family}.yaml")
    return [DEFAULT_CONFIG] + ([own] if own.is_file() else [])
