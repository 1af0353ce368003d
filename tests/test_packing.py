"""Sequence packing: packed rows give every sample exactly its unpacked logits and loss."""

from __future__ import annotations

import functools
import inspect
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tokenizers_fixtures import make_tokenizer
from vlm_lit.data.collate import IGNORE_INDEX, collate_examples
from vlm_lit.data.datamodule import VLMDataModule
from vlm_lit.data.packing import collate_packed, first_fit_decreasing, pack_examples
from vlm_lit.data.shards import write_shards
from vlm_lit.data.tokenize import tokenize_conversation
from vlm_lit.models import VLMModule, build_vlm
from vlm_lit.models.loss import count_supervised, summed_cross_entropy
from vlm_lit.models.packed_attention import (
    block_causal_mask,
    cumulative_lengths,
    packed_lm_kwargs,
    packed_position_ids,
)
from vlm_test_utils import open_flamingo_gates

ATOL = 1e-5
# The connector-kwargs constructor argument (renamed while the module API settled).
_PARAMS = inspect.signature(VLMModule.__init__).parameters
_CONNECTOR_ARG = "connector_kwargs" if "connector_kwargs" in _PARAMS else "connector"

# (content parts of the user turn, answer); "I" = an image part. Sample 3 has text before its
# image: under Flamingo it must not see sample 2's image although that one is earlier in the row.
SPECS: list[tuple[list[str], str]] = [
    (["I", "How many circles?"], "Three."),
    (["Say yes."], "Yes, of course."),
    (["I", "I", "Which image has a red square?"], "The second one, top left."),
    (["Look at this:", "I", "What colour?"], "Blue"),
]
ROWS = [[0, 1], [2, 3]]  # packed layout: two rows of two samples


def _example(module: Any, index: int, seed: int = 0) -> dict[str, Any]:
    parts, answer = SPECS[index]
    content = [{"type": "image"} if p == "I" else {"type": "text", "text": p} for p in parts]
    messages = [
        {"role": "user", "content": content},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]
    ex = tokenize_conversation(messages, module.tokenizer)
    size = module.vision.image_size
    gen = torch.Generator().manual_seed(seed * 7919 + zlib.crc32(answer.encode()))
    ex.update(
        pixel_values=torch.randn(parts.count("I"), 3, size, size, generator=gen),
        key=f"s{index}",
        source="test",
    )
    return ex


@functools.cache
def _tiny(family: str, variant: str = "") -> Any:
    """Built once per (family, variant) for the whole file; the tests never change weights."""
    kwargs: dict[str, Any] = {}
    if variant == "eager":
        kwargs["attn_implementation"] = "eager"
    elif variant == "all_media":
        kwargs[_CONNECTOR_ARG] = {"only_attend_immediate_media": False}
    module = build_vlm(family, size="tiny", **kwargs)
    open_flamingo_gates(module)  # gates at 0 would hide any cross-sample image leak
    return module.eval()


def _run(module: Any, batch: dict[str, Any], packed: bool) -> Any:
    extra = {k: batch[k] for k in ("segment_ids", "position_ids")} if packed else {}
    with torch.no_grad():
        return module.model(
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            batch["image_sample_index"],
            batch["labels"],
            **extra,
        )


