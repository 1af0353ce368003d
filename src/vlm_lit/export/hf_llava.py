"""Export an ``mlp``-family model as a transformers ``LlavaForConditionalGeneration`` + processor.

The mapping, checked against transformers 5's Llava sources:

- vision: our tower is pruned after its feature layer, so the Llava vision config gets
  ``num_hidden_layers`` = the kept blocks and ``vision_feature_layer=-1`` (the last kept
  block's pre-norm ``hidden_states``, exactly what the tower returns). CLS: CLIP with
  ``drop_cls`` -> strategy ``"default"`` (drops index 0); SigLIP (no CLS) or CLIP keeping it
  -> ``"full"``.
- projector: ``MLPProjector`` depth 2 (Linear, GELU(erf), Linear) -> ``linear_1`` / ``gelu`` /
  ``linear_2``. A linear projector, another depth, or a token reduction has no Llava
  equivalent and is refused.
- text: the LM's base model and output head, LoRA merged first (fp32).
- chat template: the tokenizer's own, behind a prelude that joins list-of-parts content as
  vlm_lit's data pipeline does (see ``chat_template.py``).
- ``<image>``: the processor expands one ``<image>`` into ``image_seq_length`` copies (the
  model needs the expanded ids and scatters one visual token into each).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vlm_lit.export.inputs import ExportError

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration

    from vlm_lit.models.module import VLMModule

#: Vision config model types that Llava's ``AutoModel`` builds with a CLS-aware layout we know.
SUPPORTED_VISION_TYPES: tuple[str, ...] = ("clip_vision_model", "siglip_vision_model")


def _hf_vision_model(module: VLMModule) -> torch.nn.Module:
    """The transformers vision model inside the tower (open_clip towers are converted first)."""
    from vlm_lit.models.vision import HFVisionTower, OpenCLIPVisionTower

    tower = module.model.vision
    if isinstance(tower, OpenCLIPVisionTower):
        from vlm_lit.export.open_clip_to_hf import open_clip_to_hf_clip

        return open_clip_to_hf_clip(tower)
    if not isinstance(tower, HFVisionTower):
        raise ExportError(
            f"--format hf-llava: vision tower {type(tower).__name__} has no transformers "
            "equivalent; use --format vlm-lit"
        )
    model_type = tower.model.config.model_type
    if model_type not in SUPPORTED_VISION_TYPES:
        raise ExportError(
            f"--format hf-llava: vision model type {model_type!r} is not one of "
            f"{sorted(SUPPORTED_VISION_TYPES)} (the towers whose feature layout Llava's "
            "vision_feature_select_strategy describes); use --format vlm-lit"
        )
    return tower.model


def check_llava_compatible(module: VLMModule) -> None:
    """Refuse, saying why and what to do, what Llava cannot express exactly."""
    if module.family != "mlp":
        raise ExportError(
            f"--format hf-llava needs the 'mlp' connector family (LLaVA's projector); this is "
            f"{module.family!r}, whose connector has no Llava equivalent. Use --format vlm-lit."
        )
    projector = module.model.connector
    if projector.token_reduction != "none":
        raise ExportError(
            f"--format hf-llava: token_reduction={projector.token_reduction!r} "
            "(--model.connector_kwargs) pools/regroups the patch tokens before the projector; "
            "Llava feeds every patch token straight to its projector and has no such step. "
            "Use --format vlm-lit, or train with token_reduction='none'."
        )
    linears = [m for m in projector.proj if isinstance(m, torch.nn.Linear)]
    if len(linears) != 2 or len(projector.proj) != 3:
        kind = "a linear projector" if len(linears) == 1 else f"an MLP of depth {len(linears)}"
        raise ExportError(
            f"--format hf-llava: the connector is {kind}; Llava's projector is exactly "
            "Linear -> GELU -> Linear (projector_type='mlp', depth=2), so these weights cannot "
            "be placed without changing the function. Use --format vlm-lit."
        )


def select_strategy(module: VLMModule, vision_config: Any) -> tuple[str, int]:
    """Llava's ``vision_feature_select_strategy`` and the processor's extra-token count."""
    has_cls = vision_config.model_type.startswith("clip")
    drop_cls = bool(getattr(module.model.vision, "drop_cls", True))
    strategy = "default" if has_cls and drop_cls else "full"
    return strategy, 1 if has_cls else 0


def llava_config(module: VLMModule, vision_model: torch.nn.Module) -> Any:
    """A ``LlavaConfig`` whose model computes what ``module.model`` computes."""
    from transformers import LlavaConfig

    vision_config = copy.deepcopy(vision_model.config)
    vision_config.num_hidden_layers = len(vision_model.encoder.layers)  # the pruned depth
    if vision_config.model_type.startswith("siglip"):
        vision_config.vision_use_head = False  # the tower never ran the pooling head
    text_config = copy.deepcopy(module.language_model.config)
    text_config.use_cache = True  # training may have switched it off (gradient checkpointing)
    strategy, _ = select_strategy(module, vision_config)
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=int(module.model.image_token_id),
        image_seq_length=int(module.model.tokens_per_image),
        projector_hidden_act="gelu",  # nn.GELU() default = erf GELU = ACT2FN["gelu"]
        vision_feature_select_strategy=strategy,
        vision_feature_layer=-1,  # the last *kept* block = the tower's feature layer
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )


@torch.no_grad()
def to_llava(module: VLMModule) -> LlavaForConditionalGeneration:
    """Build a Llava model holding ``module``'s weights (LoRA must already be merged)."""
    from transformers import LlavaForConditionalGeneration

    from vlm_lit.models.generation import stop_token_ids
    from vlm_lit.models.lora import has_lora

    check_llava_compatible(module)
    if has_lora(module.model):
        raise ExportError("merge LoRA first (vlm_lit.export.merge.merge_module_lora)")
    vision_model = _hf_vision_model(module)
    llava = LlavaForConditionalGeneration(llava_config(module, vision_model)).float().eval()
    missing, unexpected = llava.model.vision_tower.load_state_dict(
        vision_model.state_dict(), strict=False
    )
    # The tower dropped its final norm (Identity) and head: unused by hidden_states.
    missing = [k for k in missing if not k.startswith("post_layernorm.")]
    if missing or unexpected:
        raise ExportError(
            f"--format hf-llava: vision weights do not fit the Llava vision tower: missing "
            f"{missing[:5]}, unexpected {unexpected[:5]}"
        )
    proj = [m for m in module.model.connector.proj if isinstance(m, torch.nn.Linear)]
    llava.model.multi_modal_projector.linear_1.load_state_dict(proj[0].state_dict())
    llava.model.multi_modal_projector.linear_2.load_state_dict(proj[1].state_dict())
    lm = module.language_model
    llava.model.language_model.load_state_dict(lm.base_model.state_dict(), strict=True)
    if llava.config.tie_word_embeddings:
        llava.tie_weights()
    else:
        llava.lm_head.load_state_dict(lm.get_output_embeddings().state_dict())
    llava.generation_config = copy.deepcopy(lm.generation_config)
    # vlm_lit stops at eos *and* the template's end-of-turn token; so must HF generate.
    llava.generation_config.eos_token_id = stop_token_ids(module.tokenizer)
    llava.generation_config.pad_token_id = module.tokenizer.pad_token_id
    return llava


