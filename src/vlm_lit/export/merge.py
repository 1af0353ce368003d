"""Merge LoRA adapters into their base weights (fp32) and re-save as a plain ``full`` model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from vlm_lit.models.lora import has_lora, merge_lora

if TYPE_CHECKING:
    from vlm_lit.models.module import VLMModule

ExportDtype = Literal["float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; an unknown name fails with the valid ones."""
    if name not in DTYPES:
        raise ValueError(f"unknown --dtype {name!r}; valid: {sorted(DTYPES)}")
    return DTYPES[name]


@torch.no_grad()
def merge_module_lora(module: VLMModule) -> dict[str, Any]:
    """Merge every LoRA adapter of ``module`` in place and make it save as a LoRA-free model.

    Adapters live in the LM (``freeze=lora``), the vision tower (``vision_mode=lora``) and
    Flamingo's cross-attention (``lora_on_xattn``). Each merge runs in fp32 (a bf16 merge
    rounds ``W + BA`` and shifts the loss) on a module whose weights must therefore be fp32.
    The hparams are rewritten so that ``save_pretrained`` writes the merged weights and
    ``from_pretrained`` rebuilds a module with a place for them: ``freeze="full"`` (the whole LM
    is saved), ``vision_mode="full"``, ``lora_on_xattn=False``. Returns the changed hparams
    (empty when there was no adapter).
    """
    model = module.model
    low = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if low:
        raise ValueError(
            f"merge LoRA on an fp32 module (found {low}); load it with from_pretrained (fp32) "
            "and cast after merging (--dtype)"
        )
    changes: dict[str, Any] = {}
    if has_lora(model.language_model):
        merge_lora(model.language_model)
        model.language_model.requires_grad_(True)
        # The whole embedding is saved now, not only its new rows.
        model.trainable_rows = {}
        changes["freeze"] = "full"
    if has_lora(model.vision):
        merge_lora(model.vision)
        model.vision.requires_grad_(True)
        changes["vision_mode"] = "full"
    if has_lora(model.connector):
        merge_lora(model.connector)  # the connector is always saved whole
        changes["lora_on_xattn"] = False
    for key, value in changes.items():
        module.hparams[key] = value
    if changes:
        module.hparams["init_from"] = None  # the saved tensors already hold that stage
    return changes


def export_vlm_lit(
    module: VLMModule,
    out_dir: str | Path,
    *,
    merge: bool = False,
    dtype: ExportDtype = "float32",
) -> dict[str, Any]:
    """Write ``module`` as a ``save_pretrained`` directory, optionally LoRA-merged and cast.

    Returns ``{"merged": hparam changes, "dtype": dtype}`` for the model card.
    """
    changes = merge_module_lora(module) if merge else {}
    module.to(resolve_dtype(dtype))
    module.save_pretrained(out_dir)
    return {"merged": changes, "dtype": dtype}
