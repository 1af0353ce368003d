"""TokenMean: the token-weighted mean loss of an epoch, exact across ranks.

Why not ``self.log(mean, batch_size=tokens, sync_dist=True)``: Lightning syncs the integer
weight sum with ``reduce_op="mean"`` and writes ``sum / world_size`` back into the integer
tensor, truncating it (21 tokens over 2 ranks become 10), so the synced loss is off whenever
the token total is odd. ``torchmetrics.MeanMetric(nan_strategy="disable")`` silently drops
the weights. This metric all-reduces two sums and divides once; a NaN stays visible.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


class TokenMean(Metric):
    """``sum(summed cross-entropy) / sum(supervised tokens)`` over updates and ranks."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, summed: torch.Tensor, tokens: torch.Tensor) -> None:
        """Add one batch: its summed loss (0-d) and its supervised-token count (0-d)."""
        self.total += summed.detach().float().to(self.total.device)
        self.tokens += tokens.detach().float().to(self.tokens.device)

    def compute(self) -> torch.Tensor:
        """The mean; 0 when no token was supervised (e.g. only padding batches)."""
        return self.total / self.tokens.clamp(min=1.0)
