"""``python -m vlm_lit.fit``: train one VLM family from the command line (LightningCLI)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from vlm_lit.configs import DEFAULT_CONFIG, default_config_files  # noqa: F401 (re-exported)
from vlm_lit.data.datamodule import VLMDataModule
from vlm_lit.eval.callback import GenerationEvalCallback
from vlm_lit.loggers import ThroughputLogger, default_loggers
from vlm_lit.models.freezing import FREEZE_PRESETS
from vlm_lit.models.registry import CONNECTORS
from vlm_lit.reliability import (
    DataCountersLogger,
    NonFiniteGuard,
    RNGStateCallback,
    check_backbone_paths,
    use_atomic_checkpoints,
)


class FitCLI(LightningCLI):
    """LightningCLI plus the short flags, the embedded world and the end-of-run files."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Parsed (again) here only so that --help, --print_config and the saved config show
        # them; main() has already used them to pick the model class and override values.
        parser.add_argument(
            "--connector",
            default="mlp",
            choices=sorted(CONNECTORS),
            help="connector family (the model class)",
        )
        parser.add_argument(
            "--freeze",
            default=None,
            choices=sorted(FREEZE_PRESETS),
            help="freezing preset; shorthand for --model.freeze",
        )
        parser.add_argument(
            "--seed",
            type=int,
            default=None,
            help="run seed; shorthand for --seed_everything/--model.seed/--data.seed",
        )
        parser.add_argument(
            "--world",
            default="default",
            choices=["default", "micro"],
            help="size of the embedded shapes world used when no backbone or "
            "data is given ('micro' builds in seconds, for smoke tests)",
        )
        parser.add_argument(
            "--eval.num_samples",
            type=int | None,
            default=None,
            help="validation samples answered by generation (a fixed, seeded subset); "
            "shorthand for --data.val_generation_subset",
        )
        parser.add_argument("--eval.max_new_tokens", type=int, default=8)
        parser.add_argument(
            "--nonfinite_loss",
            default="raise",
            choices=["raise", "skip"],
            help="on a NaN/inf loss or gradient: stop naming the step and batch keys "
            "(raise), or skip that optimizer step and count it (skip)",
        )
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help="resume from this Lightning checkpoint (weights, optimizer, schedule, data "
            "stream position, RNG); 'last' = the newest one of this run",
        )

    def before_instantiate_classes(self) -> None:
        """Fill backbones and data from the shapes world when the user gave none, and resolve
        ``shapes-world:PART`` shard specs (PART: train, align, val)."""
        cfg = self.config
        # A wrong backbone path fails now, before the embedded world or any data is built.
        check_backbone_paths(cfg.model.vision, cfg.model.language_model)
        needs_model = (
            cfg.model.vision is None and cfg.model.language_model is None and cfg.model.size is None
        )
        needs_data = cfg.data.train is None
        refs = _mentions_world(cfg.data.train) or _mentions_world(cfg.data.val)
        if not (needs_model or needs_data or refs):
            return
        from vlm_lit.world import ensure_world

        world = ensure_world(profile=cfg.world, seed=0)
        if needs_model:
            cfg.model.vision = world.vision_spec()
            cfg.model.language_model = world.language_model_spec()
            # world-sized connector defaults; keys the user set win
            given = dict(cfg.model.connector_kwargs or {})
            cfg.model.connector_kwargs = {**world.connector_spec(cfg.connector), **given}
        if needs_data:
            cfg.data.train = [{"name": "shapes", "shards": WORLD_PREFIX + "train"}]
            if cfg.data.val is None:
                cfg.data.val = [{"name": "shapes", "shards": WORLD_PREFIX + "val"}]
        cfg.data.train = _resolve_world(cfg.data.train, world)
        cfg.data.val = _resolve_world(cfg.data.val, world)


WORLD_PREFIX = "shapes-world:"


def _mentions_world(spec: Any) -> bool:
    return WORLD_PREFIX in json.dumps(spec, default=str)


def _resolve_world(spec: Any, world: Any, *, top: bool = True) -> Any:
    """Replace every ``shapes-world:PART`` string in a data spec by that part's shards; a bare
    top-level string becomes one source ``{"name": PART, "shards": [...]}``."""
    if isinstance(spec, str) and spec.startswith(WORLD_PREFIX):
        part = spec[len(WORLD_PREFIX) :]
        shards = world.shards(part)
        return [{"name": part, "shards": shards}] if top else shards
    if isinstance(spec, list):
        out: list[Any] = []
        for item in spec:  # a world part listed among sources becomes a source of its own
            resolved = _resolve_world(item, world, top=top)
            is_part = isinstance(item, str) and item.startswith(WORLD_PREFIX)
            out.extend(resolved) if is_part and top else out.append(resolved)
        return out
    if isinstance(spec, dict):
        return {k: _resolve_world(v, world, top=False) for k, v in spec.items()}
    return spec


