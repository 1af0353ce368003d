"""Flamingo's Perceiver resampler: a fixed number of learned latents read a variable patch grid."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FeedForward(nn.Module):
    """Pre-LN MLP ``LayerNorm -> Linear -> GELU -> Linear`` (no biases, as in Flamingo)."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        inner = dim * mult
        self.norm = nn.LayerNorm(dim)
        self.fc_in = nn.Linear(dim, inner, bias=False)
        self.fc_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (..., D) -> (..., D); the caller adds the residual."""
        return self.fc_out(F.gelu(self.fc_in(self.norm(x))))


class PerceiverAttention(nn.Module):
    """Latents attend to ``[features; latents]``, so they can also exchange information."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        inner = heads * dim_head
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        n, s, _ = x.shape
        return x.view(n, s, self.heads, self.dim_head).transpose(1, 2)  # (N, H, S, dh)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """``features`` (N, P, D), ``latents`` (N, L, D) -> update for the latents (N, L, D)."""
        features = self.norm_media(features)
        latents = self.norm_latents(latents)
        q = self._split(self.to_q(latents))  # (N, H, L, dh)
        # Keys/values over the patches AND the latents themselves (Flamingo, Sec. 2.1).
        kv_input = torch.cat([features, latents], dim=1)  # (N, P + L, D)
        k, v = self.to_kv(kv_input).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(q, self._split(k), self._split(v))  # (N, H, L, dh)
        n, _, length, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(n, length, self.heads * self.dim_head))


class PerceiverResampler(nn.Module):
    """Map per-image patch features (N, P, D_v) to ``num_latents`` visual tokens (N, L, dim).

    Each of ``depth`` layers is a pre-LN cross-attention from the learned latents to the
    concatenation of the (projected) patch features and the latents, followed by a residual
    feed-forward. The output is layer-normed. Learned temporal / media position embeddings
    of the paper are omitted: every image here is a single frame.
    """

    def __init__(
        self,
        dim_vision: int,
        dim: int,
        depth: int = 2,
        num_latents: int = 64,
        heads: int = 8,
        dim_head: int = 64,
        ff_mult: int = 4,
    ) -> None:
        super().__init__()
        if depth < 1 or num_latents < 1 or heads < 1 or dim_head < 1:
            raise ValueError(
                "PerceiverResampler needs depth, num_latents, heads and dim_head >= 1; got "
                f"depth={depth}, num_latents={num_latents}, heads={heads}, dim_head={dim_head}"
            )
        self.dim_vision = dim_vision
        self.dim = dim
        self.num_latents = num_latents
        # Project once up front so the whole resampler works in the LM's width.
        self.proj_in = nn.Identity() if dim_vision == dim else nn.Linear(dim_vision, dim)
        self.latents = nn.Parameter(torch.randn(num_latents, dim) * 0.02)  # (L, D)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads, dim_head), FeedForward(dim, ff_mult)])
            for _ in range(depth)
        )
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``features`` (N, P, D_v) -> latents (N, num_latents, dim)."""
        if features.dim() != 3 or features.shape[-1] != self.dim_vision:
            raise ValueError(
                f"PerceiverResampler expects features (N, P, {self.dim_vision}); "
                f"got {tuple(features.shape)}"
            )
        x = self.proj_in(features)  # (N, P, D)
        latents = self.latents.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)  # (N, L, D)
        for attn, ff in self.layers:
            latents = latents + attn(x, latents)
            latents = latents + ff(latents)
        return self.norm_out(latents)
