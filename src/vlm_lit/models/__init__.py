"""Vision-language model families: vision tower, connector and causal LM."""

from vlm_lit.models.families import FlamingoVLM, MLPProjectorVLM, QFormerVLM
from vlm_lit.models.freezing import FREEZE_PRESETS, count_parameters
from vlm_lit.models.module import VLMModule
from vlm_lit.models.registry import CONNECTORS, build_vlm

__all__ = [
    "CONNECTORS",
    "FREEZE_PRESETS",
    "FlamingoVLM",
    "MLPProjectorVLM",
    "QFormerVLM",
    "VLMModule",
    "build_vlm",
    "count_parameters",
]