def _lm_segments(module: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Segment ids of the sequence the LM saw (after <image> expansion for prefix models)."""
    model = module.model
    if hasattr(model, "expand_segments"):
        is_image = batch["input_ids"] == model.image_token_id
        return model.expand_segments(batch["segment_ids"], is_image, batch["attention_mask"])
    return batch["segment_ids"]


def _packed_per_sample(module: Any, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    rows = [[examples[i] for i in row] for row in ROWS]
    batch = collate_packed(rows, pad_token_id=module.tokenizer.pad_token_id, image_size=32)
    out = _run(module, batch, packed=True)
    segments = _lm_segments(module, batch)
    assert segments.shape == out.logits.shape[:2]
    per_sample = {}
    for r, row in enumerate(ROWS):
        for s, index in enumerate(row, start=1):
            per_sample[f"s{index}"] = out.logits[r][segments[r] == s]  # (T_i', V)
    return per_sample


FAMILY_CASES = [
    ("mlp", ""),
    ("mlp", "eager"),
    ("qformer", ""),
    ("flamingo", ""),
    ("flamingo", "all_media"),
]


@pytest.mark.parametrize(("family", "variant"), FAMILY_CASES)
def test_packed_logits_and_loss_equal_unpacked(family: str, variant: str) -> None:
    module = _tiny(family, variant)
    examples = [_example(module, i) for i in range(len(SPECS))]
    packed = _packed_per_sample(module, examples)
    rows = [[examples[i] for i in row] for row in ROWS]
    batch = collate_packed(rows, pad_token_id=module.tokenizer.pad_token_id, image_size=32)
    out = _run(module, batch, packed=True)
    summed_alone, count_alone = 0.0, 0
    for ex in examples:
        alone = collate_examples([ex], pad_token_id=module.tokenizer.pad_token_id, image_size=32)
        ref = _run(module, alone, packed=False)
        torch.testing.assert_close(packed[ex["key"]], ref.logits[0], atol=ATOL, rtol=0)
        summed_alone += float(summed_cross_entropy(ref.logits, ref.labels))
        count_alone += int(count_supervised(ref.labels))
    # The loss is the global supervised-token mean: same sum, same count, same mean.
    assert int(count_supervised(out.labels)) == count_alone == int(batch["num_supervised_tokens"])
    summed = float(summed_cross_entropy(out.logits, out.labels))
    assert summed == pytest.approx(summed_alone, abs=1e-4)


@pytest.mark.parametrize("family", ["mlp", "qformer", "flamingo"])
def test_changing_one_sample_leaves_the_others_unchanged(family: str) -> None:
    module = _tiny(family)
    examples = [_example(module, i) for i in range(len(SPECS))]
    before = _packed_per_sample(module, examples)
    # New pixels for samples 0 and 2, and one different text token in sample 2.
    changed = [_example(module, i, seed=1 if i in (0, 2) else 0) for i in range(len(SPECS))]
    ids = changed[2]["input_ids"].clone()
    ids[3] = (ids[3] + 1) % 200
    changed[2]["input_ids"] = ids
    after = _packed_per_sample(module, changed)
    for key in ("s1", "s3"):  # row mates of the changed samples
        torch.testing.assert_close(after[key], before[key], atol=ATOL, rtol=0)
    for key in ("s0", "s2"):
        assert (after[key] - before[key]).abs().max() > 1e-3, f"{key} should have changed"


def _example_with_first_label(length: int, key: str) -> dict[str, Any]:
    ids = torch.arange(5, 5 + length)
    return {"input_ids": ids, "labels": ids.clone(), "key": key, "source": "t"}


def test_collate_packed_layout_and_first_labels_ignored() -> None:
    rows = [
        [_example_with_first_label(3, "a"), _example_with_first_label(2, "b")],
        [_example_with_first_label(4, "c")],
    ]
    batch = collate_packed(rows, pad_token_id=0, image_size=8)
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 2, 2], [1, 1, 1, 1, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    starts = batch["labels"][[0, 0, 1], [0, 3, 0]]
    assert (starts == IGNORE_INDEX).all(), "first label of every segment must be -100"
    assert batch["labels"][0, 4] == 6  # the rest of each sample keeps its labels
    assert batch["labels"][1, 4] == IGNORE_INDEX  # padding
    # 2 + 1 + 3 targets after the shift: the boundary token is not a target
    assert int(batch["num_supervised_tokens"]) == 6
    assert batch["keys"] == ["a", "b", "c"] and batch["sample_row"].tolist() == [0, 0, 1]
    assert torch.equal(packed_position_ids(batch["segment_ids"]), batch["position_ids"])


def test_first_fit_decreasing_respects_length_and_keeps_every_sample() -> None:
    examples = [_example_with_first_label(n, f"k{i}") for i, n in enumerate([7, 3, 5, 2, 6, 1])]
    rows = first_fit_decreasing(examples, max_length=8)
    assert sorted(ex["key"] for row in rows for ex in row) == sorted(e["key"] for e in examples)
    assert all(sum(ex["input_ids"].numel() for ex in row) <= 8 for row in rows)
    assert len(rows) == 3  # 24 tokens need at least 3 rows of 8
    with pytest.raises(ValueError, match="max_length"):
        first_fit_decreasing([_example_with_first_label(9, "long")], max_length=8)
    batches = list(pack_examples(iter(examples), batch_size=2, max_length=8, buffer_size=4))
    assert sorted(ex["key"] for b in batches for row in b for ex in row) == sorted(
        e["key"] for e in examples
    )


def test_block_mask_and_cumulative_lengths() -> None:
    seg = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    mask = block_causal_mask(seg)[:, 0]  # (B, T, T)
    assert mask[0, 3].tolist() == [False, False, True, True, False, False]
    assert mask[0, 5].tolist() == [False] * 5 + [True]  # padding sees only itself
    assert torch.equal(mask[1], torch.ones(6, 6, dtype=torch.bool).tril())
    additive = block_causal_mask(seg, torch.float32)
    assert torch.equal(additive == 0, block_causal_mask(seg))
    cu, longest = cumulative_lengths(seg)
    assert cu.tolist() == [0, 2, 5, 6, 12] and cu.dtype == torch.int32 and longest == 6


def test_flash_implementation_needs_flash_attn_on_cuda_and_others_are_rejected() -> None:
    seg = torch.tensor([[1, 1, 2]])
    pos = packed_position_ids(seg)
    fake = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"))
    with pytest.raises(RuntimeError, match="flash-attn on CUDA"):
        packed_lm_kwargs(fake, seg, pos, torch.float32)  # CPU tensors: never the varlen path
    fake.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="sdpa"):
        packed_lm_kwargs(fake, seg, pos, torch.float32)


def test_transformers_position_id_packing_agrees_with_our_mask() -> None:
    """What transformers 5 does on its own: with attention_mask=None AND use_cache=False it
    infers the segments from position ids that restart at 0; our explicit 4-D mask agrees.
    (With the config's default use_cache=True it creates a cache, skips that inference and
    the segments see each other: why the models pass the mask explicitly.)"""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="sdpa",
    )
    lm = LlamaForCausalLM(config).eval()
    seg = torch.tensor([[1, 1, 1, 2, 2, 3, 3, 3]])
    ids = torch.randint(0, 64, seg.shape)
    pos = packed_position_ids(seg)
    with torch.no_grad():
        ours = lm(input_ids=ids, **packed_lm_kwargs(lm, seg, pos, torch.float32)).logits
        inferred = lm(input_ids=ids, attention_mask=None, position_ids=pos, use_cache=False).logits
        alone = lm(input_ids=ids[:, 3:5]).logits
    torch.testing.assert_close(ours, inferred, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours[:, 3:5], alone, atol=ATOL, rtol=0)


def _chat(i: int, long: bool) -> dict[str, Any]:
    answer = " ".join(f"word{j}" for j in range(12)) if long else f"it is {i}"
    return {
        "key": f"k{i}",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": f"what is {i}"}]},
            {"role": "assistant", "content": answer},
        ],
    }


def _datamodule(path: str, **kwargs: Any) -> VLMDataModule:
    dm = VLMDataModule(train=path, max_length=96, shuffle_buffer=4, **kwargs)
    dm.connect(make_tokenizer("chatml"), image_size=16, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    return dm


def test_datamodule_packed_batches_keep_the_supervised_tokens(tmp_path: Path) -> None:
    samples = [_chat(i, long=i % 4 == 0) for i in range(24)]
    write_shards(samples, tmp_path, max_samples_per_shard=24)
    path = str(tmp_path / "shard-000000.tar")
    plain = _datamodule(path, batch_size=1, epoch_samples=24)
    per_key = {}
    for batch in plain.train_dataloader():
        per_key[batch["keys"][0]] = int(batch["num_supervised_tokens"])
    assert len(per_key) == 24
    packed = _datamodule(path, batch_size=2, epoch_samples=8, packing=True)
    batches = list(packed.train_dataloader())
    assert len(batches) == 4
    seen = []
    for batch in batches:
        seg = batch["segment_ids"]
        assert seg.shape[1] <= 96
        assert int(batch["num_supervised_tokens"]) == sum(per_key[k] for k in batch["keys"])
        starts = torch.ones_like(seg, dtype=torch.bool)
        starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
        assert (batch["labels"][starts & (seg > 0)] == IGNORE_INDEX).all()
        seen += batch["keys"]
    assert len(seen) > 8  # an epoch of 4 packed batches of 2 rows covers more than 8 samples
    with pytest.raises(ValueError, match="group_by_length"):
        VLMDataModule(train=path, packing=True, group_by_length=True)
