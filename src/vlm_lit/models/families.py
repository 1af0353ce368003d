"""The three connector families: each only says how vision features reach the LM."""

from __future__ import annotations

from typing import Any

from torch import nn

from vlm_lit.models.base import BaseVLM
from vlm_lit.models.module import VLMModule


class MLPProjectorVLM(VLMModule):
    """LLaVA: patch features -> MLP projector -> K = P visual tokens spliced at ``<image>``.

    ``connector_kwargs`` go to ``MLPProjector`` (projector_type, depth, token_reduction,
    num_tokens, shuffle_factor).
    """

    family = "mlp"

    def build_model(
        self,
        vision: nn.Module,
        language_model: nn.Module,
        image_token_id: int,
        connector: dict[str, Any],
    ) -> BaseVLM:
        from vlm_lit.models.connectors.mlp import MLPProjector
        from vlm_lit.models.prefix import PrefixVLM

        dim_lm = int(language_model.config.get_text_config().hidden_size)
        projector = MLPProjector(vision.width, dim_lm, vision.num_patches, **connector)
        return PrefixVLM(vision, projector, language_model, image_token_id)


class QFormerVLM(VLMModule):
    """BLIP-2: a Q-Former's learned queries read the patches -> K = num_queries tokens
    spliced at ``<image>``. ``connector_kwargs`` go to ``QFormerConnector`` (num_queries,
    hidden_size, num_layers, num_heads, cross_attention_frequency, ...)."""

    family = "qformer"

    def build_model(
        self,
        vision: nn.Module,
        language_model: nn.Module,
        image_token_id: int,
        connector: dict[str, Any],
    ) -> BaseVLM:
        from vlm_lit.models.connectors.qformer import QFormerConnector
        from vlm_lit.models.prefix import PrefixVLM

        dim_lm = int(language_model.config.get_text_config().hidden_size)
        qformer = QFormerConnector(vision.width, dim_lm, **connector)
        return PrefixVLM(vision, qformer, language_model, image_token_id)


class FlamingoVLM(VLMModule):
    """Flamingo: a Perceiver resampler turns each image into latents that the LM reads
    through zero-gated cross-attention blocks in front of its decoder layers; ``<image>``
    stays in the text as the media marker. ``connector_kwargs`` go to ``FlamingoModel``
    (num_latents, resampler_depth, cross_attn_every, ...)."""

    family = "flamingo"

    def build_model(
        self,
        vision: nn.Module,
        language_model: nn.Module,
        image_token_id: int,
        connector: dict[str, Any],
    ) -> BaseVLM:
        from vlm_lit.models.flamingo import FlamingoModel

        return FlamingoModel(vision, language_model, image_token_id, **connector)
