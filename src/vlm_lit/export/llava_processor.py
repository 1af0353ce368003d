"""The exported ``LlavaProcessor``: vlm_lit-equivalent image preprocessing and chat template.

vlm_lit joins a message's parts with ``PART_SEPARATOR`` (image parts become ``<image>``)
*before* the tokenizer's template runs (``vlm_lit.data.templates.content_to_text``), so a
model trained here saw ``<image>\\nQuestion``. A stock template given the same parts would
render them differently (or not at all), and the exported model would be prompted unlike its
training. The exported template therefore starts with a prelude doing that join in Jinja.
"""

from __future__ import annotations

import copy
import json
from typing import TYPE_CHECKING, Any

from transformers import PreTrainedTokenizerBase

from vlm_lit.export.hf_llava import select_strategy
from vlm_lit.export.inputs import ExportError

if TYPE_CHECKING:
    from transformers import LlavaProcessor

    from vlm_lit.models.module import VLMModule

# {sep} / {image} are filled in as JSON strings, valid Jinja string literals.
_PRELUDE = (
    "{{%- set _vl = namespace(messages=[]) -%}}"
    "{{%- for _m in messages -%}}"
    "{{%- if _m['content'] is string -%}}"
    "{{%- set _vl.messages = _vl.messages + [_m] -%}}"
    "{{%- else -%}}"
    "{{%- set _p = namespace(parts=[]) -%}}"
    "{{%- for _part in _m['content'] -%}}"
    "{{%- if _part['type'] == 'image' -%}}{{%- set _p.parts = _p.parts + [{image}] -%}}"
    "{{%- elif _part['type'] == 'text' -%}}{{%- set _p.parts = _p.parts + [_part['text']] -%}}"
    "{{%- endif -%}}"
    "{{%- endfor -%}}"
    "{{%- set _vl.messages = _vl.messages + "
    "[{{'role': _m['role'], 'content': _p.parts | join({sep})}}] -%}}"
    "{{%- endif -%}}"
    "{{%- endfor -%}}"
    "{{%- set messages = _vl.messages -%}}"
)


def parts_joining_template(tokenizer: PreTrainedTokenizerBase) -> str:
    """The tokenizer's template (or vlm_lit's default) behind the part-joining prelude."""
    from vlm_lit.data.templates import PART_SEPARATOR, resolve_chat_template
    from vlm_lit.data.tokenize import IMAGE_TOKEN

    prelude = _PRELUDE.format(sep=json.dumps(PART_SEPARATOR), image=json.dumps(IMAGE_TOKEN))
    return prelude + resolve_chat_template(tokenizer)


def check_template_matches(tokenizer: PreTrainedTokenizerBase, template: str) -> None:
    """Refuse a template whose rendering of an image + text turn differs from vlm_lit's ids."""
    from vlm_lit.data.tokenize import tokenize_conversation

    probe = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Two."}]},
        {"role": "user", "content": "And now?"},
    ]
    ours = tokenize_conversation(probe, tokenizer, add_generation_prompt=True)["input_ids"]
    theirs = tokenizer.apply_chat_template(
        probe, chat_template=template, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    if list(theirs) != ours.tolist():
        raise ExportError(
            "--format hf-llava: the exported chat template renders prompts differently from "
            f"vlm_lit ({list(theirs)[:12]}... vs {ours.tolist()[:12]}...); the tokenizer's "
            "template may not accept pre-joined string content"
        )


def build_llava_processor(
    module: VLMModule, vision_config: Any, image_mode: str = "pad"
) -> LlavaProcessor:
    """A ``LlavaProcessor`` that preprocesses like vlm_lit and expands ``<image>`` to K tokens.

    ``LlavaImageProcessor`` is used (not the plain CLIP one) because it can pad to a square
    with the mean colour first, which is vlm_lit's default ``image_mode="pad"`` (LLaVA-1.5).
    Pixels are identical for images already at the tower's size; resizing (torchvision vs
    PIL bicubic) and the pad colour's rounding differ slightly otherwise.
    """
    from transformers import LlavaImageProcessor, LlavaProcessor

    tower = module.model.vision
    side = int(tower.image_size)
    common = {
        "image_mean": list(tower.image_mean),
        "image_std": list(tower.image_std),
        "resample": 3,  # PIL bicubic, as vlm_lit's ImageTransform
        "crop_size": {"height": side, "width": side},
    }
    if image_mode == "pad":
        images = LlavaImageProcessor(
            do_pad=True, size={"shortest_edge": side}, do_center_crop=True, **common
        )
    else:  # "resize": stretch to the square
        images = LlavaImageProcessor(
            do_pad=False, size={"height": side, "width": side}, do_center_crop=False, **common
        )
    strategy, extra = select_strategy(module, vision_config)
    tokenizer = copy.deepcopy(module.tokenizer)
    tokenizer.padding_side = "left"  # batched generation
    template = parts_joining_template(tokenizer)
    check_template_matches(tokenizer, template)
    tokenizer.chat_template = template
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=int(vision_config.patch_size),
        vision_feature_select_strategy=strategy,
        chat_template=template,
        image_token="<image>",
        num_additional_image_tokens=extra,
    )
