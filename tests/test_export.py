"""Export: transformers Llava round trip, LoRA merge in fp32, refusals, model card, CLI."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open

from vlm_lit.data.images import ImageTransform
from vlm_lit.data.shards import write_shards
from vlm_lit.data.tokenize import tokenize_conversation
from vlm_lit.export import ExportError, check_llava_compatible, export, resolve_source, to_llava
from vlm_lit.export.cli import main
from vlm_lit.models.lora import has_lora
from vlm_lit.models.module import VLMModule
from vlm_test_utils import make_batch, open_flamingo_gates, perturb_lora, tiny

VISION_CONFIGS: dict[str, dict[str, Any]] = {
    "clip": {"model_type": "clip_vision_model"},
    "siglip": {"model_type": "siglip_vision_model"},
}
TINY_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}


def hf_mlp(kind: str = "clip", drop_cls: bool = True, **kwargs: Any) -> VLMModule:
    """Tiny mlp model with a 3-block transformers tower read at its penultimate block."""
    config = {**VISION_CONFIGS[kind], **TINY_VISION}
    vision = {"backend": "hf", "config": config, "feature_layer": -2, "drop_cls": drop_cls}
    return tiny("mlp", vision=vision, **kwargs)


def save_run(module: VLMModule, run_dir: Path, metrics: dict[str, float] | None = None) -> Path:
    """A run directory as the fit CLI writes it (model/, metrics.json, config.yaml)."""
    module.save_pretrained(run_dir / "model")
    (run_dir / "metrics.json").write_text(json.dumps(metrics or {"val/acc": 0.5}))
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"data": {"image_mode": "pad"}}))
    return run_dir


def square_image(side: int = 32, seed: int = 0) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, (side, side, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def collapse_image_tokens(ids: torch.Tensor, image_id: int) -> torch.Tensor:
    """(T',) Llava ids with K copies per image -> (T,) with one placeholder per image."""
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[1:] = ~((ids[1:] == image_id) & (ids[:-1] == image_id))
    return ids[keep]


def user_turn(question: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def llava_inputs(processor: Any, tokenizer: Any, image: Image.Image, question: str) -> Any:
    messages = user_turn(question)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(images=[image], text=text, return_tensors="pt")


@pytest.mark.parametrize(
    ("kind", "drop_cls", "strategy"),
    [("clip", True, "default"), ("clip", False, "full"), ("siglip", True, "full")],
)
def test_llava_round_trip_logits(tmp_path: Path, kind: str, drop_cls: bool, strategy: str) -> None:
    from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

    module = hf_mlp(kind, drop_cls).eval()
    run = save_run(module, tmp_path / "run")
    out = export(run, tmp_path / "llava", format="hf-llava", log=lambda _: None)
    llava = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    k = module.model.tokens_per_image
    assert llava.config.vision_feature_select_strategy == strategy
    assert llava.config.image_seq_length == k == 16 + (0 if drop_cls or kind == "siglip" else 1)
    assert llava.config.image_token_id == module.model.image_token_id
    inputs = llava_inputs(processor, tokenizer, square_image(), "How many circles?")
    ids = inputs["input_ids"][0]
    assert int((ids == module.model.image_token_id).sum()) == k  # the processor expanded it
    pixels = inputs["pixel_values"]  # (1, 3, 32, 32)
    expected_pixels = ImageTransform(32, module.vision.image_mean, module.vision.image_std)
    assert torch.allclose(pixels[0], expected_pixels(square_image()), atol=1e-5)
    ours_ids = collapse_image_tokens(ids, module.model.image_token_id)[None]
    prompt = tokenize_conversation(
        user_turn("How many circles?"), module.tokenizer, add_generation_prompt=True
    )["input_ids"]
    assert torch.equal(ours_ids[0], prompt)  # the exported template renders as vlm_lit trains
    with torch.no_grad():
        ours = module.model(ours_ids, torch.ones_like(ours_ids), pixels).logits  # (1, T', V)
        theirs = llava(**inputs).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() <= 1e-4


def test_llava_generate_matches_vlm_lit(tmp_path: Path) -> None:
    from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

    module = hf_mlp("clip").eval()
    out = export(save_run(module, tmp_path / "run"), tmp_path / "x", format="hf-llava", log=print)
    llava = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor, tokenizer = AutoProcessor.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    for seed, question in [(0, "How many circles?"), (1, "What color is the triangle?")]:
        image = square_image(seed=seed)
        ours = module.generate([image], [user_turn(question)], max_new_tokens=6)[0]
        inputs = llava_inputs(processor, tokenizer, image, question)
        new = llava.generate(**inputs, max_new_tokens=6, do_sample=False)
        prompt_len = inputs["input_ids"].shape[1]
        assert tokenizer.decode(new[0, prompt_len:], skip_special_tokens=True) == ours


def test_llava_export_of_lora_open_clip_model(tmp_path: Path) -> None:
    """The default tiny tower is open_clip: converted to HF CLIP; LoRA merged on the way."""
    from transformers import LlavaForConditionalGeneration

    module = tiny("mlp", freeze="lora", vision_mode="lora").eval()
    perturb_lora(module)
    out = export(save_run(module, tmp_path / "run"), tmp_path / "x", format="hf-llava", log=print)
    llava = LlavaForConditionalGeneration.from_pretrained(out).eval()
    batch = make_batch(module, [(1, "How many circles?", "Three.")])
    k = module.model.tokens_per_image
    image_id = module.model.image_token_id
    ids = torch.cat([t.repeat(k) if t == image_id else t.view(1) for t in batch["input_ids"][0]])
    with torch.no_grad():
        ours = module(batch).logits
        theirs = llava(input_ids=ids[None], pixel_values=batch["pixel_values"]).logits
    assert (ours - theirs).abs().max() <= 1e-4
    assert has_lora(module.model)  # the CLI merged a reloaded copy, not this module


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"connector_kwargs": {"token_reduction": "avgpool", "num_tokens": 4}}, "avgpool"),
        ({"connector_kwargs": {"token_reduction": "pixel_shuffle"}}, "pixel_shuffle"),
        ({"connector_kwargs": {"projector_type": "linear"}}, "a linear projector"),
        ({"connector_kwargs": {"depth": 3}}, "an MLP of depth 3"),
    ],
)
def test_llava_refuses_what_it_cannot_express(kwargs: dict[str, Any], why: str) -> None:
    module = hf_mlp("clip", **kwargs)
    with pytest.raises(ExportError, match=why) as info:
        check_llava_compatible(module)
    assert "--format vlm-lit" in str(info.value)


