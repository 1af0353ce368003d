"""Language models: local loading, attention choice, added-token rows and their gradients."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from vlm_lit.models import language
from vlm_lit.models.language import (
    add_image_token,
    build_language_model,
    embeddings_tied,
    keep_new_rows_trainable,
    resolve_attn_implementation,
)

WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(61)]  # 64 tokens


def tiny_tokenizer(eos: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in memory (no files, no network)."""
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    special = {"bos_token": "<s>", "eos_token": "</s>"} if eos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", **special)


def tiny_config(tie: bool = False) -> dict:
    return {
        "model_type": "llama",
        "vocab_size": len(WORDS),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "tie_word_embeddings": tie,
    }


def _ids(batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(3, len(WORDS), (batch, length))


def test_save_pretrained_roundtrip_gives_identical_logits(tmp_path) -> None:
    lm, tok = build_language_model(config=tiny_config(), tokenizer=tiny_tokenizer())
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    lm2, tok2 = build_language_model(str(tmp_path / "lm"))
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(lm.eval()(x).logits, lm2.eval()(x).logits)
    assert tok2.pad_token_id == tok.pad_token_id == tok.eos_token_id
    assert lm2.config._attn_implementation == "sdpa"


def test_tokenizer_given_as_path_and_missing_tokenizer_error(tmp_path) -> None:
    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    _, tok = build_language_model(config=tiny_config(), tokenizer=str(tmp_path / "tok"))
    assert len(tok) == len(WORDS)
    with pytest.raises(ValueError, match="tokenizer="):
        build_language_model(config=tiny_config())
    with pytest.raises(FileNotFoundError, match="no_lm"):
        build_language_model(str(tmp_path / "no_lm"))


def test_pad_token_added_when_no_eos_and_row_created() -> None:
    lm, tok = build_language_model(config=tiny_config(), tokenizer=tiny_tokenizer(eos=False))
    assert tok.pad_token == "<pad>" and tok.pad_token_id == len(WORDS)
    assert lm.get_input_embeddings().weight.shape[0] == len(tok)
    assert lm.config.pad_token_id == tok.pad_token_id


def test_trust_remote_code_is_false_by_default(tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm, tok = build_language_model(config=tiny_config(), tokenizer=tiny_tokenizer())
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    with (
        mock.patch.object(
            AutoModelForCausalLM, "from_pretrained", wraps=AutoModelForCausalLM.from_pretrained
        ) as m_lm,
        mock.patch.object(
            AutoTokenizer, "from_pretrained", wraps=AutoTokenizer.from_pretrained
        ) as m_tok,
    ):
        build_language_model(str(tmp_path / "lm"))
    assert m_lm.call_args.kwargs["trust_remote_code"] is False
    assert m_tok.call_args.kwargs["trust_remote_code"] is False


@pytest.mark.parametrize("tie", [False, True])
def test_add_image_token_resizes_and_keeps_old_logits(tie: bool) -> None:
    lm, tok = build_language_model(config=tiny_config(tie), tokenizer=tiny_tokenizer())
    assert embeddings_tied(lm) is tie
    x = _ids()
    with torch.no_grad():
        before = lm.eval()(x).logits
    old_emb = lm.get_input_embeddings().weight.detach().clone()
    new_ids = add_image_token(lm, tok, pad_to_multiple_of=8)
    image_id = tok.convert_tokens_to_ids("<image>")
    assert new_ids == [image_id] == [len(WORDS)]
    emb = lm.get_input_embeddings().weight
    assert emb.shape[0] == 72  # 65 rounded up to a multiple of 8
    assert embeddings_tied(lm) is tie
    torch.testing.assert_close(emb[image_id], old_emb.mean(0))
    with torch.no_grad():
        after = lm(x).logits
    torch.testing.assert_close(after[..., : len(WORDS)], before)
    assert add_image_token(lm, tok) == []  # already there: nothing new


def test_image_token_inside_a_padded_vocab_still_gets_a_fresh_row() -> None:
    """Checkpoints often have more rows than tokens: the new id lands on an existing row."""
    cfg = dict(tiny_config(), vocab_size=80)
    lm, tok = build_language_model(config=cfg, tokenizer=tiny_tokenizer())
    old = lm.get_input_embeddings().weight.detach().clone()
    new_ids = add_image_token(lm, tok)
    assert new_ids == [len(WORDS)]
    weight = lm.get_input_embeddings().weight
    assert weight.shape[0] == 80  # no resize needed
    others = torch.ones(80, dtype=torch.bool)
    others[new_ids] = False
    torch.testing.assert_close(weight[new_ids[0]], old[others].mean(0))
    torch.testing.assert_close(weight[others], old[others])


@pytest.mark.parametrize("tie", [False, True])
def test_keep_new_rows_trainable_zeroes_old_row_grads(tie: bool) -> None:
    lm, tok = build_language_model(config=tiny_config(tie), tokenizer=tiny_tokenizer())
    new_ids = add_image_token(lm, tok)
    lm.requires_grad_(False)
    keep_new_rows_trainable(lm, new_ids)
    keep_new_rows_trainable(lm, new_ids)  # idempotent: the hook is replaced, not stacked
    x = torch.cat([_ids(2, 4), torch.full((2, 1), new_ids[0]), _ids(2, 3)], dim=1)
    lm(x).logits.float().pow(2).mean().backward()
    weights = [lm.get_input_embeddings().weight]
    if not tie:
        weights.append(lm.get_output_embeddings().weight)
    for w in weights:
        assert w.requires_grad and w.grad is not None
        old = torch.ones(w.shape[0], dtype=torch.bool)
        old[new_ids] = False
        assert torch.count_nonzero(w.grad[old]) == 0
        assert torch.count_nonzero(w.grad[new_ids]) > 0
    trainable = [n for n, p in lm.named_parameters() if p.requires_grad]
    assert len(trainable) == len(weights)


def test_only_new_rows_change_after_an_optimizer_step() -> None:
    lm, tok = build_language_model(config=tiny_config(), tokenizer=tiny_tokenizer())
    new_ids = add_image_token(lm, tok)
    lm.requires_grad_(False)
    keep_new_rows_trainable(lm, new_ids)
    params = [p for p in lm.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=0.1, weight_decay=0.0)
    x = torch.cat([torch.full((2, 1), new_ids[0]), _ids(2, 5)], dim=1)
    lm(x).logits.float().pow(2).mean().backward()
    opt.step()
    for p, b in zip(params, before, strict=True):
        changed = (p != b).any(dim=1).nonzero().flatten().tolist()
        assert changed == new_ids


def test_attention_resolution_falls_back_without_flash() -> None:
    assert resolve_attn_implementation("sdpa", "cpu") == "sdpa"
    assert resolve_attn_implementation("eager", "cuda") == "eager"
    assert resolve_attn_implementation("auto", "cpu") == "sdpa"
    with pytest.warns(UserWarning, match="flash_attention_2 unavailable"):
        assert resolve_attn_implementation("flash_attention_2", "cpu") == "sdpa"
    with mock.patch.object(language, "FLASH_ATTN_AVAILABLE", True):
        assert resolve_attn_implementation("auto", "cuda") == "flash_attention_2"
        assert resolve_attn_implementation("auto", "cpu") == "sdpa"
    with mock.patch.object(language, "FLASH_ATTN_AVAILABLE", False):
        with pytest.warns(UserWarning, match="not installed"):
            assert resolve_attn_implementation("flash_attention_2", "cuda") == "sdpa"
    with pytest.raises(ValueError, match="flash_attention_2"):
        resolve_attn_implementation("flash", "cpu")  # type: ignore[arg-type]


def test_gradient_checkpointing_with_frozen_embeddings_still_trains_inner_params() -> None:
    lm, _ = build_language_model(
        config=tiny_config(), tokenizer=tiny_tokenizer(), gradient_checkpointing=True
    )
    ckpt = lm.model.layers[0]._gradient_checkpointing_func
    assert lm.model.layers[0].gradient_checkpointing and ckpt.keywords["use_reentrant"] is False
    lm.train()
    lm.requires_grad_(False)
    target = lm.model.layers[0].self_attn.q_proj.weight
    target.requires_grad_(True)
    lm(_ids()).logits.float().pow(2).mean().backward()
    assert target.grad is not None and target.grad.abs().sum() > 0
