"""Flamingo family: Perceiver-resampled images read by zero-gated cross-attention inside the LM."""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import torch
from torch import nn

from vlm_lit.models.base import BaseVLM, VLMOutput
from vlm_lit.models.connectors.perceiver import PerceiverResampler
from vlm_lit.models.connectors.xattn import (
    GatedCrossAttentionBlock,
    VisualContext,
    attach_cross_attention,
    find_decoder_layers,
)
from vlm_lit.models.packed_attention import (
    packed_lm_kwargs,
    packed_position_ids,
    segment_starts,
)


def _cache_kwarg(lm: nn.Module) -> str:
    """Name of the KV-cache argument/output: transformers >= 5.24 says ``cache``."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # peft wrapper
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


class FlamingoState(NamedTuple):
    """Decoding state carried between incremental steps."""

    media: torch.Tensor  # (B, M, L, D) resampled latents per sample, zero-padded slots
    last_media: torch.Tensor  # (B,) slot of each sample's last image, -1 for none


def segment_media(
    is_image: torch.Tensor, segment_ids: torch.Tensor, token_media: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Restrict each token's images to its own packed segment.

    ``is_image`` / ``segment_ids`` / ``token_media`` (B, T) (row-wise image slots as in
    :meth:`FlamingoModel.forward`) -> ``token_media`` with -1 where the latest image belongs
    to an earlier segment, and ``media_start`` (B, T): the first slot of each token's segment
    (the lower bound when a token may see all earlier images of its sample).
    """
    index = torch.arange(segment_ids.shape[1], device=segment_ids.device).expand_as(segment_ids)
    start_index = torch.where(segment_starts(segment_ids), index, 0).cummax(dim=1).values
    before = is_image.long().cumsum(1) - is_image.long()  # (B, T) images strictly before t
    media_start = before.gather(1, start_index)  # (B, T) slots of earlier segments
    return torch.where(token_media >= media_start, token_media, -1), media_start