def test_llava_refuses_other_families_and_unconvertible_open_clip() -> None:
    with pytest.raises(ExportError, match="'mlp' connector family"):
        check_llava_compatible(tiny("qformer"))
    from vlm_lit.models.tiny import tiny_vision

    vision = tiny_vision()
    vision["model_cfg"]["vision_cfg"]["ls_init_value"] = 0.1  # layer scale: no HF CLIP slot
    with pytest.raises(ExportError, match="layer scale.*--format vlm-lit"):
        to_llava(tiny("mlp", vision=vision))


def test_cli_refusal_exits_with_reason_and_writes_nothing(tmp_path: Path, capsys: Any) -> None:
    module = tiny("mlp", connector_kwargs={"token_reduction": "avgpool", "num_tokens": 4})
    run = save_run(module, tmp_path / "run")
    with pytest.raises(SystemExit) as info:
        main([str(run), "--out", str(tmp_path / "out"), "--format", "hf-llava"])
    assert info.value.code == 2
    assert "token_reduction='avgpool'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _lora_module(family: str) -> VLMModule:
    if family == "flamingo":
        module = tiny("flamingo", freeze="lora", lora_on_xattn=True)
        open_flamingo_gates(module)
    else:
        module = tiny("mlp", freeze="lora", vision_mode="lora")
    perturb_lora(module)
    return module.eval()


