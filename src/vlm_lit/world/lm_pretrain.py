"""A BPE tokenizer and a tiny causal LM trained on shapes-world text (the default LM)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from vlm_lit.models.tiny import CHATML_TEMPLATE, IM_END, IM_START, PAD_TOKEN

# Two layers of width 128 learn the world's language in about a minute on 2 cores; the
# vocabulary is small because the world's text is.
WORLD_LM_CFG: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}


def train_world_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on ``texts``, with ChatML specials and a ChatML chat template.

    ``<|im_end|>`` is the EOS (end-of-turn) token and ``<|endoftext|>`` pads. ``<image>`` is
    deliberately absent: the LM loader adds it, as it would for any real checkpoint.
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
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token=PAD_TOKEN, padding_side="right"
    )
    hf.chat_template = CHATML_TEMPLATE
    return hf


@dataclass
class LMPretrainResult:
    """The trained LM, its final training loss and how long it took."""

    model: PreTrainedModel
    final_loss: float
    seconds: float


def _pack(token_lists: list[list[int]], block: int) -> torch.Tensor:
    """Concatenate documents and cut into (num_blocks, block) rows (GPT-style packing)."""
    flat = [t for ids in token_lists for t in ids]
    usable = len(flat) // block * block
    return torch.tensor(flat[:usable], dtype=torch.long).view(-1, block)


def pretrain_lm(
    texts: list[str],
    tokenizer: PreTrainedTokenizerFast,
    *,
    config: dict[str, Any] | None = None,
    steps: int = 600,
    batch_size: int = 32,
    block: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> LMPretrainResult:
    """Next-token pretraining on ``texts`` (each ended by EOS), packed into fixed blocks."""
    from transformers import AutoConfig, AutoModelForCausalLM

    start = time.perf_counter()
    cfg = dict(config or WORLD_LM_CFG)
    model_type = cfg.pop("model_type")
    cfg.update(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(model_type, **cfg), attn_implementation="sdpa"
    )
    eos = tokenizer.eos_token_id
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
    data = _pack(ids, block)  # (num_blocks, block)
    if len(data) == 0:
        raise ValueError(f"LM pretraining corpus is shorter than one block of {block} tokens")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        rows = data[torch.randint(len(data), (batch_size,), generator=generator)]  # (B, block)
        loss = model(input_ids=rows, labels=rows).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if progress is not None:
            progress(step, float(loss.detach()))
    model.eval()
    return LMPretrainResult(model, float(loss), time.perf_counter() - start)
