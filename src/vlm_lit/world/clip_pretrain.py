"""Contrastive pretraining of a tiny open_clip model on shapes-world image-caption pairs."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from vlm_lit.data.images import ImageTransform

# 48 px with 16 px patches puts one patch on each cell of the world's 3x3 object grid;
# measured on 2 CPU cores, this tower learns the world within a few minutes (NOTES.md).
WORLD_CLIP_CFG: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 48, "patch_size": 16, "width": 128, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2},
}
# open_clip's default normalisation (OpenAI CLIP statistics), also the tower's default.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ClipPretrainResult:
    """What pretraining produced: the full CLIP state dict and how well it retrieves."""

    state_dict: dict[str, torch.Tensor]
    image_to_text_top1: float  # on held-out pairs, chance = 1 / eval_pairs
    eval_pairs: int
    seconds: float


def _encode_pairs(
    pairs: list[tuple[Image.Image, str]], transform: ImageTransform, tokenizer: Callable
) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([transform(image) for image, _ in pairs])  # (N, 3, H, W)
    texts = tokenizer([caption for _, caption in pairs])  # (N, context_length)
    return images, texts


@torch.no_grad()
def retrieval_top1(model: torch.nn.Module, images: torch.Tensor, texts: torch.Tensor) -> float:
    """Image->text top-1 accuracy among the given pairs (captions may repeat: any match counts)."""
    model.eval()
    img = torch.nn.functional.normalize(model.encode_image(images), dim=-1)  # (N, E)
    txt = torch.nn.functional.normalize(model.encode_text(texts), dim=-1)  # (N, E)
    best = (img @ txt.T).argmax(dim=1)  # (N,)
    same_text = (texts[best] == texts).all(dim=1)
    return float(same_text.float().mean())


def pretrain_clip(
    train_pairs: list[tuple[Image.Image, str]],
    eval_pairs: list[tuple[Image.Image, str]],
    *,
    model_cfg: dict[str, Any] | None = None,
    steps: int = 800,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> ClipPretrainResult:
    """Train an open_clip ``CLIP`` with open_clip's own ``ClipLoss``; return its weights.

    ``progress(step, loss)`` is called after every step (for a progress bar).
    """
    import open_clip
    from open_clip.loss import ClipLoss

    start = time.perf_counter()
    cfg = copy.deepcopy(model_cfg or WORLD_CLIP_CFG)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    tokenizer = open_clip.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
    transform = ImageTransform(cfg["vision_cfg"]["image_size"], CLIP_MEAN, CLIP_STD, mode="resize")
    images, texts = _encode_pairs(train_pairs, transform, tokenizer)
    loss_fn = ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        idx = torch.randint(len(train_pairs), (batch_size,), generator=generator)
        image_features, text_features, logit_scale = model(images[idx], texts[idx])
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():  # as in CLIP: keep the temperature in a sane range
            model.logit_scale.clamp_(0, math.log(100))
        if progress is not None:
            progress(step, float(loss.detach()))
    eval_images, eval_texts = _encode_pairs(eval_pairs, transform, tokenizer)
    top1 = retrieval_top1(model, eval_images, eval_texts)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return ClipPretrainResult(state, top1, len(eval_pairs), time.perf_counter() - start)
