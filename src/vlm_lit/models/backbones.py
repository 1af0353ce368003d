"""Turn the plain-dict backbone specs of ``VLMModule`` into a vision tower, LM and tokenizer."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from vlm_lit.models.tiny import (
    build_tiny_tokenizer,
    tiny_connector,
    tiny_language_model,
    tiny_vision,
)


@dataclass
class Backbones:
    """Everything a family needs to assemble its plain model."""

    vision: nn.Module
    language_model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    image_token_id: int
    new_token_ids: list[int]
    connector: dict[str, Any] = field(default_factory=dict)


def resolve_specs(
    family: str,
    vision: dict[str, Any] | None,
    language_model: dict[str, Any] | None,
    connector: dict[str, Any] | None,
    size: str | None,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Fill unset specs from the tiny preset (``size="tiny"``); user keys win over tiny ones."""
    if size not in (None, "tiny"):
        raise ValueError(f"unknown size {size!r} (--model.size); valid: ['tiny'] or null")
    if size == "tiny":
        vision = vision if vision is not None else tiny_vision()
        language_model = language_model if language_model is not None else tiny_language_model()
        connector = {**tiny_connector(family), **(connector or {})}
    missing = [n for n, v in (("vision", vision), ("language_model", language_model)) if v is None]
    if missing:
        raise ValueError(
            f"{family or 'VLM'}: no {' / '.join(missing)} spec; set --model.{missing[0]} "
            '(e.g. {"backend": "open_clip", "model_cfg": ...} / {"path": DIR}) or '
            "--model.size tiny."
        )
    return copy.deepcopy(vision), copy.deepcopy(language_model), dict(connector or {})


def build_backbones(
    family: str,
    *,
    vision: dict[str, Any] | None,
    language_model: dict[str, Any] | None,
    connector: dict[str, Any] | None,
    size: str | None,
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
) -> Backbones:
    """Build the vision tower and LM (+ tokenizer with ``<image>`` and its new row).

    ``vision = {"backend": name, **kwargs}`` goes to ``build_vision_tower``;
    ``language_model`` = ``{"path": DIR}`` or ``{"config": {...}, "tokenizer": DIR}`` (plus
    any ``build_language_model`` keyword). Under ``size="tiny"`` a config LM without a
    tokenizer gets the in-code tiny tokenizer.
    """
    from vlm_lit.data.tokenize import IMAGE_TOKEN
    from vlm_lit.models.language import add_image_token, build_language_model
    from vlm_lit.models.vision import build_vision_tower

    vision_spec, lm_spec, connector_kwargs = resolve_specs(
        family, vision, language_model, connector, size
    )
    if "backend" not in vision_spec:
        raise ValueError(
            f"--model.vision needs a 'backend' key (one of the vision backends); got "
            f"keys {sorted(vision_spec)}"
        )
    tower = build_vision_tower(vision_spec.pop("backend"), **vision_spec)
    lm_spec.setdefault("attn_implementation", attn_implementation)
    lm_spec.setdefault("trust_remote_code", trust_remote_code)
    if size == "tiny" and "path" not in lm_spec and "tokenizer" not in lm_spec:
        tokenizer = build_tiny_tokenizer()
        lm_spec["tokenizer"] = tokenizer
        lm_spec["config"] = {**lm_spec["config"], "vocab_size": len(tokenizer)}
    lm, tok = build_language_model(**lm_spec)
    new_ids = add_image_token(lm, tok)
    return Backbones(
        vision=tower,
        language_model=lm,
        tokenizer=tok,
        image_token_id=int(tok.convert_tokens_to_ids(IMAGE_TOKEN)),
        new_token_ids=list(new_ids),
        connector=connector_kwargs,
    )
