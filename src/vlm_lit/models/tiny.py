"""The tiny preset: a tokenizer built in code and tiny vision / LM / connector configs (no files)."""

from __future__ import annotations

import copy
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
TINY_VOCAB_SIZE = 384

# ChatML, as Qwen2 renders it, plus list-of-parts content (image parts become "<image>") so the
# tiny tokenizer renders the sample schema of API.md without a custom formatter.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# A fixed corpus so BPE training is deterministic and merges cover the shapes world's words;
# byte-level BPE still encodes (and decodes back exactly) any other text.
_CORPUS = [
    "system user assistant You are a helpful assistant.",
    "How many circles are there? How many squares are in the image? There are three.",
    "What color is the triangle? What shape is at the top left? The shape is a square.",
    "Is there a red circle in the image? Yes. No. Answer with one word.",
    "red green blue yellow purple orange black white gray circle square triangle star",
    "top left top right bottom left bottom right center middle above below next to",
    "zero one two three four five six seven eight nine 0 1 2 3 4 5 6 7 8 9",
    "A photo of a small red circle and a large blue square on a white background.",
    "Describe the image. Caption: the picture shows objects of different colors and shapes.",
    "Answer the question using a single word or phrase. Options: A B C D",
]


def build_tiny_tokenizer(vocab_size: int = TINY_VOCAB_SIZE) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer trained in code on a fixed corpus, with ChatML specials.

    ``eos_token`` is ``<|im_end|>`` (the end-of-turn token, so generation stops there) and
    ``pad_token`` is ``<|endoftext|>``. It has no ``<image>`` token: adding it (and the new
    embedding row) is the LM loader's job, exactly as for a real checkpoint.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        padding_side="right",
    )
    hf.chat_template = CHATML_TEMPLATE
    return hf


TINY_VISION: dict[str, Any] = {
    "backend": "open_clip",
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": 32,
            "patch_size": 8,
            "width": 32,
            "layers": 2,
            "head_width": 16,
        },
    },
    "feature_layer": -1,
}

TINY_LM_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "vocab_size": TINY_VOCAB_SIZE,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-6,
}

TINY_CONNECTORS: dict[str, dict[str, Any]] = {
    "mlp": {},
    "qformer": {
        "num_queries": 4,
        "hidden_size": 32,
        "num_layers": 2,
        "num_heads": 2,
        "intermediate_size": 64,
        "cross_attention_frequency": 1,
    },
    "flamingo": {
        "num_latents": 4,
        "resampler_depth": 1,
        "resampler_heads": 2,
        "xattn_heads": 2,
        "cross_attn_every": 1,
        "ff_mult": 2,
    },
}


def tiny_vision() -> dict[str, Any]:
    """The tiny vision spec (32 px, patch 8 -> 16 patches, width 32, 2 layers); a fresh copy."""
    return copy.deepcopy(TINY_VISION)


def tiny_language_model() -> dict[str, Any]:
    """The tiny LM spec (Llama, hidden 64, 2 layers, 4 heads); a fresh copy."""
    return {"config": copy.deepcopy(TINY_LM_CONFIG)}


def tiny_connector(family: str) -> dict[str, Any]:
    """Tiny connector kwargs for ``family`` (a fresh copy; empty when the defaults are tiny)."""
    return copy.deepcopy(TINY_CONNECTORS.get(family, {}))
