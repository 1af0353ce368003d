"""Vision towers (open_clip, transformers) that return patch features from a chosen layer."""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import torch
from torch import nn

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


def _layers_to_keep(feature_layer: int, num_layers: int, where: str) -> int:
    """Blocks to run so that the last one's output is ``hidden_states[feature_layer]``.

    ``feature_layer`` indexes like transformers' ``hidden_states`` (entry 0 = embeddings,
    entry i = output of block i), so ``-2`` is the second-to-last block, as in LLaVA.
    """
    index = feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer
    if not 1 <= index <= num_layers:
        raise ValueError(
            f"{where}: feature_layer={feature_layer} is outside the {num_layers} blocks; "
            f"use 1..{num_layers} or -{num_layers}..-1 (-2 = penultimate block, LLaVA's choice)"
        )
    return index


def _check_exactly_one(where: str, **options: Any) -> None:
    given = [name for name, value in options.items() if value is not None]
    if len(given) != 1:
        raise ValueError(f"{where}: pass exactly one of {sorted(options)}, got {given or 'none'}")


def _load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a checkpoint safely: safetensors, or ``torch.load(weights_only=True)``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"vision checkpoint not found: {path} (pass a local file)")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with code, wrong format
        raise RuntimeError(f"could not read vision checkpoint {path}: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # open_clip training checkpoints wrap the weights
    if not isinstance(state, dict):
        raise RuntimeError(f"vision checkpoint {path} holds {type(state).__name__}, not a dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("visual.") for k in state):  # a full CLIP model: keep the image tower
        state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    return state


class VisionTower(nn.Module):
    """Common surface: ``forward(pixel_values (N, 3, H, W)) -> (N, P, D_v)`` patch features."""

    width: int
    num_patches: int
    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    feature_layer: int

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


class OpenCLIPVisionTower(VisionTower):
    """The image tower of an open_clip ViT, truncated after ``feature_layer``.

    Features are the block output *before* ``ln_post`` (like HF ``hidden_states``); blocks
    after the feature layer, ``ln_post`` and the projection are dropped because they would
    never receive a gradient (which breaks DDP) and only cost memory.
    """

    def __init__(
        self,
        model_name: str | None = None,
        model_cfg: dict[str, Any] | None = None,
        pretrained: str | None = None,
        feature_layer: int = -2,
        drop_cls: bool = True,
        image_mean: tuple[float, float, float] | None = None,
        image_std: tuple[float, float, float] | None = None,
    ) -> None:
        super().__init__()
        import open_clip
        from open_clip.model import _build_vision_tower
        from open_clip.transformer import VisionTransformer

        _check_exactly_one("open_clip vision tower", model_name=model_name, model_cfg=model_cfg)
        if model_name is not None:
            model_cfg = open_clip.get_model_config(model_name)
            if model_cfg is None:
                raise ValueError(
                    f"unknown open_clip model_name {model_name!r}; valid: {open_clip.list_models()}"
                )
        cfg = copy.deepcopy(model_cfg)
        vision_cfg = dict(cfg["vision_cfg"])
        vision_cfg["patch_dropout"] = 0.0  # dropping patches would change the token count
        # Build only the image tower: the text tower may need an HF download and is unused.
        visual = _build_vision_tower(cfg["embed_dim"], vision_cfg, cfg.get("quick_gelu", False))
        if not isinstance(visual, VisionTransformer):
            raise ValueError(
                f"open_clip tower {model_name or 'model_cfg'} is {type(visual).__name__}; only "
                "ViT towers (VisionTransformer) give patch tokens here"
            )
        if pretrained is not None:
            state = _load_state_dict(pretrained)
            missing, unexpected = visual.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise RuntimeError(
                    f"open_clip checkpoint {pretrained} does not match the architecture: "
                    f"missing {missing[:5]}, unexpected {unexpected[:5]}"
                )
        num_layers = len(visual.transformer.resblocks)
        self._block_index = _layers_to_keep(feature_layer, num_layers, "open_clip") - 1
        visual.prune_intermediate_layers([self._block_index], prune_norm=True, prune_head=True)
        self.model = visual
        self.drop_cls = drop_cls
        self.feature_layer = feature_layer
        height, width = visual.image_size
        if height != width:
            raise ValueError(f"open_clip tower image_size {visual.image_size} must be square")
        self.image_size = int(height)
        self.width = int(visual.transformer.width)
        grid = visual.grid_size
        self.num_patches = grid[0] * grid[1] + (0 if drop_cls else 1)
        # open_clip keeps normalisation with the pretrained *tag*, not the architecture, so
        # a local checkpoint cannot tell us; OpenAI's CLIP statistics are the common default.
        self.image_mean = tuple(image_mean or OPENAI_CLIP_MEAN)
        self.image_std = tuple(image_std or OPENAI_CLIP_STD)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, P, D_v) output of block ``feature_layer`` (CLS dropped)."""
        out = self.model.forward_intermediates(
            pixel_values.to(self.dtype),
            indices=[self._block_index],
            stop_early=True,
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=not self.drop_cls,
        )
        feats = out["image_intermediates"][0]  # (N, P, D_v)
        if not self.drop_cls:
            feats = torch.cat([out["image_intermediates_prefix"][0], feats], dim=1)
        return feats


def _hf_image_stats(path: str | None, model_type: str) -> tuple[tuple, tuple]:
    """Normalisation from ``preprocessor_config.json`` when present, else the family's."""
    if path is not None:
        pp = os.path.join(path, "preprocessor_config.json")
        if os.path.isfile(pp):
            with open(pp, encoding="utf-8") as f:
                data = json.load(f)
            if "image_mean" in data and "image_std" in data:
                return tuple(data["image_mean"]), tuple(data["image_std"])
    if model_type.startswith("siglip"):
        return SIGLIP_MEAN, SIGLIP_STD
    return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


class HFVisionTower(VisionTower):
    """A transformers vision encoder (CLIP, SigLIP, ...) truncated after ``feature_layer``.

    ``path`` is a local ``save_pretrained`` directory of a vision model or of a full
    dual-encoder (its ``vision_model`` is kept); ``config`` builds a random one.
    """

    def __init__(
        self,
        path: str | None = None,
        config: dict[str, Any] | None = None,
        feature_layer: int = -2,
        drop_cls: bool = True,
        image_mean: tuple[float, float, float] | None = None,
        image_std: tuple[float, float, float] | None = None,
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        _check_exactly_one("hf vision tower", path=path, config=config)
        if path is not None:
            if not os.path.isdir(path):
                raise FileNotFoundError(f"hf vision model directory not found: {path}")
            try:
                model = AutoModel.from_pretrained(path, trust_remote_code=False)
            except Exception as exc:
                raise RuntimeError(f"could not load hf vision model from {path}: {exc}") from exc
        else:
            cfg = dict(config)
            model = AutoModel.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
        if hasattr(model, "vision_model"):  # full CLIP/SigLIP: keep only the image tower
            model = model.vision_model
        layers = model.encoder.layers
        keep = _layers_to_keep(feature_layer, len(layers), f"hf vision tower {path or ''}")
        # Unused tail: later blocks, the final norm and pooling head never get a gradient.
        model.encoder.layers = layers[:keep]
        model.post_layernorm = nn.Identity()
        if getattr(model, "use_head", False):
            model.use_head = False
            del model.head
        self.model = model
        self.feature_layer = feature_layer
        self.drop_cls = drop_cls
        vcfg = model.config
        self.image_size = int(vcfg.image_size)
        self.width = int(vcfg.hidden_size)
        self._grid_patches = (vcfg.image_size // vcfg.patch_size) ** 2
        has_cls = vcfg.model_type.startswith("clip")  # CLIP prepends CLS; SigLIP has none
        self.num_patches = self._grid_patches + (1 if has_cls and not drop_cls else 0)
        mean, std = _hf_image_stats(path, vcfg.model_type)
        self.image_mean = tuple(image_mean or mean)
        self.image_std = tuple(image_std or std)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, P, D_v): ``hidden_states[feature_layer]`` minus CLS."""
        out = self.model(pixel_values=pixel_values.to(self.dtype), output_hidden_states=True)
        feats = out.hidden_states[-1]  # (N, P(+1), D_v) pre-norm output of the kept last block
        if self.drop_cls:
            feats = feats[:, feats.shape[1] - self._grid_patches :]
        return feats


VISION_BACKENDS: dict[str, type[VisionTower]] = {
    "open_clip": OpenCLIPVisionTower,
    "hf": HFVisionTower,
}


def build_vision_tower(backend: str, **kwargs: Any) -> VisionTower:
    """Build a registered vision tower, e.g. ``build_vision_tower("open_clip", model_name=...)``."""
    if backend not in VISION_BACKENDS:
        raise ValueError(
            f"unknown vision backend {backend!r}; valid names: {sorted(VISION_BACKENDS)}"
        )
    return VISION_BACKENDS[backend](**kwargs)
