"""Batched greedy / nucleus decoding with a KV cache, identical for every VLM family."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from vlm_lit.models.base import IGNORE_INDEX, BaseVLM

Messages = list[dict[str, Any]]
#: End-of-turn tokens of common chat templates, used when the tokenizer has them.
END_OF_TURN_TOKENS: tuple[str, ...] = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokenizer's eos plus its chat template's end-of-turn token(s)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids.update(int(vocab[t]) for t in END_OF_TURN_TOKENS if t in vocab)
    if tokenizer.chat_template:
        # The first special token the template writes right after an assistant's content is
        # what a trained model emits to end its turn, whatever the template calls it.
        marker = "MARKER4242"
        chat = [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}]
        text = tokenizer.apply_chat_template(chat, tokenize=False)
        tail = text.split(marker, 1)[-1] if isinstance(text, str) else ""
        tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
        if tail_ids and tail_ids[0] in set(tokenizer.all_special_ids):
            ids.add(int(tail_ids[0]))
    if not ids:
        raise ValueError(
            f"{type(tokenizer).__name__} has no eos token and no known end-of-turn token; set "
            "tokenizer.eos_token so generation knows where to stop."
        )
    return sorted(ids)


def _prompt_messages(messages: Messages) -> Messages:
    """Drop the trailing assistant turn(s): the model is to write them."""
    kept = list(messages)
    while kept and kept[-1].get("role") == "assistant":
        kept.pop()
    return kept


def _count_images(messages: Messages) -> int:
    return sum(
        1
        for m in messages
        if not isinstance(m.get("content"), str)
        for part in m.get("content") or []
        if part.get("type") == "image"
    )


def _tokenize_prompt(messages: Messages, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    from vlm_lit.data.tokenize import tokenize_conversation

    return tokenize_conversation(messages, tokenizer, add_generation_prompt=True)["input_ids"]


def prompts_from_batch(
    batch: dict[str, Any], tokenizer: PreTrainedTokenizerBase, image_token_id: int
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Per-sample prompt ids (T_i,) + the images they reference, from a DataModule batch.

    Samples with raw ``messages`` are re-tokenized without their last assistant turn and
    with the generation prompt; others (documents) use their ``input_ids`` up to the first
    supervised token. Returns (prompts, pixel_values (N, 3, H, W), image_sample_index (N,)).
    """
    b = batch["input_ids"].shape[0]
    messages = batch.get("messages") or [None] * b
    pixels, owners = batch["pixel_values"], batch["image_sample_index"]
    prompts, keep = [], []
    for row in range(b):
        if messages[row] is not None:
            ids = _tokenize_prompt(_prompt_messages(messages[row]), tokenizer)
        else:
            length = int(batch["attention_mask"][row].sum())
            supervised = (batch["labels"][row, :length] != IGNORE_INDEX).nonzero()
            cut = int(supervised[0]) if len(supervised) else length
            ids = batch["input_ids"][row, : max(cut, 1)]
        available = (owners == row).nonzero().flatten()  # this row's images, in order
        needed = int((ids == image_token_id).sum())
        if needed > len(available):
            raise ValueError(
                f"generate: sample {row} ({batch.get('keys', ['?'] * b)[row]}) has {needed} "
                f"<image> tokens in its prompt but only {len(available)} images in the batch."
            )
        prompts.append(ids)
        keep.append(available[:needed])
    index = torch.cat(keep) if keep else torch.zeros(0, dtype=torch.long)
    return prompts, pixels[index], owners[index]


