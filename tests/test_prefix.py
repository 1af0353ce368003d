"""Prefix VLM: connectors' shapes and the splice of K visual tokens at each placeholder."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vlm_lit.models.base import IGNORE_INDEX
from vlm_lit.models.connectors.mlp import MLPProjector
from vlm_lit.models.connectors.qformer import QFormerConnector
from vlm_lit.models.prefix import PrefixVLM
from vlm_lit.models.vision import build_vision_tower

VOCAB, IMG, PAD, D_LM = 50, 49, 0, 32
VISION_CFG = {
    "model_type": "clip_vision_model",
    "hidden_size": 24,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}


def tiny_lm() -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=D_LM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg).eval()


def make_connector(kind: str) -> torch.nn.Module:
    if kind == "qformer":
        return QFormerConnector(24, D_LM, num_queries=3, hidden_size=32, num_layers=2, num_heads=4)
    return MLPProjector(24, D_LM, 16, token_reduction="avgpool", num_tokens=4)


def make_vlm(kind: str = "mlp") -> PrefixVLM:
    vision = build_vision_tower("hf", config=VISION_CFG)
    return PrefixVLM(vision, make_connector(kind), tiny_lm(), IMG).eval()


def random_batch(gen: torch.Generator, lengths: list[int], images: list[int], left: bool = False):
    """Padded batch with ``images[b]`` placeholders at random real positions of row b."""
    bsz, t = len(lengths), max(lengths)
    ids = torch.full((bsz, t), PAD)
    mask = torch.zeros(bsz, t, dtype=torch.long)
    labels = torch.full((bsz, t), IGNORE_INDEX)
    for b, (n, k) in enumerate(zip(lengths, images, strict=True)):
        row = torch.randint(1, IMG, (n,), generator=gen)
        row[torch.randperm(n, generator=gen)[:k]] = IMG
        sl = slice(t - n, t) if left else slice(0, n)
        ids[b, sl], mask[b, sl] = row, 1
        labels[b, sl] = torch.where(row == IMG, IGNORE_INDEX, row)
    pixel = torch.randn(sum(images), 3, 32, 32, generator=gen)
    index = torch.repeat_interleave(torch.arange(bsz), torch.tensor(images))
    return ids, mask, labels, pixel, index


def naive_splice(embeds, ids, mask, labels, visual):
    """Per-sample, per-token reference of the documented layout."""
    rows, img = [], 0
    for b in range(ids.shape[0]):
        e, m, lab = [], [], []
        for t in range(ids.shape[1]):
            if ids[b, t] == IMG:
                e += list(visual[img])
                m += [1] * visual.shape[1]
                lab += [IGNORE_INDEX] * visual.shape[1]
                img += 1
            else:
                e.append(embeds[b, t])
                m.append(int(mask[b, t]))
                lab.append(int(labels[b, t]))
        rows.append((e, m, lab, bool(mask[b, -1])))
    new_len = max(len(r[0]) for r in rows)
    out_e = torch.zeros(len(rows), new_len, embeds.shape[-1])
    out_m = torch.zeros(len(rows), new_len, dtype=torch.long)
    out_l = torch.full((len(rows), new_len), IGNORE_INDEX)
    for b, (e, m, lab, flush_right) in enumerate(rows):
        sl = slice(new_len - len(e), new_len) if flush_right else slice(0, len(e))
        out_e[b, sl] = torch.stack(e)
        out_m[b, sl] = torch.tensor(m)
        out_l[b, sl] = torch.tensor(lab)
    return out_e, out_m, out_l


@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_splice_matches_naive_reference(seed: int, left: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    vlm = make_vlm()
    ids, mask, labels, _, _ = random_batch(gen, [9, 5, 12, 7], [2, 0, 3, 1], left=left)
    embeds = torch.randn(*ids.shape, D_LM, generator=gen)
    visual = torch.randn(6, 4, D_LM, generator=gen)
    got = vlm.splice(embeds, ids == IMG, mask, visual, labels)
    for g, r in zip(got, naive_splice(embeds, ids, mask, labels, visual), strict=True):
        torch.testing.assert_close(g, r)
    _, new_mask, new_labels = got
    assert new_mask.shape[1] == 12 + 3 * 3  # longest row: 12 tokens, 3 images of K=4
    # labels are -100 exactly on visual tokens; elsewhere the input labels, in order
    for b in range(ids.shape[0]):
        kept = new_labels[b][new_labels[b] != IGNORE_INDEX]
        assert torch.equal(kept, labels[b][labels[b] != IGNORE_INDEX])
        assert int(new_mask[b].sum()) == int(mask[b].sum()) + 3 * int((ids[b] == IMG).sum())


def test_forward_uses_spliced_embeddings_and_mask_positions() -> None:
    gen = torch.Generator().manual_seed(3)
    vlm = make_vlm()
    ids, mask, labels, pixel, index = random_batch(gen, [8, 6, 10], [1, 0, 2])
    with torch.no_grad():
        out = vlm(ids, mask, pixel, index, labels)
        lm = vlm.language_model
        visual = vlm.encode_images(pixel)
        emb, ref_mask, ref_labels = naive_splice(
            lm.get_input_embeddings()(ids), ids, mask, labels, visual
        )
        pos = (ref_mask.cumsum(1) - 1).clamp(min=0)
        ref = lm(inputs_embeds=emb, attention_mask=ref_mask, position_ids=pos).logits
    assert out.logits.shape == (3, 10 + 2 * 3, VOCAB)
    real = ref_mask.bool()
    torch.testing.assert_close(out.logits[real], ref[real])
    assert torch.equal(out.labels, ref_labels) and torch.equal(out.attention_mask, ref_mask)


@pytest.mark.parametrize("kind", ["mlp", "qformer"])
def test_text_only_batch_equals_bare_lm(kind: str) -> None:
    gen = torch.Generator().manual_seed(4)
    vlm = make_vlm(kind)
    ids, mask, labels, pixel, _ = random_batch(gen, [7, 4, 7], [0, 0, 0])
    assert pixel.shape[0] == 0
    with torch.no_grad():
        out = vlm(ids, mask, None, None, labels)
        empty = vlm(ids, mask, pixel, torch.zeros(0, dtype=torch.long), labels)
        bare = vlm.language_model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], bare[real])
    torch.testing.assert_close(empty.logits, out.logits)
    assert torch.equal(out.labels, labels)


def test_left_padded_rows_match_unpadded_single_rows() -> None:
    """Positions come from the mask: left padding does not shift a row's real tokens."""
    gen = torch.Generator().manual_seed(8)
    vlm = make_vlm()
    ids, mask, _, pixel, index = random_batch(gen, [5, 9], [1, 1], left=True)
    with torch.no_grad():
        batched = vlm(ids, mask, pixel, index).logits
        for b in range(2):
            real = mask[b].bool()
            alone = vlm(ids[b : b + 1, real], mask[b : b + 1, real], pixel[b : b + 1]).logits
            torch.testing.assert_close(
                batched[b, -alone.shape[1] :], alone[0], atol=1e-5, rtol=1e-4
            )


