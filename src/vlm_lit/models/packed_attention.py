"""Attention inputs for packed rows: per-segment positions, block-diagonal masks, varlen lengths.

A packed row holds several samples back to back; ``segment_ids`` (B, T) numbers them 1..n
per row (0 = padding). Each sample must attend only within itself and restart its positions
at 0, so that its logits equal the ones it gets alone in an unpadded row.

How the LM gets that (transformers 5, checked in ``masking_utils.create_causal_mask``):

- ``sdpa`` / ``eager``: a 4-D mask (B, 1, T, T) is passed through unchanged by
  ``create_causal_mask`` ("already prepared"), so we build it: causal AND same segment.
  SDPA wants a bool mask (True = attend), eager an additive float mask. transformers can
  also infer segments from ``position_ids`` restarting at 0, but only when
  ``attention_mask is None`` AND no cache exists: measured with Llama + SDPA (5.24), the
  default ``use_cache=True`` creates a cache, skips the inference and the segments silently
  attend to each other. The explicit mask does not depend on that.
- ``flash_attention_2/3`` on CUDA with flash-attn installed: no mask; the cumulative sequence
  lengths over the flattened (B*T) tokens go to ``flash_attn_varlen_func`` through
  transformers' ``cu_seq_lens_q/k`` and ``max_length_q/k`` keyword arguments.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch import nn

#: flash-attn is optional (CUDA only); checked without importing it.
FLASH_ATTN_AVAILABLE: bool = importlib.util.find_spec("flash_attn") is not None

#: LM attention implementations that packed rows support.
PACKED_ATTENTION_IMPLEMENTATIONS: tuple[str, ...] = (
    "eager",
    "flash_attention_2",
    "flash_attention_3",
    "sdpa",
)


def segment_starts(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, T) bool, True where a new segment (or a padding run) begins."""
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return starts


def packed_position_ids(segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 at every segment start; 0 on padding. (B, T) -> (B, T)."""
    index = torch.arange(segment_ids.shape[1], device=segment_ids.device).expand_as(segment_ids)
    start_index = torch.where(segment_starts(segment_ids), index, 0).cummax(dim=1).values
    return torch.where(segment_ids > 0, index - start_index, 0)  # (B, T)


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Causal, block-diagonal (B, 1, T, T) mask from ``segment_ids`` (B, T).

    Query ``q`` may see key ``k <= q`` of the same non-zero segment. Padding queries see only
    themselves, so no softmax row is empty (an all-masked row gives NaN in SDPA). Returns a
    bool mask (True = attend) when ``dtype`` is None, else an additive mask of that dtype.
    """
    t = segment_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()  # (T, T)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    real = (segment_ids > 0)[:, :, None]  # (B, T, 1)
    eye = torch.eye(t, dtype=torch.bool, device=segment_ids.device)
    allowed = (same & real & causal) | eye  # (B, T, T)
    allowed = allowed[:, None]  # (B, 1, T, T)
    if dtype is None:
        return allowed
    zero = torch.zeros((), dtype=dtype, device=segment_ids.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def cumulative_lengths(segment_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``cu_seqlens`` (S + 1,) int32 over the flattened (B*T) tokens, and the longest run.

    Every segment and every padding run of every row is one varlen sequence, so the
    boundaries cover all B*T positions (flash-attn's unpadded layout of the whole batch).
    """
    b, t = segment_ids.shape
    starts = segment_starts(segment_ids).flatten().nonzero().squeeze(1)  # (S,)
    end = torch.tensor([b * t], device=segment_ids.device)
    cu = torch.cat([starts, end]).to(torch.int32)  # (S + 1,)
    return cu, int(cu.diff().max())


def _attn_implementation(lm: nn.Module) -> str:
    config = getattr(lm, "config", None)
    impl = getattr(config, "_attn_implementation", None) if config is not None else None
    return str(impl or "eager")


def packed_lm_kwargs(
    lm: nn.Module,
    segment_ids: torch.Tensor,
    position_ids: torch.Tensor,
    dtype: torch.dtype,
) -> dict[str, Any]:
    """Keyword arguments that make ``lm(...)`` attend within packed segments only.

    ``segment_ids`` / ``position_ids`` (B, T) describe the sequence the LM sees (after any
    ``<image>`` expansion); ``dtype`` is the dtype of the LM's hidden states (eager mask).
    """
    impl = _attn_implementation(lm)
    if impl.startswith("flash_attention"):
        if not (FLASH_ATTN_AVAILABLE and segment_ids.is_cuda):
            raise RuntimeError(
                f"packed batches with attn_implementation={impl!r} need flash-attn on CUDA "
                f"(flash-attn installed: {FLASH_ATTN_AVAILABLE}, device: {segment_ids.device}); "
                "use --model.attn_implementation sdpa instead."
            )
        cu, longest = cumulative_lengths(segment_ids)
        return {
            "attention_mask": None,
            "position_ids": position_ids,
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": longest,
            "max_length_k": longest,
        }
    if impl == "sdpa":
        mask = block_causal_mask(segment_ids)
    elif impl == "eager":
        mask = block_causal_mask(segment_ids, dtype)
    else:
        raise ValueError(
            f"packed batches (--data.packing true) do not support the LM attention "
            f"implementation {impl!r}; use one of {sorted(PACKED_ATTENTION_IMPLEMENTATIONS)} "
            "(--model.attn_implementation)."
        )
    return {"attention_mask": mask, "position_ids": position_ids}
