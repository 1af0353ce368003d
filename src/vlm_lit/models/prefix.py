"""Prefix-token VLM: each ``<image>`` placeholder is replaced by K connector outputs."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from vlm_lit.models.base import IGNORE_INDEX, BaseVLM, VLMOutput
from vlm_lit.models.packed_attention import packed_lm_kwargs, packed_position_ids


def _cache_kwarg(lm: nn.Module) -> str:
    """transformers >= 5.24 renames ``past_key_values`` to ``cache``; older LMs lack it."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # peft wrapper
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


class PrefixVLM(BaseVLM):
    """Vision tower -> connector -> K visual embeddings spliced into the LM input.

    ``connector`` maps (N, P, D_v) to (N, K, D_lm) and has ``tokens_per_image(P) -> K``.
    Splice layout (see :meth:`splice`): every token keeps its order; an image placeholder
    widens into K positions (label -100, attention 1). Rows get different lengths, so the
    shorter ones are padded: a row that ends with a real token stays flush right (so
    ``logits[:, -1]`` is still the last prompt token under generation's left padding),
    any other row stays flush left (right padding stays at the end).
    """

    def __init__(
        self,
        vision: nn.Module,
        connector: nn.Module,
        language_model: nn.Module,
        image_token_id: int,
    ) -> None:
        super().__init__()
        self.vision = vision
        self.connector = connector
        self.language_model = language_model
        self.image_token_id = int(image_token_id)
        self.tokens_per_image = int(connector.tokens_per_image(vision.num_patches))

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, K, D_lm) visual token embeddings."""
        return self.connector(self.vision(pixel_values))

    def _check_images(
        self, is_image: torch.Tensor, num_images: int, image_sample_index: torch.Tensor | None
    ) -> None:
        per_row = is_image.sum(dim=1)  # (B,)
        if int(per_row.sum()) != num_images:
            raise ValueError(
                f"{int(per_row.sum())} <image> placeholders (per sample: {per_row.tolist()}) "
                f"but {num_images} images in pixel_values; each image needs exactly one "
                f"placeholder token (id {self.image_token_id})"
            )
        if image_sample_index is not None and num_images:
            counts = torch.bincount(image_sample_index.to(per_row.device), minlength=len(per_row))
            if counts.shape != per_row.shape or not torch.equal(counts, per_row):
                raise ValueError(
                    f"image_sample_index gives images per sample {counts.tolist()} but the "
                    f"placeholders per sample are {per_row.tolist()}"
                )

    @staticmethod
    def _layout(
        is_image: torch.Tensor, attention_mask: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, int]:
        """First new position of every token (B, T) and the spliced length T'."""
        widths = 1 + (k - 1) * is_image.long()  # (B, T) positions each token occupies
        ends = widths.cumsum(dim=1)  # (B, T)
        row_len = ends[:, -1]  # (B,)
        new_len = int(row_len.max())
        # Rows ending in a real token are right-aligned (left padding / unpadded rows).
        shift = torch.where(attention_mask[:, -1].bool(), new_len - row_len, 0)  # (B,)
        return ends - widths + shift[:, None], new_len

    def expand_segments(
        self, segment_ids: torch.Tensor, is_image: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Packed rows: the segment id of every spliced position, same layout as :meth:`splice`.

        segment_ids (B, T) (0 = padding) -> (B, T'); an image's K visual tokens take the
        segment of its placeholder, so cumulative lengths and positions are counted after
        expansion.
        """
        k = self.tokens_per_image
        starts, new_len = self._layout(is_image, attention_mask, k)
        out = segment_ids.new_zeros(segment_ids.shape[0], new_len)  # (B, T')
        text_b, text_t = (~is_image).nonzero(as_tuple=True)
        out[text_b, starts[text_b, text_t]] = segment_ids[text_b, text_t]
        img_b, img_t = is_image.nonzero(as_tuple=True)
        if len(img_b):
            img_pos = starts[img_b, img_t][:, None] + torch.arange(k, device=out.device)  # (N, K)
            out[img_b[:, None].expand_as(img_pos), img_pos] = segment_ids[img_b, img_t][:, None]
        return out

    def splice(
        self,
        token_embeds: torch.Tensor,
        is_image: torch.Tensor,
        attention_mask: torch.Tensor,
        visual: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Expand placeholders into visual tokens, by index arithmetic (no per-token loop).

        token_embeds (B, T, D), is_image (B, T) bool, attention_mask (B, T), visual (N, K, D)
        with images in row-major placeholder order, labels (B, T) or None
        -> embeds (B, T', D), attention_mask (B, T'), labels (B, T') or None.
        """
        bsz, _, dim = token_embeds.shape
        k = visual.shape[1] if visual.numel() else self.tokens_per_image
        starts, new_len = self._layout(is_image, attention_mask, k)

        device = token_embeds.device
        embeds = token_embeds.new_zeros(bsz, new_len, dim)  # (B, T', D)
        mask = attention_mask.new_zeros(bsz, new_len)  # (B, T')
        text_b, text_t = (~is_image).nonzero(as_tuple=True)
        text_pos = starts[text_b, text_t]
        embeds[text_b, text_pos] = token_embeds[text_b, text_t]
        mask[text_b, text_pos] = attention_mask[text_b, text_t]
        new_labels = None
        if labels is not None:
            new_labels = labels.new_full((bsz, new_len), IGNORE_INDEX)  # visual tokens: -100
            new_labels[text_b, text_pos] = labels[text_b, text_t]
        img_b, img_t = is_image.nonzero(as_tuple=True)  # row-major = pixel_values order
        if len(img_b):
            img_pos = starts[img_b, img_t][:, None] + torch.arange(k, device=device)  # (N, K)
            rows = img_b[:, None].expand_as(img_pos)
            embeds[rows, img_pos] = visual.to(embeds.dtype)
            mask[rows, img_pos] = 1
        return embeds, mask, new_labels

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
        """See :class:`BaseVLM`. Incremental steps pass the previous output's mask + 1s.

        Packed rows (``segment_ids`` (B, T), 1..n per sample, 0 = padding): the segments are
        expanded with the placeholders and the positions re-derived from them (restarting at 0
        per segment after expansion; the given ``position_ids``, the collate's per-segment
        positions before expansion, are therefore not needed), so every sample attends only
        within itself.
        """
        if segment_ids is not None and past_key_values is not None:
            raise ValueError("packed rows (segment_ids) are for training; decoding takes none")
        token_embeds = self.language_model.get_input_embeddings()(input_ids)  # (B, T, D)
        if past_key_values is None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask {tuple(attention_mask.shape)} must match input_ids "
                    f"{tuple(input_ids.shape)} when past_key_values is None"
                )
            is_image = input_ids == self.image_token_id  # (B, T)
            num_images = 0 if pixel_values is None else pixel_values.shape[0]
            self._check_images(is_image, num_images, image_sample_index)
            visual = (
                self.encode_images(pixel_values)  # (N, K, D)
                if num_images
                else token_embeds.new_zeros(0, self.tokens_per_image, token_embeds.shape[-1])
            )
            inputs_embeds, mask, labels = self.splice(
                token_embeds, is_image, attention_mask, visual, labels
            )
        else:
            # New tokens only; a generated <image> id is embedded as a plain token.
            if pixel_values is not None and pixel_values.shape[0]:
                raise ValueError("incremental decoding (past_key_values given) takes no images")
            inputs_embeds, mask = token_embeds, attention_mask  # mask: cache + new tokens
        if segment_ids is not None:
            segments = self.expand_segments(segment_ids, is_image, attention_mask)  # (B, T')
            lm_kwargs = packed_lm_kwargs(
                self.language_model, segments, packed_position_ids(segments), inputs_embeds.dtype
            )
        else:
            # Positions from the mask: padding (left or right) does not shift real tokens.
            position_ids = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
            position_ids = position_ids[:, -inputs_embeds.shape[1] :]  # (B, T_new)
            lm_kwargs = {"attention_mask": mask, "position_ids": position_ids}
        out = self.language_model(
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **lm_kwargs,
            **{_cache_kwarg(self.language_model): past_key_values},
        )
        cache = out.get("cache", out.get("past_key_values")) if use_cache else None
        return VLMOutput(
            logits=out.logits, labels=labels, attention_mask=mask, past_key_values=cache
        )

    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Named parameters (full dotted names) of ``vision``, ``connector`` and ``lm``."""
        parts = {"vision": "vision", "connector": "connector", "lm": "language_model"}
        return {
            group: [(f"{attr}.{n}", p) for n, p in getattr(self, attr).named_parameters()]
            for group, attr in parts.items()
        }
