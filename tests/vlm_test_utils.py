"""Shared builders for the model-side tests: tiny modules and real tokenized batches."""

from __future__ import annotations

import zlib
from typing import Any

import torch

from vlm_lit.data.collate import collate_examples
from vlm_lit.data.tokenize import tokenize_conversation
from vlm_lit.models import build_vlm
from vlm_lit.models.module import VLMModule

FAMILIES = ("mlp", "qformer", "flamingo")

# (number of images, question, answer): different answer lengths on purpose.
DEFAULT_SPECS: list[tuple[int, str, str]] = [
    (1, "How many circles?", "Three."),
    (2, "Which image has a red square?", "The second one, at the top left of the picture."),
    (0, "Say yes.", "Yes."),
    (1, "What color is the triangle?", "Blue"),
]


def tiny(family: str, **kwargs: Any) -> VLMModule:
    """A tiny module of ``family`` (constructor kwargs pass through)."""
    return build_vlm(family, size="tiny", **kwargs)


def messages_for(n_images: int, question: str, answer: str | None) -> list[dict[str, Any]]:
    """One user turn (images first) and, unless ``answer`` is None, one assistant turn."""
    parts: list[dict[str, Any]] = [{"type": "image"} for _ in range(n_images)]
    parts.append({"type": "text", "text": question})
    msgs: list[dict[str, Any]] = [{"role": "user", "content": parts}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return msgs


def make_batch(
    module: VLMModule,
    specs: list[tuple[int, str, str | None]] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Tokenize ``specs`` with the module's tokenizer and collate them (DataModule layout)."""
    tok = module.tokenizer
    size = module.vision.image_size
    examples = []
    for i, (n, question, answer) in enumerate(specs or DEFAULT_SPECS):
        msgs = messages_for(n, question, answer)
        ex = tokenize_conversation(msgs, tok)
        # Pixels depend on the sample, not its batch position: re-batching keeps the inputs.
        gen = torch.Generator().manual_seed(seed * 100_003 + zlib.crc32(question.encode()))
        ex.update(
            pixel_values=torch.randn(n, 3, size, size, generator=gen),
            key=f"s{i}",
            source="test",
            messages=msgs,
        )
        examples.append(ex)
    return collate_examples(examples, pad_token_id=tok.pad_token_id, image_size=size)


def open_flamingo_gates(module: VLMModule, value: float = 0.5) -> None:
    """Set every Flamingo tanh-gate parameter to ``value`` (no-op for prefix families).

    At init the gates are 0, so the blocks' inner weights get exactly zero gradient; tests
    of gradient flow open them first.
    """
    with torch.no_grad():
        for name, param in module.connector.named_parameters():
            if name.rsplit(".", 1)[-1].startswith("alpha"):
                param.fill_(value)


def perturb_lora(module: VLMModule, scale: float = 0.1) -> None:
    """Make LoRA ``B`` matrices non-zero so ``A`` gets gradient too (B = 0 at init)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
