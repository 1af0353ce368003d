"""The connector registry: family name -> VLMModule subclass, and ``build_vlm``."""

from __future__ import annotations

from typing import Any

from vlm_lit.models.families import FlamingoVLM, MLPProjectorVLM, QFormerVLM
from vlm_lit.models.module import VLMModule

CONNECTORS: dict[str, type[VLMModule]] = {
    "mlp": MLPProjectorVLM,
    "qformer": QFormerVLM,
    "flamingo": FlamingoVLM,
}


def build_vlm(connector: str, **kwargs: Any) -> VLMModule:
    """Build the ``connector`` family's module; ``build_vlm("mlp", size="tiny")`` for a tiny one.

    ``kwargs`` are ``VLMModule`` constructor arguments (vision, language_model, freeze, ...).
    """
    if connector not in CONNECTORS:
        raise ValueError(f"unknown connector {connector!r}; valid: {sorted(CONNECTORS)}")
    return CONNECTORS[connector](**kwargs)
