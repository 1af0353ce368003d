"""Keep every trainable tensor in the graph on text-only batches, so plain DDP works.

On a batch without images the vision tower and the connector never run (Flamingo: the
resampler), so their trainable parameters get no gradient. DDP with
``find_unused_parameters=False`` (the fast default) then fails or hangs: its reducer waits for
gradients that never come, and ranks with and without images disagree on which buckets to
reduce. ``find_unused_parameters=True`` fixes that at the cost of a graph traversal every
step; instead the loss gets ``0 * sum(p.sum())`` over those parameters: exactly zero in value
and gradient, but every rank now produces the same set of gradients.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def image_side_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters of the vision tower and the connector (unused on text-only input)."""
    params: list[nn.Parameter] = []
    for part in ("vision", "connector"):
        module = getattr(model, part, None)
        if module is not None:
            params.extend(p for p in module.parameters() if p.requires_grad)
    return params


def has_images(batch: dict[str, Any]) -> bool:
    """Whether the batch carries at least one image."""
    pixels = batch.get("pixel_values")
    return pixels is not None and int(pixels.shape[0]) > 0


def unused_parameter_anchor(model: nn.Module) -> torch.Tensor | None:
    """``0 * sum(p.sum())`` over :func:`image_side_parameters` (None when there are none)."""
    params = image_side_parameters(model)
    if not params:
        return None
    return torch.stack([p.sum().float() for p in params]).sum() * 0.0
