"""Print visual tokens per image and trainable / frozen parameters per family and preset.

Two sizes: the tiny preset, and a real-size configuration (open_clip ViT-L/14-336 + a 7B
Llama) built on ``torch.device("meta")`` from configs only, so no 7B weights are allocated.

    python experiments/param_table.py [--real-only | --tiny-only]
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from vlm_lit.models import CONNECTORS, FREEZE_PRESETS, build_vlm, count_parameters
from vlm_lit.models.tiny import build_tiny_tokenizer

LLAMA_7B: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}
VIT_L_14_336: dict[str, Any] = {"backend": "open_clip", "model_name": "ViT-L-14-336"}
# Connector sizes of the papers: LLaVA-1.5 mlp2x_gelu, BLIP-2 Q-Former (32 queries, 12 layers),
# Flamingo (64 latents, 6-layer resampler, cross-attention every 4th LM layer).
REAL_CONNECTORS: dict[str, dict[str, Any]] = {
    "mlp": {},
    "qformer": {"num_queries": 32, "num_layers": 12, "hidden_size": 768, "num_heads": 12},
    "flamingo": {"num_latents": 64, "resampler_depth": 6, "cross_attn_every": 4},
}


@contextlib.contextmanager
def _meta_nonzero() -> Iterator[None]:
    from torch.fx.experimental import _config

    previous = _config.meta_nonzero_assume_all_nonzero
    _config.meta_nonzero_assume_all_nonzero = True
    try:
        yield
    finally:
        _config.meta_nonzero_assume_all_nonzero = previous


def rows(size: str) -> list[tuple[str, str, int, int, int]]:
    """(family, preset, visual tokens per image, trainable, frozen) for every combination."""
    out = []
    for family in sorted(CONNECTORS):
        for preset in sorted(FREEZE_PRESETS):
            if size == "tiny":
                module = build_vlm(family, size="tiny", freeze=preset)
            else:
                # The tokenizer only has to carry <image>; the vocabulary size comes from the
                # config (the <image> row is counted as one new row inside it).
                lm = {"config": LLAMA_7B, "tokenizer": build_tiny_tokenizer()}
                # Mean-initialising the new row uses boolean indexing, which meta tensors
                # only support when told to assume a shape; values are irrelevant here.
                with torch.device("meta"), _meta_nonzero():
                    module = build_vlm(
                        family,
                        vision=dict(VIT_L_14_336),
                        language_model=lm,
                        connector_kwargs=REAL_CONNECTORS[family],
                        freeze=preset,
                    )
            trainable, frozen = count_parameters(module)["total"]
            out.append((family, preset, module.model.tokens_per_image, trainable, frozen))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--tiny-only", action="store_true")
    group.add_argument("--real-only", action="store_true")
    args = parser.parse_args()
    sizes = ["tiny"] if args.tiny_only else ["real"] if args.real_only else ["tiny", "real"]
    for size in sizes:
        title = "tiny preset" if size == "tiny" else "ViT-L/14-336 + Llama-7B (meta device)"
        print(f"\n## {title}\n")
        print("| family | preset | visual tokens / image | trainable | frozen |")
        print("|---|---|---:|---:|---:|")
        for family, preset, k, t, f in rows(size):
            print(f"| {family} | {preset} | {k} | {t:,} | {f:,} |")


if __name__ == "__main__":
    main()
