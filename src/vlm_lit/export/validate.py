"""The default soup evaluator: the fit CLI's validation over a run's own data config."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlm_lit.export.inputs import ExportError

Evaluator = Callable[[Path], dict[str, float]]
"""Validation hook: a ``save_pretrained`` directory -> flat metrics (``{"val/acc": ...}``)."""


def fit_validation(run_config: dict[str, Any]) -> Evaluator:
    """The fit CLI's validation (``Trainer.validate`` + generation scoring) over a run's data.

    ``run_config`` is a run's ``config.yaml`` (its ``data``, ``trainer`` and ``eval`` sections).
    """
    data = dict(run_config.get("data") or {})
    if not data.get("val"):
        raise ExportError(
            "the default evaluator needs the run's validation data (config.yaml data.val); pass "
            "run directories written by python -m vlm_lit.fit"
        )
    trainer_cfg = run_config.get("trainer") or {}
    eval_cfg = run_config.get("eval") or {}

    def evaluate(model_dir: Path) -> dict[str, float]:
        import lightning as L

        from vlm_lit.data.datamodule import VLMDataModule
        from vlm_lit.eval.callback import GenerationEvalCallback
        from vlm_lit.models.module import VLMModule

        module = VLMModule.from_pretrained(model_dir)
        scorer = GenerationEvalCallback(
            num_samples=eval_cfg.get("num_samples"),
            max_new_tokens=int(eval_cfg.get("max_new_tokens", 8)),
        )
        trainer = L.Trainer(
            accelerator=trainer_cfg.get("accelerator") or "auto",
            devices=1,
            precision=trainer_cfg.get("precision") or "32-true",
            logger=False,
            callbacks=[scorer],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        results = trainer.validate(module, datamodule=VLMDataModule(**data), verbose=False)
        metrics = dict(results[0]) if results else {}
        metrics.update(scorer.last_metrics)
        return {k: float(v) for k, v in metrics.items()}

    return evaluate
