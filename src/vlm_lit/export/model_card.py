"""A short model card (README.md) for every export: backbones, connector, data, final metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlm_lit.export.inputs import ExportSource

CARD_NAME = "README.md"


def _vision_line(spec: dict[str, Any]) -> str:
    backend = spec.get("backend", "?")
    source = spec.get("path") or spec.get("model_name") or spec.get("pretrained")
    cfg = spec.get("config") or spec.get("model_cfg") or {}
    what = source or f"random init from config ({cfg.get('model_type', 'open_clip cfg')})"
    return f"{backend}: {what}, feature_layer={spec.get('feature_layer', -2)}"


def _lm_line(spec: dict[str, Any]) -> str:
    if spec.get("path"):
        return str(spec["path"])
    cfg = spec.get("config") or {}
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
    return "random init from config (" + ", ".join(f"{k}={cfg.get(k)}" for k in keys) + ")"


def count_source_samples(shards: list[str]) -> int | None:
    """Samples in local shards (tar headers only); ``None`` when a shard is not a local file."""
    from vlm_lit.data.sources import count_samples

    if not shards or not all(Path(s).is_file() for s in shards):
        return None
    return sum(count_samples(s) for s in shards)


def data_rows(run_config: dict[str, Any]) -> list[tuple[str, str, int, int | None]]:
    """(split/name, weight, number of shards, samples) for every train and val source."""
    data = run_config.get("data") or {}
    rows = []
    for split in ("train", "val"):
        spec = data.get(split)
        items = [spec] if isinstance(spec, str | dict) else list(spec or [])
        for i, item in enumerate(items):
            item = {"shards": item} if isinstance(item, str) else dict(item)
            shards = item.get("shards") or []
            shards = [shards] if isinstance(shards, str) else [str(s) for s in shards]
            name = f"{split}/{item.get('name') or i}"
            weight = str(item.get("weight", 1.0))
            rows.append((name, weight, len(shards), count_source_samples(shards)))
    return rows


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, int | float) else str(value)


def render_model_card(source: ExportSource, export_format: str, facts: dict[str, Any]) -> str:
    """Markdown text of the card; ``facts`` are what the exporter did (dtype, merge, checks)."""
    from vlm_lit.models.backbones import resolve_specs

    saved = source.saved_config
    hp = saved.get("hparams", {})
    vision, lm, connector = resolve_specs(
        saved.get("family", ""),
        hp.get("vision"),
        hp.get("language_model"),
        hp.get("connector_kwargs"),
        hp.get("size"),
    )
    size = f" (size={hp['size']!r})" if hp.get("size") else ""
    lines = [
        f"# vlm_lit {saved.get('family')} model ({export_format} export)",
        "",
        f"Exported from `{source.name}` with `python -m vlm_lit.export`.",
        "",
        f"- **Connector family**: `{saved.get('family')}` ({saved.get('class')}), "
        f"connector_kwargs `{json.dumps(connector)}`",
        f"- **Vision tower**: {_vision_line(vision)}{size}",
        f"- **Language model**: {_lm_line(lm)}{size}",
        f"- **Training preset**: freeze=`{hp.get('freeze')}`, vision_mode=`{hp.get('vision_mode')}`"
        + (
            f", LoRA r={hp.get('lora_r')} alpha={hp.get('lora_alpha')}"
            if hp.get("freeze") == "lora"
            else ""
        ),
    ]
    for key, value in facts.items():
        lines.append(f"- **{key}**: {value}")
    rows = data_rows(source.run_config)
    lines += ["", "## Training data", ""]
    if rows:
        lines += ["| source | weight | shards | samples |", "|---|---|---|---|"]
        for name, weight, shards, samples in rows:
            lines.append(
                f"| {name} | {weight} | {shards} | {samples if samples is not None else 'n/a'} |"
            )
        steps = source.metrics.get("global_step")
        batch = (source.run_config.get("data") or {}).get("batch_size")
        if steps is not None and batch:
            lines += ["", f"{int(steps)} optimizer steps at batch size {batch} per device."]
    else:
        lines.append("Not recorded (the input was not a run directory with config.yaml).")
    lines += ["", "## Final metrics", ""]
    if source.metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_number(v)} |" for k, v in sorted(source.metrics.items())]
    else:
        lines.append("Not recorded (no metrics.json next to the model).")
    return "\n".join(lines) + "\n"


def write_model_card(
    out_dir: str | Path, source: ExportSource, export_format: str, facts: dict[str, Any]
) -> Path:
    """Write ``out_dir/README.md``; returns its path."""
    path = Path(out_dir) / CARD_NAME
    path.write_text(render_model_card(source, export_format, facts))
    return path