def prompts_from_raw(
    images: Sequence[Image.Image | Sequence[Image.Image] | None],
    prompts: Sequence[str | Messages],
    tokenizer: PreTrainedTokenizerBase,
    image_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    image_mode: str = "pad",
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Tokenize raw prompts and preprocess their PIL images (resize + normalise).

    A string prompt becomes one user turn with its images first, then the text; a message
    list is used as is and must contain one image part per image.
    """
    from vlm_lit.data.images import ImageTransform

    if len(images) != len(prompts):
        raise ValueError(f"generate: {len(images)} image entries for {len(prompts)} prompts")
    transform = ImageTransform(image_size, image_mean, image_std, mode=image_mode)  # type: ignore[arg-type]
    ids, pixels, owners = [], [], []
    for row, (imgs, prompt) in enumerate(zip(images, prompts, strict=True)):
        imgs = [] if imgs is None else [imgs] if isinstance(imgs, Image.Image) else list(imgs)
        if isinstance(prompt, str):
            parts = [{"type": "image"} for _ in imgs] + [{"type": "text", "text": prompt}]
            prompt = [{"role": "user", "content": parts}]
        elif _count_images(prompt) != len(imgs):
            raise ValueError(
                f"generate: prompt {row} has {_count_images(prompt)} image parts but "
                f"{len(imgs)} images were given; they must match one to one."
            )
        ids.append(_tokenize_prompt(_prompt_messages(prompt), tokenizer))
        pixels.extend(transform(img) for img in imgs)
        owners.extend([row] * len(imgs))
    pv = torch.stack(pixels) if pixels else torch.zeros(0, 3, image_size, image_size)
    return ids, pv, torch.tensor(owners, dtype=torch.long)


def prepare_prompts(
    model: BaseVLM,
    tokenizer: PreTrainedTokenizerBase,
    source: Any,
    prompts: Sequence[str | Messages] | None = None,
    image_mode: str = "pad",
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Dispatch ``generate``'s input: a batch dict, ``(images, prompts)`` or images + prompts."""
    if isinstance(source, dict):
        return prompts_from_batch(source, tokenizer, model.image_token_id)
    if prompts is None:
        if not (isinstance(source, tuple) and len(source) == 2):
            raise TypeError(
                "generate takes a batch dict, an (images, prompts) pair, or images and prompts="
            )
        source, prompts = source
    tower = model.vision
    return prompts_from_raw(
        source,
        prompts,
        tokenizer,
        tower.image_size,
        tower.image_mean,
        tower.image_std,
        image_mode,
    )


def left_pad(prompts: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad 1-D prompts so every row's last token sits at the end: (B, T) ids and mask."""
    longest = max(int(p.numel()) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)  # (B, T)
    for row, p in enumerate(prompts):
        ids[row, longest - p.numel() :] = p
        mask[row, longest - p.numel() :] = 1
    return ids, mask


def _next_token(
    logits: torch.Tensor,
    do_sample: bool,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids: argmax, or a sample from the top-p nucleus."""
    logits = logits.float()
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits / max(temperature, 1e-5), dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def decode_loop(
    model: BaseVLM,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[torch.Tensor],
    pixel_values: torch.Tensor,
    image_sample_index: torch.Tensor,
    *,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> list[str]:
    """Decode up to ``max_new_tokens`` per prompt, stopping rows at eos / end-of-turn.

    The prompt runs once with ``use_cache=True``; each later step feeds only the new token
    with the cached ``past_key_values`` and the family's ``state`` (BaseVLM protocol).
    """
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids, mask = left_pad(prompts, pad_id)
    input_ids, mask = input_ids.to(device), mask.to(device)
    stops = torch.tensor(stop_token_ids(tokenizer), device=device)
    generator = None
    if do_sample and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    pv = pixel_values.to(device) if pixel_values.shape[0] else None
    out = model(
        input_ids,
        mask,
        pv,
        image_sample_index.to(device),
        use_cache=True,
    )
    seen_mask = out.attention_mask if out.attention_mask is not None else mask  # (B, T')
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    generated: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        token = _next_token(out.logits[:, -1], do_sample, temperature, top_p, generator)  # (B,)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        generated.append(token)
        finished |= torch.isin(token, stops)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        seen_mask = torch.cat([seen_mask, seen_mask.new_ones(len(prompts), 1)], dim=1)
        out = model(
            token[:, None],
            seen_mask,
            past_key_values=out.past_key_values,
            state=out.state,
            use_cache=True,
        )
    texts = []
    stop_set = set(stops.tolist())
    for row in range(len(prompts)):
        ids = [int(g[row]) for g in generated]
        cut = next((i for i, t in enumerate(ids) if t in stop_set), len(ids))
        texts.append(tokenizer.decode(ids[:cut], skip_special_tokens=True).strip())
    return texts
