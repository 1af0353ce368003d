"""The plain-``nn.Module`` contract every VLM family implements (no Lightning import here)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

IGNORE_INDEX = -100


@dataclass
class VLMOutput:
    """What a plain VLM's ``forward`` returns.

    ``logits`` and ``labels`` are aligned position by position over the sequence the LM
    actually saw: for prefix connectors that is the sequence *after* each ``<image>``
    placeholder was expanded into K visual tokens (their labels are ``-100``); for Flamingo
    it is the input sequence itself. Labels are *unshifted* (``labels[:, t]`` is the target
    of the token at ``t``; the loss shifts by one).
    """

    logits: torch.Tensor  # (B, T', V)
    labels: torch.Tensor | None = None  # (B, T') aligned with logits, -100 = not supervised
    attention_mask: torch.Tensor | None = None  # (B, T') the mask the LM saw (1 = real token)
    past_key_values: Any = None  # the LM's KV cache when ``use_cache=True``
    state: Any = None  # family-specific decoding state (Flamingo: cached visual latents)
    loss: torch.Tensor | None = None  # filled in by VLMModule, never by the plain model


class BaseVLM(nn.Module, ABC):
    """Vision tower -> connector -> causal LM, as one plain module.

    Subclasses set ``vision``, ``connector``, ``language_model`` and ``image_token_id`` and
    implement :meth:`forward`. Loss, freezing, optimisation and generation live elsewhere
    (``VLMModule``, ``generation.py``) so that they are identical across families.

    ``forward`` contract (batch in the DataModule's layout):

    - ``input_ids`` (B, T) long, right-padded; each image is exactly one ``image_token_id``.
    - ``attention_mask`` (B, T), 1 on real tokens.
    - ``pixel_values`` (N, 3, H, W) for all N images of the batch, in order of appearance
      (sample 0's images first), or ``None``/empty when the batch has no image.
    - ``image_sample_index`` (N,) long: the batch row each image belongs to.
    - ``labels`` (B, T) or ``None``.
    - incremental decoding: ``past_key_values`` + ``state`` from the previous output, with
      ``input_ids`` holding only the new tokens (B, 1) and ``attention_mask`` covering the
      cached positions plus the new ones, ``pixel_values=None``.
    """

    vision: nn.Module
    connector: nn.Module
    language_model: nn.Module
    image_token_id: int

    #: visual tokens that one ``<image>`` placeholder occupies in the LM sequence
    #: (prefix families: K; Flamingo: 1, the marker itself).
    tokens_per_image: int = 1

    @abstractmethod
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_sample_index: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        past_key_values: Any = None,
        state: Any = None,
        use_cache: bool = False,
    ) -> VLMOutput:
        """Run the LM over the batch with the images' visual information (see class doc)."""

    @abstractmethod
    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Named parameters per component: keys among ``vision``, ``connector``, ``lm``."""
