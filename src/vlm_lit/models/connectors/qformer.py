"""BLIP-2 Q-Former connector: learned queries read the image, then project to the LM width."""

from __future__ import annotations

import torch
from torch import nn


class QFormerConnector(nn.Module):
    """Map (N, P, D_v) patch features to (N, num_queries, D_lm) with a Q-Former.

    Built on transformers' ``Blip2QFormerModel``: ``num_queries`` learned query vectors go
    through ``num_layers`` BERT-style blocks, with cross-attention to the image features in
    every ``cross_attention_frequency``-th block (BLIP-2: every 2nd). As in BLIP-2, image
    features are layer-normalised first: our towers return pre-norm hidden states, and
    BLIP-2 reads the ViT's normalised output. The text branch of BLIP-2 is not used.
    """

    def __init__(
        self,
        vision_width: int,
        lm_width: int,
        *,
        num_queries: int = 32,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        intermediate_size: int | None = None,
        cross_attention_frequency: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        if hidden_size % num_heads:
            raise ValueError(
                f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}"
            )
        config = Blip2QFormerConfig(
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=intermediate_size or 4 * hidden_size,
            cross_attention_frequency=cross_attention_frequency,
            encoder_hidden_size=vision_width,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
        )
        self.image_norm = nn.LayerNorm(vision_width)
        self.query_tokens = nn.Parameter(torch.randn(1, num_queries, hidden_size) * 0.02)
        self.qformer = Blip2QFormerModel(config)
        self.proj = nn.Linear(hidden_size, lm_width)
        self.num_tokens = num_queries

    def tokens_per_image(self, num_patches: int) -> int:
        """K is the number of queries, whatever the number of patches."""
        return self.num_tokens

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, P, D_v) -> (N, num_queries, D_lm)."""
        image = self.image_norm(feats)  # (N, P, D_v)
        queries = self.query_tokens.expand(feats.shape[0], -1, -1)  # (N, Q, H)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=image)
        return self.proj(out.last_hidden_state)  # (N, Q, D_lm)
