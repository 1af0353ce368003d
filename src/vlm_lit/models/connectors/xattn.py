"""Flamingo's gated cross-attention blocks and their injection into a transformers decoder."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from vlm_lit.models.connectors.perceiver import FeedForward

#: Where the decoder layers sit in transformers causal LMs (Llama/Qwen2/Mistral/Gemma...,
#: OPT, GPT-2/GPT-J, GPT-NeoX, Falcon/Bloom/MPT, multimodal wrappers' language_model).
_DECODER_LAYER_PATHS: tuple[str, ...] = (
    "model.layers",
    "model.decoder.layers",
    "transformer.h",
    "gpt_neox.layers",
    "transformer.blocks",
    "model.language_model.layers",
)


class MaskedCrossAttention(nn.Module):
    """Text tokens attend to the visual latents of the image(s) they are allowed to see."""

    def __init__(self, dim_lm: int, dim_visual: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        inner = heads * dim_head
        self.norm = nn.LayerNorm(dim_lm)
        self.to_q = nn.Linear(dim_lm, inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim_lm, bias=False)

    def forward(self, x: torch.Tensor, media: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """``x`` (B, T, D), ``media`` (B, M*L, D_v), ``allowed`` (B, T, M*L) bool -> (B, T, D).

        Every row of ``allowed`` must have at least one True entry (the caller guarantees it),
        so the boolean mask never produces an all-masked, NaN softmax row.
        """
        b, t, _ = x.shape
        q = self.to_q(self.norm(x)).view(b, t, self.heads, self.dim_head).transpose(1, 2)
        k, v = self.to_kv(media).chunk(2, dim=-1)  # (B, M*L, H*dh) each
        k = k.view(b, -1, self.heads, self.dim_head).transpose(1, 2)  # (B, H, M*L, dh)
        v = v.view(b, -1, self.heads, self.dim_head).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed.unsqueeze(1))
        return self.to_out(out.transpose(1, 2).reshape(b, t, self.heads * self.dim_head))


class GatedCrossAttentionBlock(nn.Module):
    """Flamingo's ``x + tanh(a_attn) * xattn(x)`` then ``x + tanh(a_ff) * ff(x)``.

    ``gate_init=0`` makes the block an exact identity at initialisation (the LM is unchanged);
    ``gated=False`` drops the gates (the paper's "no gate" ablation). Tokens that see no image
    (text before a sample's first image, text-only samples) get exactly zero from BOTH the
    cross-attention and the feed-forward: Flamingo applies the FF to every token, but then a
    trained gate would alter pure text, and text-only samples could no longer match the LM.
    """

    def __init__(
        self,
        dim_lm: int,
        dim_visual: int,
        heads: int = 8,
        dim_head: int = 64,
        ff_mult: int = 4,
        gate_init: float = 0.0,
        gated: bool = True,
        only_attend_immediate_media: bool = True,
    ) -> None:
        super().__init__()
        self.only_attend_immediate_media = only_attend_immediate_media
        self.attn = MaskedCrossAttention(dim_lm, dim_visual, heads, dim_head)
        self.ff = FeedForward(dim_lm, ff_mult)
        if gated:
            self.alpha_attn = nn.Parameter(torch.full((1,), float(gate_init)))
            self.alpha_ff = nn.Parameter(torch.full((1,), float(gate_init)))
        else:
            self.register_parameter("alpha_attn", None)
            self.register_parameter("alpha_ff", None)

    def _gate(self, alpha: nn.Parameter | None, update: torch.Tensor) -> torch.Tensor:
        return update if alpha is None else torch.tanh(alpha).to(update.dtype) * update

    def forward(
        self,
        hidden: torch.Tensor,
        media: torch.Tensor,
        token_media: torch.Tensor,
        media_start: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``hidden`` (B, T, D), ``media`` (B, M, L, D_v), ``token_media`` (B, T) -> (B, T, D).

        ``token_media[b, t]`` is the slot (0..M-1, order of appearance in row b) of the most
        recent image token t has seen, -1 if none. ``media`` slots past a row's image count
        are padding and never attended. ``media_start`` (B, T), for packed rows: the first
        slot of token t's own sample; slots before it belong to other samples and are never
        attended (``token_media`` is already -1 when the latest image is another sample's).
        """
        b, m, length, _ = media.shape
        param_dtype = self.attn.norm.weight.dtype  # norms are never LoRA-wrapped
        x = hidden.to(param_dtype)  # blocks may be fp32 while a frozen LM runs in bf16
        has_media = (token_media >= 0).unsqueeze(-1)  # (B, T, 1)
        key_slot = torch.arange(m, device=media.device).repeat_interleave(length)  # (M*L,)
        seen = token_media.unsqueeze(-1)  # (B, T, 1)
        allowed = key_slot == seen if self.only_attend_immediate_media else key_slot <= seen
        if media_start is not None:
            allowed = allowed & (key_slot >= media_start.unsqueeze(-1))  # own sample only
        # Rows with no visible image may attend anywhere: the softmax stays finite, and the
        # result is replaced by an exact zero below (no -inf row, no 0 * NaN).
        allowed = allowed | ~has_media  # (B, T, M*L)
        flat = media.reshape(b, m * length, -1).to(param_dtype)  # (B, M*L, D_v)
        attn_out = torch.where(has_media, self.attn(x, flat, allowed), 0.0)  # (B, T, D)
        delta = self._gate(self.alpha_attn, attn_out)
        ff_out = torch.where(has_media, self.ff(x + delta), 0.0)  # (B, T, D)
        delta = delta + self._gate(self.alpha_ff, ff_out)
        # Only the (exactly zero on no-media rows) update is cast back, so those rows stay
        # bit-identical to the LM's own hidden states whatever the dtypes and gates.
        return hidden + delta.to(hidden.dtype)


class VisualContext:
    """Per-forward visual inputs shared by all cross-attention hooks of one Flamingo model.

    ``media`` (B, M, L, D), ``token_media`` (B, T) and, for packed rows, ``media_start``
    (B, T) are set by ``FlamingoModel.forward``. While they are set, every hooked decoder
    layer applies its block; when unset the LM runs as the plain LM.
    """

    def __init__(self) -> None:
        self.media: torch.Tensor | None = None
        self.token_media: torch.Tensor | None = None
        self.media_start: torch.Tensor | None = None

    def set(
        self,
        media: torch.Tensor,
        token_media: torch.Tensor,
        media_start: torch.Tensor | None = None,
    ) -> None:
        """Install the visual inputs of the coming LM call."""
        self.media, self.token_media, self.media_start = media, token_media, media_start

    def clear(self) -> None:
        """Drop the visual inputs: hooked layers become the plain LM again."""
        self.media, self.token_media, self.media_start = None, None, None


class CrossAttentionHook:
    """Forward pre-hook replacing a decoder layer's ``hidden_states`` by the block's output.

    A callable object (not a closure) so that ``copy.deepcopy``/pickling of the model maps the
    hook onto the copied block and context.
    """

    def __init__(self, block: GatedCrossAttentionBlock, context: VisualContext) -> None:
        self.block = block
        self.context = context

    def __call__(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        ctx = self.context
        if ctx.media is None or ctx.token_media is None:
            return None
        positional = len(args) > 0
        hidden = args[0] if positional else kwargs.get("hidden_states")
        if not isinstance(hidden, torch.Tensor):
            raise TypeError(
                f"{type(module).__name__} was called without hidden_states as its first "
                "positional argument or `hidden_states=` keyword; Flamingo cannot inject "
                "cross-attention into this decoder layer."
            )
        if hidden.shape[:2] != ctx.token_media.shape:
            raise RuntimeError(
                f"Stale Flamingo visual context: the LM layer got hidden states "
                f"{tuple(hidden.shape[:2])} but the context was set for {tuple(ctx.token_media.shape)}. "
                "Call FlamingoModel.clear_visual_context() before using the language model alone."
            )
        new_hidden = self.block(hidden, ctx.media, ctx.token_media, ctx.media_start)
        if positional:
            return (new_hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new_hidden}


def find_decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """Return the decoder layer list of a transformers causal LM (peft wrappers unwrapped)."""
    root = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    for path in _DECODER_LAYER_PATHS:
        obj: Any = root
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    raise ValueError(
        f"Could not find the decoder layers of {type(root).__name__}: looked for "
        f"{', '.join(_DECODER_LAYER_PATHS)}. Use a supported causal LM family (Llama, Qwen2, "
        "Mistral, GPT-2, OPT, ...) or extend _DECODER_LAYER_PATHS in "
        "vlm_lit/models/connectors/xattn.py."
    )


def attach_cross_attention(
    layers: nn.ModuleList,
    blocks: nn.ModuleList,
    layer_indices: list[int],
    context: VisualContext,
) -> list[RemovableHandle]:
    """Hook ``blocks[i]`` in front of ``layers[layer_indices[i]]``; returns the hook handles."""
    if len(blocks) != len(layer_indices):
        raise ValueError(f"{len(blocks)} blocks for {len(layer_indices)} layer indices")
    handles = []
    for block, index in zip(blocks, layer_indices, strict=True):
        hook = CrossAttentionHook(block, context)
        handles.append(layers[index].register_forward_pre_hook(hook, with_kwargs=True))
    return handles
