"""What an export reads: a run directory (``RUN_DIR/model``) or a ``save_pretrained`` directory."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MODEL_SUBDIR = "model"
METRICS_NAME = "metrics.json"
RUN_CONFIG_NAME = "config.yaml"


class ExportError(ValueError):
    """An export or soup that cannot be done faithfully; the message says why and what to do."""


@dataclass(frozen=True)
class ExportSource:
    """A saved model plus, when it came from a run, that run's config and final metrics."""

    model_dir: Path
    run_dir: Path | None = None
    run_config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def saved_config(self) -> dict[str, Any]:
        """The ``config.json`` written by ``save_pretrained`` (format, family, hparams)."""
        return json.loads((self.model_dir / "config.json").read_text())

    @property
    def run_config_file(self) -> Path | None:
        """The run's ``config.yaml`` (next to ``model/``, or inside a soup directory)."""
        for folder in (self.run_dir, self.model_dir):
            if folder is not None and (folder / RUN_CONFIG_NAME).is_file():
                return folder / RUN_CONFIG_NAME
        return None

    @property
    def name(self) -> str:
        return str(self.run_dir or self.model_dir)


def _is_model_dir(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("format") == "vlm_lit"
    except (json.JSONDecodeError, OSError):
        return False


def _read_run_files(folder: Path) -> tuple[dict[str, Any], dict[str, float]]:
    """``config.yaml`` and ``metrics.json`` of ``folder`` ({} when absent)."""
    run_config: dict[str, Any] = {}
    metrics: dict[str, float] = {}
    if (folder / RUN_CONFIG_NAME).is_file():
        loaded = yaml.safe_load((folder / RUN_CONFIG_NAME).read_text())
        run_config = loaded if isinstance(loaded, dict) else {}
    if (folder / METRICS_NAME).is_file():
        try:
            metrics = json.loads((folder / METRICS_NAME).read_text())
        except json.JSONDecodeError as exc:
            raise ExportError(f"{folder / METRICS_NAME} is not valid JSON: {exc}") from exc
    return run_config, metrics


def resolve_source(path: str | Path) -> ExportSource:
    """Find the model of ``path``: ``RUN_DIR`` (with ``model/``) or a ``save_pretrained`` dir.

    A ``save_pretrained`` dir that sits in a run (``RUN_DIR/model``) or carries its own
    ``config.yaml`` / ``metrics.json`` (a soup) still gets that run information.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ExportError(f"{folder} is not a directory; pass a run directory or a model directory")
    if _is_model_dir(folder / MODEL_SUBDIR):
        run_config, metrics = _read_run_files(folder)
        return ExportSource(folder / MODEL_SUBDIR, folder, run_config, metrics)
    if _is_model_dir(folder):
        if folder.name == MODEL_SUBDIR and (folder.parent / METRICS_NAME).is_file():
            run_config, metrics = _read_run_files(folder.parent)
            return ExportSource(folder, folder.parent, run_config, metrics)
        run_config, metrics = _read_run_files(folder)
        return ExportSource(folder, None, run_config, metrics)
    raise ExportError(
        f"{folder} is neither a run directory (with {MODEL_SUBDIR}/config.json written by "
        "python -m vlm_lit.fit) nor a VLMModule.save_pretrained directory (config.json with "
        '"format": "vlm_lit")'
    )
