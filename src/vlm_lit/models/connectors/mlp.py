"""LLaVA-style projector: optional patch-token reduction, then a linear map or a GELU MLP."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

ProjectorType = Literal["linear", "mlp"]
TokenReduction = Literal["none", "avgpool", "pixel_shuffle"]


def _grid_side(num_patches: int, flag: str) -> int:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(
            f"{flag} needs a square patch grid, got {num_patches} tokens (did the tower keep "
            "CLS? use drop_cls=True)"
        )
    return side


class MLPProjector(nn.Module):
    """Map (N, P, D_v) patch features to (N, K, D_lm) LM tokens.

    - ``projector_type="linear"``: one ``Linear`` (LLaVA-1); ``"mlp"`` with ``depth=2`` is
      LLaVA-1.5's ``mlp2x_gelu`` (Linear, GELU, Linear).
    - ``token_reduction="avgpool"``: adaptive 2-D average pooling of the sqrt(P)×sqrt(P)
      grid to sqrt(k)×sqrt(k), k = ``num_tokens`` (a perfect square ≤ P; 1 = global pool).
    - ``token_reduction="pixel_shuffle"``: each f×f block of neighbouring patches becomes
      one token of width f²·D_v (f = ``shuffle_factor``), as in Idefics3 / InternVL.

    ``num_tokens`` (attribute) is K for the ``num_patches`` given at construction.
    """

    def __init__(
        self,
        vision_width: int,
        lm_width: int,
        num_patches: int,
        *,
        projector_type: ProjectorType = "mlp",
        depth: int = 2,
        token_reduction: TokenReduction = "none",
        num_tokens: int | None = None,
        shuffle_factor: int = 2,
    ) -> None:
        super().__init__()
        if projector_type not in ("linear", "mlp"):
            raise ValueError(f"unknown projector_type {projector_type!r}; valid: ['linear', 'mlp']")
        if token_reduction not in ("none", "avgpool", "pixel_shuffle"):
            raise ValueError(
                f"unknown token_reduction {token_reduction!r}; "
                "valid: ['avgpool', 'none', 'pixel_shuffle']"
            )
        if projector_type == "mlp" and depth < 1:
            raise ValueError(f"depth must be >= 1 for projector_type='mlp', got {depth}")
        self.token_reduction = token_reduction
        self.pool_tokens = num_tokens
        self.shuffle_factor = shuffle_factor
        self.num_tokens = self.tokens_per_image(num_patches)
        in_width = vision_width * (shuffle_factor**2 if token_reduction == "pixel_shuffle" else 1)
        layers: list[nn.Module] = [nn.Linear(in_width, lm_width)]
        if projector_type == "mlp":
            for _ in range(depth - 1):
                layers += [nn.GELU(), nn.Linear(lm_width, lm_width)]
        self.proj = nn.Sequential(*layers)

    def tokens_per_image(self, num_patches: int) -> int:
        """K for P = ``num_patches`` input tokens; validates the reduction settings."""
        if self.token_reduction == "none":
            return num_patches
        side = _grid_side(num_patches, f"token_reduction={self.token_reduction!r}")
        if self.token_reduction == "avgpool":
            k = self.pool_tokens
            if k is None or k < 1 or math.isqrt(k) ** 2 != k or k > num_patches:
                raise ValueError(
                    f"num_tokens={k} must be a perfect square in [1, {num_patches}] "
                    "for token_reduction='avgpool'"
                )
            return k
        f = self.shuffle_factor
        if f < 1 or side % f:
            raise ValueError(
                f"shuffle_factor={f} must divide the {side}x{side} patch grid "
                "for token_reduction='pixel_shuffle'"
            )
        return (side // f) ** 2

    def reduce(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, P, D_v) -> (N, K, D_v) pooled, or (N, K, f²·D_v) pixel-shuffled; row-major."""
        if self.token_reduction == "none":
            return feats
        n, p, d = feats.shape
        side = _grid_side(p, f"token_reduction={self.token_reduction!r}")
        grid = feats.reshape(n, side, side, d)  # (N, S, S, D) patches are row-major
        if self.token_reduction == "avgpool":
            out_side = math.isqrt(self.tokens_per_image(p))
            pooled = F.adaptive_avg_pool2d(grid.permute(0, 3, 1, 2), out_side)  # (N, D, s, s)
            return pooled.flatten(2).transpose(1, 2)  # (N, s*s, D)
        f = self.shuffle_factor
        self.tokens_per_image(p)  # validates f against this grid
        blocks = grid.reshape(n, side // f, f, side // f, f, d).permute(0, 1, 3, 2, 4, 5)
        return blocks.reshape(n, (side // f) ** 2, f * f * d)  # (N, K, f²·D)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, P, D_v) -> (N, K, D_lm)."""
        return self.proj(self.reduce(feats))
