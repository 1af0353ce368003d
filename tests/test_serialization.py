"""save_pretrained / from_pretrained, Lightning checkpoints, and refusing pickled weights."""

from __future__ import annotations

import os
import pickle

import lightning as L
import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from vlm_lit.models import VLMModule
from vlm_lit.models.lora import merge_lora
from vlm_lit.models.serialization import WEIGHTS_NAME, from_pretrained
from vlm_test_utils import FAMILIES, make_batch, open_flamingo_gates, perturb_lora, tiny


def _train_a_little(module: VLMModule) -> None:
    """Move every trainable tensor away from its init (connector, adapters, rows, gates)."""
    open_flamingo_gates(module, 0.3)
    perturb_lora(module)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if p.requires_grad and name.startswith("connector."):
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
        emb = module.language_model.get_input_embeddings().weight
        emb[module.new_token_ids] += 0.5


def _logits(module: VLMModule, batch: dict) -> torch.Tensor:
    module.eval()
    with torch.no_grad():
        return module(batch).logits


def _keys(path) -> list[str]:
    with safe_open(str(path / WEIGHTS_NAME), "pt") as f:
        return list(f.keys())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", ["align", "lora"])
def test_round_trip_into_other_seed_gives_identical_logits(family, preset, tmp_path) -> None:
    module = tiny(family, freeze=preset, seed=1)
    _train_a_little(module)
    batch = make_batch(module)
    expected = _logits(module, batch)
    module.save_pretrained(tmp_path)
    fresh = tiny(family, freeze=preset, seed=2)
    assert not torch.allclose(_logits(fresh, batch), expected)  # the test can fail
    loaded = VLMModule.from_pretrained(tmp_path, seed=2)
    assert type(loaded) is type(module) and loaded.hparams.seed == 2
    assert torch.equal(_logits(loaded, batch), expected)
    keys = _keys(tmp_path)
    for key in keys:
        assert key.startswith(("connector.", "__rows__.", "__row_ids__.")) or (
            preset == "lora" and ".lora_" in key
        ), f"{key} should not be exported under {preset}"
    assert any(k.startswith("connector.") for k in keys)
    assert any(k.startswith("__rows__.language_model.") for k in keys)
    if preset == "lora":
        assert any(".lora_A." in k for k in keys) and any(".lora_B." in k for k in keys)


def test_full_lm_and_vision_are_exported_when_trained(tmp_path) -> None:
    module = tiny("mlp", freeze="full", vision_mode="full")
    with torch.no_grad():
        for p in module.model.parameters():
            p.mul_(1.01)
    batch = make_batch(module)
    expected = _logits(module, batch)
    module.save_pretrained(tmp_path)
    keys = _keys(tmp_path)
    assert any(k.startswith("language_model.model.layers.") for k in keys)
    assert any(k.startswith("vision.") for k in keys)
    assert not any(k.startswith("__rows__.") for k in keys)  # whole matrices instead
    assert torch.equal(_logits(from_pretrained(tmp_path, seed=5), batch), expected)


def test_tokenizer_and_config_saved_alongside(tmp_path) -> None:
    module = tiny("qformer", freeze="align", lr_connector=3e-4)
    module.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    assert tok.get_vocab() == module.tokenizer.get_vocab()
    assert tok.chat_template == module.tokenizer.chat_template
    assert from_pretrained(tmp_path).hparams.lr_connector == 3e-4


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['VLM_LIT_PAYLOAD_MARKER']}",))


def test_pickle_payload_in_place_of_weights_is_refused(tmp_path, monkeypatch) -> None:
    module = tiny("mlp")
    module.save_pretrained(tmp_path)
    marker = tmp_path / "pwned"
    monkeypatch.setenv("VLM_LIT_PAYLOAD_MARKER", str(marker))
    with open(tmp_path / WEIGHTS_NAME, "wb") as f:
        pickle.dump({"connector.weight": _Payload()}, f)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        from_pretrained(tmp_path)
    assert not marker.exists()


def test_lightning_checkpoint_rebuilds_with_weights_only(tmp_path) -> None:
    module = tiny("flamingo", freeze="lora", seed=3)
    _train_a_little(module)
    batch = make_batch(module)
    expected = _logits(module, batch)
    trainer = L.Trainer(accelerator="cpu", logger=False, max_steps=0, enable_progress_bar=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    loaded = type(module).load_from_checkpoint(tmp_path / "last.ckpt", weights_only=True)
    assert torch.equal(_logits(loaded, batch), expected)


def test_merge_lora_in_fp32_matches_unmerged() -> None:
    module = tiny("mlp", freeze="lora")
    perturb_lora(module, scale=0.2)
    batch = make_batch(module)
    expected = _logits(module, batch)
    assert merge_lora(module.language_model) > 0
    assert not any(".lora_" in n for n, _ in module.named_parameters())
    assert torch.allclose(_logits(module, batch), expected, atol=1e-5)