class FlamingoModel(BaseVLM):
    """Vision tower -> Perceiver resampler -> gated cross-attention hooked into the LM.

    The ``<image>`` token stays in the sequence as the media marker. Token ``t`` of sample
    ``b`` sees the latest image whose placeholder sits at a position ``<= t`` (the placeholder
    itself already sees its own image); with ``only_attend_immediate_media=False`` it sees all
    of its sample's images up to that one. Blocks sit in front of decoder layers
    ``0, every, 2*every, ...`` (``cross_attn_every=1``, every layer, suits tiny LMs; the paper
    uses every 4th layer for its large models). All Flamingo weights live in
    ``connector = ModuleDict(resampler=..., xattn=ModuleList)``; the LM's own modules and
    ``state_dict`` keys are untouched because the blocks run from forward pre-hooks. The
    images of the current call reach those hooks through a shared ``VisualContext``; after a
    grad-enabled training forward it stays set (for checkpoint recomputation) until the next
    forward or :meth:`clear_visual_context`.
    """

    tokens_per_image = 1

    def __init__(
        self,
        vision: nn.Module,
        language_model: nn.Module,
        image_token_id: int,
        *,
        num_latents: int = 64,
        resampler_depth: int = 2,
        resampler_heads: int = 8,
        resampler_dim_head: int | None = None,
        cross_attn_every: int = 1,
        gate_init: float = 0.0,
        gated: bool = True,
        only_attend_immediate_media: bool = True,
        xattn_heads: int = 8,
        xattn_dim_head: int | None = None,
        ff_mult: int = 4,
    ) -> None:
        super().__init__()
        if cross_attn_every < 1:
            raise ValueError(f"cross_attn_every must be >= 1, got {cross_attn_every}")
        dim_vision = getattr(vision, "width", None)
        if not isinstance(dim_vision, int):
            raise ValueError(
                f"Flamingo needs the vision tower's feature width: {type(vision).__name__} "
                "has no integer `width` attribute."
            )
        dim_lm = int(language_model.config.get_text_config().hidden_size)
        self.vision = vision
        self.language_model = language_model
        self.image_token_id = int(image_token_id)
        layers = find_decoder_layers(language_model)
        self.xattn_layer_indices = list(range(0, len(layers), cross_attn_every))
        # Default head size keeps the inner width equal to the LM width (the paper: 64).
        r_head = resampler_dim_head or max(1, dim_lm // resampler_heads)
        x_head = xattn_dim_head or max(1, dim_lm // xattn_heads)
        blocks = nn.ModuleList(
            GatedCrossAttentionBlock(
                dim_lm,
                dim_lm,
                heads=xattn_heads,
                dim_head=x_head,
                ff_mult=ff_mult,
                gate_init=gate_init,
                gated=gated,
                only_attend_immediate_media=only_attend_immediate_media,
            )
            for _ in self.xattn_layer_indices
        )
        resampler = PerceiverResampler(
            dim_vision,
            dim_lm,
            depth=resampler_depth,
            num_latents=num_latents,
            heads=resampler_heads,
            dim_head=r_head,
            ff_mult=ff_mult,
        )
        self.connector = nn.ModuleDict({"resampler": resampler, "xattn": blocks})
        self._context = VisualContext()
        self._hook_handles = attach_cross_attention(
            layers, blocks, self.xattn_layer_indices, self._context
        )

    def clear_visual_context(self) -> None:
        """Forget the last forward's images so ``language_model`` can be called on its own."""
        self._context.clear()

    def _encode_media(
        self, pixel_values: torch.Tensor | None, image_sample_index: torch.Tensor | None, b: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> per-sample padded latents (B, M, L, D) and image counts (B,)."""
        resampler: PerceiverResampler = self.connector["resampler"]
        device, dtype = resampler.latents.device, resampler.latents.dtype
        n = 0 if pixel_values is None else pixel_values.shape[0]
        if n == 0:
            # One all-padding slot: blocks still run (and give exact zeros) on text-only batches.
            empty = torch.zeros(b, 1, resampler.num_latents, resampler.dim, device=device)
            return empty.to(dtype), torch.zeros(b, dtype=torch.long, device=device)
        if image_sample_index is None or image_sample_index.shape != (n,):
            raise ValueError(
                f"FlamingoModel.forward got {n} images but image_sample_index "
                f"{None if image_sample_index is None else tuple(image_sample_index.shape)}; "
                "pass one batch-row index per image (the DataModule's `image_sample_index`)."
            )
        idx = image_sample_index.to(device).long()  # (N,)
        if int(idx.min()) < 0 or int(idx.max()) >= b:
            raise ValueError(
                f"image_sample_index {idx.tolist()} points outside the batch of {b} rows."
            )
        # A frozen tower may run in bf16 while the trainable resampler stays fp32.
        latents = resampler(self.vision(pixel_values).to(dtype))  # (N, L, D)
        counts = torch.bincount(idx, minlength=b)  # (B,)
        # Slot of each image within its sample, in order of appearance.
        one_hot = nn.functional.one_hot(idx, b)  # (N, B)
        slot = (one_hot.cumsum(0) - 1).gather(1, idx[:, None]).squeeze(1)  # (N,)
        media = latents.new_zeros(b, int(counts.max()), *latents.shape[1:])  # (B, M, L, D)
        media = media.index_put((idx, slot), latents)
        return media, counts

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
        segment_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> VLMOutput:
        """See :class:`BaseVLM`. Returns ``state`` = :class:`FlamingoState` for decoding.

        Incremental steps (``state`` given) let every new token see its sample's last image;
        an ``<image>`` token generated there does not start a new image (no pixels exist).
        Packed rows (``segment_ids`` (B, T), 1..n per sample, 0 = padding; ``position_ids``
        restarting at 0 per segment, derived when None): self-attention stays within a
        segment and a token only sees images of its own segment.
        """
        b, t = input_ids.shape
        if segment_ids is not None and (state is not None or past_key_values is not None):
            raise ValueError("packed rows (segment_ids) are for training; decoding takes none")
        media_start = None
        if state is None:
            media, counts = self._encode_media(pixel_values, image_sample_index, b)
            is_image = input_ids == self.image_token_id  # (B, T)
            found = is_image.sum(1)
            if not torch.equal(found.to(counts.device), counts):
                raise ValueError(
                    f"Each image needs exactly one <image> token (id {self.image_token_id}) in "
                    f"its sample: tokens per row {found.tolist()}, images per row "
                    f"{counts.tolist()} (from image_sample_index)."
                )
            token_media = is_image.long().cumsum(1) - 1  # (B, T), -1 before the first image
            last_media = token_media[:, -1]  # (B,)
            if segment_ids is not None:
                token_media, media_start = segment_media(is_image, segment_ids, token_media)
        else:
            if pixel_values is not None and pixel_values.shape[0] > 0:
                raise ValueError(
                    "FlamingoModel: pixel_values were passed together with a decoding `state`; "
                    "images must all be in the prompt forward."
                )
            media, last_media = state
            token_media = last_media[:, None].expand(b, t)  # (B, T)
        if segment_ids is not None:
            if position_ids is None:
                position_ids = packed_position_ids(segment_ids)
            dtype = self.language_model.get_input_embeddings().weight.dtype
            lm_kwargs = packed_lm_kwargs(self.language_model, segment_ids, position_ids, dtype)
        else:
            # Positions follow the real tokens; with a cache the mask also covers the past.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -t:]  # (B, T)
            lm_kwargs = {"attention_mask": attention_mask, "position_ids": position_ids}
        # Kept after a training forward with gradients: activation checkpointing that wraps a
        # layer's __call__ (e.g. FSDP's checkpoint wrapper) re-runs our pre-hooks during
        # backward and needs the same context; the next forward replaces it. Otherwise nothing
        # re-runs, so the context is dropped and the bare LM is usable right away.
        cache_kwarg = _cache_kwarg(self.language_model)
        self._context.set(media, token_media.to(input_ids.device), media_start)
        try:
            out = self.language_model(
                input_ids=input_ids,
                use_cache=use_cache,
                **lm_kwargs,
                **{cache_kwarg: past_key_values},
            )
        finally:
            if not (torch.is_grad_enabled() and self.training):
                self._context.clear()
        return VLMOutput(
            logits=out.logits,
            labels=labels,
            attention_mask=attention_mask,
            past_key_values=getattr(out, cache_kwarg) if use_cache else None,
            state=FlamingoState(media, last_media),
        )

    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Named parameters of ``vision``, ``connector`` (resampler + xattn) and ``lm``."""
        return {
            "vision": [(f"vision.{n}", p) for n, p in self.vision.named_parameters()],
            "connector": [(f"connector.{n}", p) for n, p in self.connector.named_parameters()],
            "lm": [(f"language_model.{n}", p) for n, p in self.language_model.named_parameters()],
        }
