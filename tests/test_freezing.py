"""Freezing presets: what an optimizer step may change, and that every trainable tensor learns."""

from __future__ import annotations

import pytest
import torch

from vlm_lit.models.freezing import FREEZE_PRESETS, count_parameters
from vlm_lit.models.lora import is_lora_parameter
from vlm_test_utils import FAMILIES, make_batch, open_flamingo_gates, perturb_lora, tiny


def _snapshot(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.model.named_parameters()}


def _step(module, lr: float = 1e-2) -> None:
    """One AdamW step through the module's own optimizer groups (learning rates raised)."""
    module.hparams.max_steps = 10
    optimizer = module.configure_optimizers()["optimizer"]
    for group in optimizer.param_groups:
        group["lr"] = lr
    module.train()
    module(make_batch(module)).loss.backward()
    optimizer.step()


def _changed(before: dict[str, torch.Tensor], module) -> dict[str, torch.Tensor]:
    """name -> boolean mask over rows (dim 0) that changed, for tensors that changed at all."""
    out = {}
    for name, param in module.model.named_parameters():
        diff = param.detach() != before[name]
        if diff.any():
            out[name] = diff.reshape(diff.shape[0], -1).any(1) if diff.ndim else diff
    return out


def _embedding_names(module) -> set[str]:
    lm = module.language_model
    ids = {id(lm.get_input_embeddings().weight), id(lm.get_output_embeddings().weight)}
    return {n for n, p in module.model.named_parameters() if id(p) in ids}


def _only_new_rows(module, name: str, rows: torch.Tensor) -> bool:
    allowed = torch.zeros_like(rows)
    allowed[module.new_token_ids] = True
    return not bool((rows & ~allowed).any())


@pytest.mark.parametrize("family", FAMILIES)
def test_align_updates_only_connector_and_new_rows(family: str) -> None:
    module = tiny(family, freeze="align")
    before = _snapshot(module)
    _step(module)
    changed = _changed(before, module)
    embeddings = _embedding_names(module)
    assert any(n.startswith("connector.") for n in changed)
    for name, rows in changed.items():
        if name in embeddings:
            assert _only_new_rows(module, name, rows), f"{name}: old token rows changed"
        else:
            assert name.startswith("connector."), f"{name} changed under align"
    # the (untied) output row of <image> gets gradient through the softmax, so it moves
    assert any(n in embeddings for n in changed)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_updates_only_connector_adapters_and_new_rows(family: str) -> None:
    module = tiny(family, freeze="lora")
    before = _snapshot(module)
    _step(module)
    changed = _changed(before, module)
    embeddings = _embedding_names(module)
    assert any(is_lora_parameter(n) and n.startswith("language_model.") for n in changed)
    for name, rows in changed.items():
        if name in embeddings:
            assert _only_new_rows(module, name, rows), f"{name}: old token rows changed"
        else:
            assert name.startswith("connector.") or is_lora_parameter(name), name


@pytest.mark.parametrize("family", FAMILIES)
def test_full_updates_the_language_model(family: str) -> None:
    module = tiny(family, freeze="full")
    before = _snapshot(module)
    _step(module)
    changed = _changed(before, module)
    lm_changed = [n for n in changed if n.startswith("language_model.") and "layers" in n]
    assert lm_changed, "no decoder weight changed under full"
    assert not any(n.startswith("vision.") for n in changed)
    embed = next(n for n in _embedding_names(module) if "embed_tokens" in n)
    assert int(changed[embed].sum()) > len(module.new_token_ids)  # old rows train too