@pytest.mark.parametrize("family", ["mlp", "flamingo"])
def test_merge_lora_export_equals_unmerged(tmp_path: Path, family: str) -> None:
    module = _lora_module(family)
    batch = make_batch(module)
    with torch.no_grad():
        expected = module(batch).logits
    run = save_run(module, tmp_path / "run")
    main([str(run), "--out", str(tmp_path / "merged"), "--format", "vlm-lit", "--merge-lora"])
    merged = VLMModule.from_pretrained(tmp_path / "merged").eval()
    assert not has_lora(merged.model)
    assert merged.hparams.freeze == "full"
    with torch.no_grad():
        got = merged(batch).logits
    assert (got - expected).abs().max() <= 1e-4
    assert "LoRA merged (fp32)" in (tmp_path / "merged" / "README.md").read_text()


def test_bf16_export_is_merged_in_fp32_then_cast(tmp_path: Path) -> None:
    module = _lora_module("mlp")
    run = save_run(module, tmp_path / "run")
    main([str(run), "--out", str(tmp_path / "fp32"), "--format", "vlm-lit", "--merge-lora"])
    args = ["--format", "vlm-lit", "--merge-lora", "--dtype", "bfloat16"]
    main([str(run), "--out", str(tmp_path / "bf16"), *args])
    name = "language_model.model.layers.0.self_attn.q_proj.weight"
    with safe_open(str(tmp_path / "fp32" / "model.safetensors"), "pt") as f32:
        full = f32.get_tensor(name)
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f16:
        half = f16.get_tensor(name)
    assert half.dtype == torch.bfloat16
    assert torch.equal(half, full.to(torch.bfloat16))  # one rounding, after the fp32 merge
    reloaded = VLMModule.from_pretrained(tmp_path / "bf16")  # loads into the fp32 module
    assert not has_lora(reloaded.model)


def test_model_card_lists_backbones_data_and_metrics(tmp_path: Path) -> None:
    module = tiny("qformer")
    samples = [{"messages": [{"role": "user", "content": f"hi {i}"}]} for i in range(3)]
    shards = write_shards(samples, tmp_path / "shards")
    run = save_run(module, tmp_path / "run", {"val/acc": 0.625, "global_step": 7})
    config = {"data": {"train": [{"name": "chat", "shards": shards}], "batch_size": 4}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    export(run, tmp_path / "out", format="vlm-lit", log=print)
    card = (tmp_path / "out" / "README.md").read_text()
    for needle in (
        "qformer",
        "open_clip",
        "llama",
        "freeze=`align`",
        "| train/chat | 1.0 | 1 | 3 |",
        "| val/acc | 0.625 |",
        "7 optimizer steps at batch size 4",
    ):
        assert needle in card
    reloaded = VLMModule.from_pretrained(tmp_path / "out")  # plain export of a non-LoRA model
    assert reloaded.family == "qformer"


def test_inputs_run_dir_model_dir_and_garbage(tmp_path: Path) -> None:
    run = save_run(tiny("mlp"), tmp_path / "run", {"val/acc": 0.25})
    from_run, from_model = resolve_source(run), resolve_source(run / "model")
    assert from_run.model_dir == from_model.model_dir == run / "model"
    assert from_run.metrics == from_model.metrics == {"val/acc": 0.25}
    with pytest.raises(ExportError, match="neither a run directory"):
        resolve_source(tmp_path)
    with pytest.raises(ExportError, match="exists and is not empty"):
        export(run, run, format="vlm-lit", log=print)


def test_help(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setattr(sys, "argv", ["vlm_lit.export", "--help"])
    with pytest.raises(SystemExit) as info:
        runpy.run_module("vlm_lit.export", run_name="__main__")
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "--format {hf-llava,vlm-lit}" in text and "--merge-lora" in text