def test_image_count_mismatch_names_counts() -> None:
    gen = torch.Generator().manual_seed(5)
    vlm = make_vlm()
    ids, mask, labels, pixel, index = random_batch(gen, [6, 6], [2, 1])
    with pytest.raises(ValueError, match=r"3 <image> placeholders .* but 2 images"):
        vlm(ids, mask, pixel[:2], index[:2], labels)
    with pytest.raises(ValueError, match=r"per sample \[1, 2\] .* \[2, 1\]"):
        vlm(ids, mask, pixel, torch.tensor([0, 1, 1]), labels)


@pytest.mark.parametrize("kind", ["mlp", "qformer"])
def test_incremental_decoding_matches_full_forward(kind: str) -> None:
    gen = torch.Generator().manual_seed(6)
    vlm = make_vlm(kind)
    ids, mask, _, pixel, index = random_batch(gen, [7, 5, 9], [1, 2, 0], left=True)
    new_tok = torch.randint(1, IMG, (3, 1), generator=gen)
    with torch.no_grad():
        first = vlm(ids, mask, pixel, index, use_cache=True)
        step_mask = torch.cat([first.attention_mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
        step = vlm(new_tok, step_mask, past_key_values=first.past_key_values, use_cache=True)
        full = vlm(
            torch.cat([ids, new_tok], 1),
            torch.cat([mask, torch.ones(3, 1).long()], 1),
            pixel,
            index,
        )
    assert step.logits.shape == (3, 1, VOCAB)
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], atol=1e-5, rtol=1e-4)
    # left-padded prompts stay flush right: the last position is the last prompt token
    assert bool(first.attention_mask[:, -1].all())