def expand_image_tokens(input_ids: torch.Tensor, image_token_id: int, k: int) -> torch.Tensor:
    """(T,) ids with one placeholder per image -> (T',) ids with ``k`` per image (Llava's input)."""
    parts = [ids.repeat(k) if int(ids) == image_token_id else ids.view(1) for ids in input_ids]
    return torch.cat(parts) if parts else input_ids


@torch.no_grad()
def max_logit_difference(module: VLMModule, llava: LlavaForConditionalGeneration) -> float:
    """Max |logit difference| of vlm_lit vs Llava on one random image and a short prompt."""
    tower = module.model.vision
    image_id = int(module.model.image_token_id)
    text = module.tokenizer("How many circles?", add_special_tokens=False)["input_ids"][:8]
    ids = torch.tensor([image_id, *text], dtype=torch.long)  # (T,)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, tower.image_size, tower.image_size, generator=generator)
    was_training = module.training
    module.eval()
    try:
        ours = module.model(ids[None], torch.ones_like(ids)[None], pixels).logits  # (1, T', V)
    finally:
        module.train(was_training)
    expanded = expand_image_tokens(ids, image_id, module.model.tokens_per_image)[None]
    theirs = llava(input_ids=expanded, pixel_values=pixels).logits  # (1, T', V)
    if ours.shape != theirs.shape:
        raise ExportError(f"Llava logits {tuple(theirs.shape)} != vlm_lit {tuple(ours.shape)}")
    return float((ours.float() - theirs.float()).abs().max())


def export_hf_llava(
    module: VLMModule,
    out_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    image_mode: str = "pad",
    verify: bool = True,
    tolerance: float = 1e-4,
) -> dict[str, Any]:
    """Write ``out_dir`` loadable by ``LlavaForConditionalGeneration`` / ``AutoProcessor``.

    LoRA adapters are merged in fp32 first; with ``verify`` the fp32 Llava model's logits
    must match ``module``'s within ``tolerance`` before anything is written. Returns facts
    for the model card.
    """
    from vlm_lit.export.llava_processor import build_llava_processor
    from vlm_lit.export.merge import merge_module_lora

    check_llava_compatible(module)
    merged = merge_module_lora(module)
    llava = to_llava(module)
    diff = max_logit_difference(module, llava) if verify else None
    if diff is not None and diff > tolerance:
        raise ExportError(
            f"--format hf-llava: the converted model's logits differ from vlm_lit's by {diff:.3g}"
            f" (> {tolerance}); nothing was written"
        )
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    llava.to(dtype).save_pretrained(str(path))
    processor = build_llava_processor(module, llava.config.vision_config, image_mode)
    processor.save_pretrained(str(path))
    return {
        "merged": merged,
        "max_abs_logit_diff_fp32": diff,
        "image_seq_length": int(llava.config.image_seq_length),
        "vision_feature_select_strategy": llava.config.vision_feature_select_strategy,
        "image_mode": image_mode,
    }
