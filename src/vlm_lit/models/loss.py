"""Token-weighted next-token loss, normalised by the optimizer step's supervised-token count.

Why a global denominator: averaging the loss per micro-batch (or per rank) and then averaging
those means gives every *micro-batch* equal weight, so a micro-batch of short answers counts as
much as one of long answers (transformers PR #34191). We want every supervised *token* of the
optimizer step to weigh the same, wherever it landed.

Derivation. Let ``S_{r,m}`` be the summed cross-entropy of micro-batch ``m`` on rank ``r``, ``A``
the accumulation steps, ``W`` the world size and ``N = sum_{r,m} n_{r,m}`` the step's supervised
tokens over all micro-batches and ranks. The target gradient is ``grad(sum_{r,m} S_{r,m}) / N``.

- Each rank knows its own step count ``N_r = sum_m n_{r,m}`` (``batch["step_supervised_tokens"]``,
  written by the collate); one all-reduce (sum) over ranks gives ``N``.
- Gradient accumulation *sums* micro-batch gradients, so micro-batch loss ``S_{r,m} / N`` adds
  up to ``sum_m S_{r,m} / N`` per rank. (Lightning divides each micro-batch loss by ``A``;
  ``VLMModule.training_step`` multiplies by ``A`` to undo that.)
- DDP *averages* gradients over ranks (divides by ``W``), so each rank multiplies by ``W``:
  ``(1/W) * sum_r W * sum_m S_{r,m} / N = sum_{r,m} S_{r,m} / N``.

Hence ``loss_{r,m} = W * S_{r,m} / N``. Outside training (or without the key), ``N`` is the
batch's own count and ``W = 1``: the plain token mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlm_lit.models.base import IGNORE_INDEX


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Targets for next-token prediction: position ``t`` predicts ``labels[:, t + 1]``.

    Args:
        labels: (B, T) unshifted labels aligned with the logits, -100 = not supervised.

    Returns:
        (B, T - 1) targets for ``logits[:, :-1]``.
    """
    return labels[:, 1:]


def count_supervised(labels: torch.Tensor) -> torch.Tensor:
    """Number of supervised next-token targets, ``(labels[:, 1:] != -100).sum()`` as a 0-d long."""
    return (shifted_targets(labels) != IGNORE_INDEX).sum()


def summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over supervised positions, computed in fp32.

    Args:
        logits: (B, T, V) in any dtype (bf16 logits are upcast: a bf16 log-softmax over a large
            vocabulary loses the small probabilities that the loss is made of).
        labels: (B, T) aligned with ``logits``, unshifted.

    Returns:
        0-d fp32 tensor with a graph to ``logits``; exactly 0 (not NaN) when nothing is supervised.
    """
    targets = shifted_targets(labels)  # (B, T-1)
    if not bool((targets != IGNORE_INDEX).any()):
        # cross_entropy(reduction="sum") over zero targets is fine, but "mean" would be NaN;
        # make the zero explicit and keep a graph so backward() and DDP still run.
        return logits.float().sum() * 0.0
    pred = logits[:, :-1].float()  # (B, T-1, V)
    return F.cross_entropy(
        pred.reshape(-1, pred.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def token_weighted_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    denominator: torch.Tensor | int | None = None,
    world_size: int = 1,
) -> torch.Tensor:
    """``world_size * summed_cross_entropy / denominator`` (see the module docstring).

    Args:
        logits: (B, T, V) aligned with ``labels``.
        labels: (B, T) unshifted, -100 = not supervised.
        denominator: supervised tokens of the whole optimizer step over all ranks; ``None``
            uses this batch's own count (plain token mean).
        world_size: number of data-parallel ranks whose gradients are averaged.

    Returns:
        0-d fp32 loss with a graph; 0 when the batch (or the whole step) has no supervised token.
    """
    summed = summed_cross_entropy(logits, labels)
    if denominator is None:
        denominator = count_supervised(labels)
    denom = torch.as_tensor(denominator, device=summed.device).to(torch.float32).clamp(min=1.0)
    return summed * world_size / denom