CASES = [
    (family, preset, vision_mode)
    for family in FAMILIES
    for preset in sorted(FREEZE_PRESETS)
    for vision_mode in ("frozen",)
] + [("mlp", "align", "full"), ("qformer", "align", "lora"), ("flamingo", "lora", "lora")]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no_ckpt", "ckpt"])
@pytest.mark.parametrize(("family", "preset", "vision_mode"), CASES)
def test_every_trainable_tensor_gets_gradient(
    family: str, preset: str, vision_mode: str, checkpointing: bool
) -> None:
    """Non-zero gradient on every trainable tensor, with and without activation checkpointing.

    Two exceptions by construction, opened here so that the check can be strict:
    Flamingo's gates start at 0 (its block weights then get exactly zero gradient), and
    LoRA's B starts at 0 (A then gets zero gradient). The input-embedding row of ``<image>``
    is never looked up by prefix families (the placeholder is replaced by visual tokens), so
    there the input embedding may have an all-zero gradient.
    """
    module = tiny(
        family,
        freeze=preset,
        vision_mode=vision_mode,
        gradient_checkpointing=checkpointing,
        lora_dropout=0.0,
    )
    open_flamingo_gates(module)
    perturb_lora(module)
    module.train()
    if checkpointing:
        layer = module.language_model.model.layers[0]
        assert layer.gradient_checkpointing and layer.training
    module(make_batch(module)).loss.backward()
    rows = module.model.trainable_rows
    input_embed = next(n for n in _embedding_names(module) if "embed_tokens" in n)
    for name, param in module.model.named_parameters():
        if not param.requires_grad:
            continue
        assert param.grad is not None, f"{name}: no gradient"
        grad = param.grad
        if name in rows:
            old = torch.ones(grad.shape[0], dtype=torch.bool)
            old[rows[name]] = False
            assert not grad[old].any(), f"{name}: frozen rows got gradient"
            if family != "flamingo" and name == input_embed:
                continue
            assert grad[rows[name]].abs().sum() > 0, f"{name}: new rows got no gradient"
        else:
            assert grad.abs().sum() > 0, f"{name}: zero gradient"


def test_flamingo_gates_closed_gives_zero_inner_gradient() -> None:
    """Documents why the test above opens the gates: at alpha=0 only the gates learn."""
    module = tiny("flamingo")
    module.train()
    module(make_batch(module)).loss.backward()
    for name, param in module.connector.named_parameters():
        if "alpha" in name:
            assert param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None or not param.grad.any(), name


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_modes_train_the_vision_tower(family: str) -> None:
    frozen = count_parameters(tiny(family, vision_mode="frozen"))["vision"]
    full = count_parameters(tiny(family, vision_mode="full"))["vision"]
    lora = count_parameters(tiny(family, vision_mode="lora"))["vision"]
    assert frozen[0] == 0 and full[1] == 0 and full[0] == frozen[1]
    assert 0 < lora[0] < full[0]


def test_lora_on_xattn_freezes_block_matrices() -> None:
    module = tiny("flamingo", lora_on_xattn=True)
    xattn = module.connector["xattn"]
    trainable = [n for n, p in xattn.named_parameters() if p.requires_grad]
    assert any(is_lora_parameter(n) for n in trainable)
    assert all(is_lora_parameter(n) or "alpha" in n or "norm" in n for n in trainable)
    resampler = module.connector["resampler"]
    assert all(p.requires_grad for p in resampler.parameters())
    with pytest.raises(ValueError, match="lora_on_xattn"):
        tiny("mlp", lora_on_xattn=True)


def test_lora_target_detection_and_override() -> None:
    module = tiny("mlp", freeze="lora")
    names = {n.split(".")[-4] for n, _ in module.named_parameters() if ".lora_A." in n}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj"}
    custom = tiny("mlp", freeze="lora", lora_target_modules=["gate_proj"])
    names = {n.split(".")[-4] for n, _ in custom.named_parameters() if ".lora_A." in n}
    assert names == {"gate_proj"}
    # the LM stays a transformers causal LM (peft layers injected in place, no wrapper)
    assert type(module.language_model).__name__ == "LlamaForCausalLM"


def test_param_table_script_orders_presets() -> None:
    """experiments/param_table.py: align < lora < full trainable, visual tokens per family."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "experiments" / "param_table.py"
    spec = importlib.util.spec_from_file_location("param_table", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    table = {(f, p): (k, t, fr) for f, p, k, t, fr in script.rows("tiny")}
    for family in FAMILIES:
        align, lora, full = (table[family, p][1] for p in ("align", "lora", "full"))
        assert 0 < align < lora < full
    assert table["mlp", "align"][0] == tiny("mlp").vision.num_patches
    assert table["flamingo", "align"][0] == 1