def _preparse(argv: list[str]) -> argparse.Namespace:
    """Read --connector/--freeze/--seed (also from --config files) before the CLI exists."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--connector")
    pre.add_argument("--freeze")
    pre.add_argument("--seed", type=int)
    pre.add_argument("--eval.num_samples", dest="eval_num_samples", type=int)
    pre.add_argument("--config", action="append", default=[])
    known, _ = pre.parse_known_args(argv)
    for path in known.config:  # command-line values win over the files
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise SystemExit(f"error: --config {path}: {exc.strerror}") from exc
        for key in ("connector", "freeze", "seed"):
            if getattr(known, key) is None and isinstance(data, dict) and key in data:
                setattr(known, key, data[key])
        evaluation = data.get("eval") if isinstance(data, dict) else None
        if known.eval_num_samples is None and isinstance(evaluation, dict):
            known.eval_num_samples = evaluation.get("num_samples")
    known.connector = known.connector or "mlp"
    if known.connector not in CONNECTORS:
        raise SystemExit(
            f"error: --connector {known.connector!r} is not a connector family; "
            f"valid: {sorted(CONNECTORS)}"
        )
    if known.freeze is not None and known.freeze not in FREEZE_PRESETS:
        raise SystemExit(
            f"error: --freeze {known.freeze!r} is not a freezing preset; "
            f"valid: {sorted(FREEZE_PRESETS)}"
        )
    return known


def _overrides(known: argparse.Namespace) -> list[str]:
    """Short flags as the long options they stand for (appended last, so they win)."""
    extra = []
    if getattr(known, "eval_num_samples", None) is not None:
        extra += ["--data.val_generation_subset", str(known.eval_num_samples)]
    if known.freeze is not None:
        extra += ["--model.freeze", known.freeze]
    if known.seed is not None:
        extra += [
            "--seed_everything",
            str(known.seed),
            "--model.seed",
            str(known.seed),
            "--data.seed",
            str(known.seed),
        ]
    return extra


def write_run_outputs(run_dir: Path, metrics: dict[str, Any], config_yaml: str, model: Any) -> Path:
    """``metrics.json`` (flat, numbers only), ``config.yaml`` (resolved) and ``model/``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    flat = {k: float(v) for k, v in sorted(metrics.items())}
    (run_dir / "config.yaml").write_text(config_yaml)
    model.save_pretrained(run_dir / "model")
    # metrics.json last and atomically: its presence marks a finished run (vlm_lit.ablate)
    partial = run_dir / "metrics.json.partial"
    partial.write_text(json.dumps(flat, indent=2) + "\n")
    os.replace(partial, run_dir / "metrics.json")
    return run_dir / "metrics.json"


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Parse, build, train, validate; write metrics.json, the config and the final model."""
    argv = list(sys.argv[1:] if argv is None else argv)
    known = _preparse(argv)
    embedded = not any(a == "--config" or a.startswith(("--config=", "--data.train")) for a in argv)
    parser_kwargs: dict[str, Any] = {"description": __doc__}
    if embedded:
        parser_kwargs["default_config_files"] = [
            str(p) for p in default_config_files(known.connector)
        ]
    cli = FitCLI(
        model_class=CONNECTORS[known.connector],
        datamodule_class=VLMDataModule,
        run=False,
        args=argv + _overrides(known),
        seed_everything_default=0,
        parser_kwargs=parser_kwargs,
        save_config_callback=None,  # written next to metrics.json instead, see below
        trainer_defaults={"accelerator": "auto"},
    )
    model, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    if cli.config["trainer"].get("logger") in (None, True):  # the user chose no logger
        trainer.loggers = default_loggers(trainer.default_root_dir)
    evaluator = GenerationEvalCallback(
        num_samples=datamodule.val_generation_subset,
        max_new_tokens=cli.config["eval.max_new_tokens"],
    )
    trainer.callbacks.append(evaluator)
    # First in the list: their hooks must run before ModelCheckpoint's saves (see their docs).
    trainer.callbacks[:0] = [
        NonFiniteGuard(cli.config["nonfinite_loss"]),
        RNGStateCallback(),
        DataCountersLogger(),
        ThroughputLogger(every_n_steps=trainer.log_every_n_steps),
    ]
    use_atomic_checkpoints(trainer)  # an interrupted save never replaces the last good one
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=cli.config["ckpt_path"])
    train_seconds = time.perf_counter() - start
    results = trainer.validate(model, datamodule=datamodule, verbose=False)
    metrics = {k: v for k, v in (results[0] if results else {}).items()}
    metrics.update(evaluator.last_metrics)
    metrics.update(train_seconds=round(train_seconds, 1), global_step=trainer.global_step)
    if trainer.is_global_zero:
        config_yaml = cli.parser.dump(cli.config, skip_none=False)
        path = write_run_outputs(Path(trainer.default_root_dir), metrics, config_yaml, model)
        print(f"metrics: {path}")
    return metrics


if __name__ == "__main__":
    main()
