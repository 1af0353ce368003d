"""Benchmark models and inputs: sized vlm_lit families, synthetic batches, one training step."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Any

import torch

from vlm_lit.models import VLMModule, build_vlm

#: ``VLMModule``'s connector-kwargs argument (named ``connector_kwargs`` in the module API;
#: looked up so the benchmarks follow a rename).
_PARAMS = inspect.signature(VLMModule.__init__).parameters
CONNECTOR_ARG = "connector_kwargs" if "connector_kwargs" in _PARAMS else "connector"


@dataclass(frozen=True)
class Size:
    """Vision tower, LM and batch sizes of one benchmark configuration."""

    image: int = 64
    patch: int = 8
    v_width: int = 128
    v_layers: int = 3
    v_heads: int = 4
    lm_width: int = 256
    lm_layers: int = 4
    lm_heads: int = 8
    batch: int = 4
    text_len: int = 96  # text tokens per sample (before <image> expansion), incl. the answer
    answer_len: int = 32  # supervised answer tokens at the end of each sample
    queries: int = 32  # Q-Former queries / Perceiver latents

    @property
    def patches(self) -> int:
        return (self.image // self.patch) ** 2


QUICK = Size(
    image=32,
    patch=8,
    v_width=32,
    v_layers=2,
    v_heads=2,
    lm_width=64,
    lm_layers=2,
    lm_heads=4,
    batch=2,
    text_len=24,
    answer_len=8,
    queries=4,
)


def vision_spec(size: Size, feature_layer: int) -> dict[str, Any]:
    """An HF CLIP vision tower spec (random weights), so weights can be copied to Llava."""
    return {
        "backend": "hf",
        "config": {
            "model_type": "clip_vision_model",
            "hidden_size": size.v_width,
            "intermediate_size": 4 * size.v_width,
            "num_hidden_layers": size.v_layers,
            "num_attention_heads": size.v_heads,
            "image_size": size.image,
            "patch_size": size.patch,
        },
        "feature_layer": feature_layer,
    }


def lm_config(size: Size) -> dict[str, Any]:
    """A Llama config (multi-head attention, so Idefics' Llama-like decoder can match it)."""
    return {
        "model_type": "llama",
        "hidden_size": size.lm_width,
        "intermediate_size": int(size.lm_width * 8 / 3) // 8 * 8,
        "num_hidden_layers": size.lm_layers,
        "num_attention_heads": size.lm_heads,
        "num_key_value_heads": size.lm_heads,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-6,
    }


def connector_kwargs(family: str, size: Size) -> dict[str, Any]:
    """Connector sizes matched to the reference classes' configs in step_throughput.py."""
    if family == "qformer":
        return {
            "num_queries": size.queries,
            "hidden_size": size.v_width,
            "num_layers": 2,
            "num_heads": size.v_heads,
            "cross_attention_frequency": 2,
        }
    if family == "flamingo":
        heads = size.lm_heads
        return {
            "num_latents": size.queries,
            "resampler_depth": 2,
            "resampler_heads": heads,
            "xattn_heads": heads,
            "cross_attn_every": 1,
            "ff_mult": 4,
        }
    return {}


#: Which vision block each family reads: LLaVA the penultimate, BLIP-2 / Idefics the last.
FEATURE_LAYER = {"mlp": -2, "qformer": -1, "flamingo": -1}


def build_ours(
    family: str,
    size: Size,
    preset: str = "align",
    connector: dict[str, Any] | None = None,
    **module_kwargs: Any,
) -> VLMModule:
    """A vlm_lit module of ``family`` at ``size`` (tiny in-code tokenizer, random weights);
    ``connector`` overrides connector kwargs, ``module_kwargs`` go to ``VLMModule``."""
    kwargs = {**connector_kwargs(family, size), **(connector or {})}
    return build_vlm(
        family,
        size="tiny",
        vision=vision_spec(size, FEATURE_LAYER[family]),
        language_model={"config": lm_config(size)},
        freeze=preset,
        **{CONNECTOR_ARG: kwargs},
        **module_kwargs,
    )


def synthetic_batch(module: VLMModule, size: Size, seed: int = 0) -> dict[str, Any]:
    """B samples ``<image> prompt answer`` with slightly different lengths (right-padded).

    Position 0 is a text token, then the image placeholder; the last ``answer_len`` tokens of
    each sample are supervised. Token ids avoid the special ids (pad, image).
    """
    gen = torch.Generator().manual_seed(seed)
    image_id = module.model.image_token_id
    pad = module.tokenizer.pad_token_id
    vocab = min(image_id, len(module.tokenizer)) - 1
    lengths = [size.text_len - (i * size.text_len // (4 * size.batch)) for i in range(size.batch)]
    t = max(lengths)
    ids = torch.full((size.batch, t), pad, dtype=torch.long)
    labels = torch.full((size.batch, t), -100, dtype=torch.long)
    mask = torch.zeros(size.batch, t, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(3, vocab, (n,), generator=gen)
        ids[row, 1] = image_id
        labels[row, n - size.answer_len : n] = ids[row, n - size.answer_len : n]
        mask[row, :n] = 1
    pixels = torch.randn(size.batch, 3, size.image, size.image, generator=gen)
    count = (labels[:, 1:] != -100).sum()
    return {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": mask,
        "pixel_values": pixels,
        "image_sample_index": torch.arange(size.batch),
        "num_supervised_tokens": count,
        "step_supervised_tokens": count.clone(),
    }


def to_device(batch: dict[str, Any], device: str) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def vlm_step(
    module: VLMModule, optimizer: torch.optim.Optimizer, batch: dict[str, Any], amp: Any
) -> float:
    """One training step through ``VLMModule``'s own loss: forward, backward, AdamW step."""
    with amp:
        loss = module(batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def scaled(size: Size, **changes: Any) -> Size:
    return replace(size, **changes)
