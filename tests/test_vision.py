"""Vision towers: local loading, layer selection, and equivalence with reference models."""

from __future__ import annotations

import open_clip
import pytest
import torch
from transformers import AutoConfig, AutoModel

from vlm_lit.models.vision import VISION_BACKENDS, build_vision_tower

OPEN_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 3, "head_width": 32},
    "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
}
HF_CLIP_CFG = {
    "model_type": "clip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}


def _images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32)


def _open_clip_reference(visual: torch.nn.Module, x: torch.Tensor, block: int) -> torch.Tensor:
    """Patch tokens after block ``block`` computed by hand: embed, ln_pre, resblocks."""
    tokens = visual.conv1(x).flatten(2).transpose(1, 2)  # (N, P, D)
    cls = visual.class_embedding.expand(x.shape[0], 1, -1)
    h = visual.ln_pre(torch.cat([cls, tokens], dim=1) + visual.positional_embedding)
    for blk in visual.transformer.resblocks[: block + 1]:
        h = blk(h)
    return h[:, 1:]


def test_open_clip_checkpoint_roundtrip_matches_original(tmp_path) -> None:
    clip = open_clip.CLIP(**OPEN_CLIP_CFG).eval()
    path = tmp_path / "clip.pt"
    torch.save(clip.state_dict(), path)
    tower = build_vision_tower("open_clip", model_cfg=OPEN_CLIP_CFG, pretrained=str(path)).eval()
    x = _images()
    with torch.no_grad():
        feats = tower(x)
        ref = _open_clip_reference(clip.visual, x, block=1)  # -2 of 3 blocks = block index 1
    assert feats.shape == (2, 16, 64)
    torch.testing.assert_close(feats, ref)
    assert (tower.width, tower.num_patches, tower.image_size) == (64, 16, 32)


def test_open_clip_safetensors_and_wrapped_checkpoints(tmp_path) -> None:
    from safetensors.torch import save_file

    clip = open_clip.CLIP(**OPEN_CLIP_CFG).eval()
    st = tmp_path / "visual.safetensors"
    save_file({k: v.contiguous() for k, v in clip.visual.state_dict().items()}, str(st))
    wrapped = tmp_path / "ckpt.pt"  # open_clip training layout: {"state_dict": {"module.…"}}
    torch.save(
        {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in clip.state_dict().items()}},
        wrapped,
    )
    x = _images()
    outs = []
    for path in (st, wrapped):
        tower = build_vision_tower("open_clip", model_cfg=OPEN_CLIP_CFG, pretrained=str(path))
        with torch.no_grad():
            outs.append(tower.eval()(x))
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(outs[0], _open_clip_reference(clip.visual, x, 1).detach())


def test_open_clip_feature_layer_and_cls() -> None:
    torch.manual_seed(1)
    last = build_vision_tower("open_clip", model_cfg=OPEN_CLIP_CFG, feature_layer=-1).eval()
    torch.manual_seed(1)
    penult = build_vision_tower("open_clip", model_cfg=OPEN_CLIP_CFG).eval()
    x = _images(3)
    with torch.no_grad():
        f_last, f_pen = last(x), penult(x)
    assert f_last.shape == f_pen.shape == (3, 16, 64)
    assert not torch.allclose(f_last, f_pen)
    # -2 keeps two of three blocks; blocks after it, ln_post and proj are gone (no dead params)
    assert len(penult.model.transformer.resblocks) == 2 and penult.model.proj is None
    torch.manual_seed(1)
    with_cls = build_vision_tower("open_clip", model_cfg=OPEN_CLIP_CFG, drop_cls=False).eval()
    with torch.no_grad():
        f_cls = with_cls(x)
    assert f_cls.shape == (3, 17, 64) and with_cls.num_patches == 17
    torch.testing.assert_close(f_cls[:, 1:], f_pen)


def test_open_clip_by_name_builds_without_network() -> None:
    tower = build_vision_tower("open_clip", model_name="ViT-B-32")
    assert (tower.width, tower.num_patches, tower.image_size) == (768, 49, 224)


def test_hf_clip_equals_hidden_states_penultimate(tmp_path) -> None:
    cfg = dict(HF_CLIP_CFG)
    ref = AutoModel.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).eval()
    ref.save_pretrained(tmp_path / "clip")
    tower = build_vision_tower("hf", path=str(tmp_path / "clip")).eval()
    x = _images()
    with torch.no_grad():
        expected = ref(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
        feats = tower(x)
    assert feats.shape == (2, 16, 32)
    torch.testing.assert_close(feats, expected)
    assert tower.image_mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)


def test_hf_feature_layer_selection_and_siglip() -> None:
    torch.manual_seed(2)
    last = build_vision_tower("hf", config=HF_CLIP_CFG, feature_layer=-1).eval()
    torch.manual_seed(2)
    penult = build_vision_tower("hf", config=HF_CLIP_CFG, feature_layer=2).eval()  # == -2
    x = _images()
    with torch.no_grad():
        assert not torch.allclose(last(x), penult(x))
    sig_cfg = dict(HF_CLIP_CFG, model_type="siglip_vision_model")
    siglip = build_vision_tower("hf", config=sig_cfg).eval()
    assert siglip(x).shape == (2, 16, 32) and siglip.image_mean == (0.5, 0.5, 0.5)


def test_hf_full_clip_directory_keeps_vision_model(tmp_path) -> None:
    from transformers import CLIPConfig, CLIPModel

    vis = {k: v for k, v in HF_CLIP_CFG.items() if k != "model_type"}
    text = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "vocab_size": 99,
    }
    full = CLIPModel(CLIPConfig(vision_config=vis, text_config=text, projection_dim=16)).eval()
    full.save_pretrained(tmp_path / "full")
    tower = build_vision_tower("hf", path=str(tmp_path / "full")).eval()
    x = _images()
    with torch.no_grad():
        expected = full.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(tower(x), expected[:, 1:])


def test_bad_paths_and_names_fail_clearly(tmp_path) -> None:
    missing = str(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        build_vision_tower("open_clip", model_cfg=OPEN_CLIP_CFG, pretrained=missing)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="garbage.pt"):
        build_vision_tower("open_clip", model_cfg=OPEN_CLIP_CFG, pretrained=str(garbage))
    with pytest.raises(FileNotFoundError, match="nodir"):
        build_vision_tower("hf", path=str(tmp_path / "nodir"))
    with pytest.raises(ValueError, match=r"\['hf', 'open_clip'\]"):
        build_vision_tower("timm")
    with pytest.raises(ValueError, match="feature_layer=5"):
        build_vision_tower("open_clip", model_cfg=OPEN_CLIP_CFG, feature_layer=5)
    assert sorted(VISION_BACKENDS) == ["hf", "open_clip"]


class _Payload:
    """An arbitrary class: a full unpickler would import and build it."""


def test_checkpoint_with_code_is_refused(tmp_path) -> None:
    """A pickled object (not plain tensors) must not be unpickled: weights_only=True."""
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": _Payload()}}, path)
    with pytest.raises(RuntimeError, match="evil.pt"):
        build_vision_tower("open_clip", model_cfg=OPEN_CLIP_CFG, pretrained=str(path))