@pytest.mark.parametrize("kind", ["mlp", "qformer"])
def test_bf16_autocast_forward_backward(kind: str) -> None:
    gen = torch.Generator().manual_seed(7)
    vlm = make_vlm(kind).train()
    ids, mask, labels, pixel, index = random_batch(gen, [6, 8], [1, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vlm(ids, mask, pixel, index, labels)
    out.logits.float().logsumexp(-1).mean().backward()
    grads = [p.grad for _, p in vlm.parameter_groups()["connector"]]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_parameter_groups_cover_the_model() -> None:
    vlm = make_vlm()
    groups = vlm.parameter_groups()
    assert sorted(groups) == ["connector", "lm", "vision"]
    names = [n for g in groups.values() for n, _ in g]
    assert sorted(names) == sorted(n for n, _ in vlm.named_parameters())
    assert all(n.startswith("language_model.") for n, _ in groups["lm"])
    assert vlm.tokens_per_image == 4


@pytest.mark.parametrize("k", [1, 4, 16, 64])
def test_avgpool_to_k_tokens_on_8x8_grid(k: int) -> None:
    proj = MLPProjector(6, 10, 64, token_reduction="avgpool", num_tokens=k)
    feats = torch.randn(2, 64, 6)
    pooled = proj.reduce(feats)
    side, block = int(k**0.5), 8 // int(k**0.5)
    grid = feats.reshape(2, side, block, side, block, 6)  # (N, s, b, s, b, D)
    expected = grid.mean(dim=(2, 4)).reshape(2, k, 6)
    torch.testing.assert_close(pooled, expected)
    assert proj(feats).shape == (2, k, 10) and proj.num_tokens == proj.tokens_per_image(64) == k


def test_pixel_shuffle_merges_2x2_neighbours() -> None:
    proj = MLPProjector(3, 10, 64, token_reduction="pixel_shuffle", shuffle_factor=2)
    feats = torch.randn(2, 64, 3)
    out = proj.reduce(feats)
    assert out.shape == (2, 16, 12) and proj.num_tokens == 16
    grid = feats.reshape(2, 8, 8, 3)
    r, c = 1, 2  # token (1, 2) covers patches rows 2-3, cols 4-5
    expected = torch.cat([grid[:, 2, 4], grid[:, 2, 5], grid[:, 3, 4], grid[:, 3, 5]], dim=-1)
    torch.testing.assert_close(out[:, r * 4 + c], expected)
    assert proj(feats).shape == (2, 16, 10)


def test_projector_variants_and_invalid_settings() -> None:
    linear = MLPProjector(6, 10, 16, projector_type="linear")
    assert len(linear.proj) == 1 and linear(torch.randn(1, 16, 6)).shape == (1, 16, 10)
    mlp3 = MLPProjector(6, 10, 16, depth=3)
    kinds = [type(m).__name__ for m in mlp3.proj]
    assert kinds == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    for bad_k in (8, 100, None):
        with pytest.raises(ValueError, match="num_tokens"):
            MLPProjector(6, 10, 64, token_reduction="avgpool", num_tokens=bad_k)
    with pytest.raises(ValueError, match="shuffle_factor=3"):
        MLPProjector(6, 10, 64, token_reduction="pixel_shuffle", shuffle_factor=3)
    with pytest.raises(ValueError, match="square patch grid"):
        MLPProjector(6, 10, 17, token_reduction="avgpool", num_tokens=4)


def test_qformer_shapes_and_cross_attention_every_second_block() -> None:
    q = QFormerConnector(24, D_LM, hidden_size=64, num_layers=4, num_heads=4).eval()
    assert q.num_tokens == q.tokens_per_image(999) == 32
    assert [blk.has_cross_attention for blk in q.qformer.encoder.layer] == [True, False] * 2
    a, b = torch.randn(2, 16, 24), torch.randn(2, 16, 24)
    with torch.no_grad():
        out_a, out_b = q(a), q(b)
        shifted = q(a * 3.0 + 1.0)  # the LayerNorm on image features removes affine shifts
    assert out_a.shape == (2, 32, D_LM)
    assert not torch.allclose(out_a, out_b)
    torch.testing.assert_close(shifted, out_a, atol=1e-4, rtol=1e-4)
