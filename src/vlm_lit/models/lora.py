"""LoRA through peft, injected in place so ``.language_model`` stays a transformers causal LM.

``peft.inject_adapter_in_model`` replaces each targeted ``nn.Linear`` (or GPT-2 ``Conv1D``) by a
peft ``LoraLayer`` that wraps the original layer (``base_layer``) and adds ``lora_A``/``lora_B``.
The model object itself is not wrapped: ``module.language_model`` is still the same
``PreTrainedModel`` (``generate``-free forward, ``config``, ``get_input_embeddings`` all work);
only the targeted layers' state-dict keys gain ``.base_layer.`` and the adapter adds
``lora_A.default.weight`` / ``lora_B.default.weight`` keys.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

# Attention/MLP projection names per architecture family, most specific first. The first
# family whose names all occur among the model's linear layers wins.
_TARGET_FAMILIES: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj", "o_proj"),  # Llama, Qwen2, Mistral, Gemma, Phi-3 style
    ("q_proj", "k_proj", "v_proj", "out_proj"),  # OPT, BART, HF CLIP
    ("q_proj", "k_proj", "v_proj", "dense"),  # Phi
    ("c_attn", "c_proj"),  # GPT-2, GPT-BigCode
    ("query_key_value", "dense"),  # GPT-NeoX, Falcon, Bloom
    ("Wqkv", "out_proj"),  # MPT
    ("c_fc", "c_proj"),  # open_clip ViT MLPs (its attention is nn.MultiheadAttention)
    ("to_q", "to_kv", "to_out"),  # perceiver / cross-attention blocks
)


def leaf_linear_names(model: nn.Module) -> set[str]:
    """Last name component of every linear-like leaf that is called through its ``forward``.

    Linears owned by ``nn.MultiheadAttention`` are skipped: MHA reads ``out_proj.weight``
    directly, so a LoRA wrapper there would never run.
    """
    mha_children: set[str] = set()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            mha_children.update(f"{name}.{child}" for child, _ in mod.named_children())
    names: set[str] = set()
    for name, mod in model.named_modules():
        is_linear = isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D"
        if is_linear and name not in mha_children:
            names.add(name.rsplit(".", 1)[-1])
    return names


def detect_target_modules(model: nn.Module, where: str = "model") -> list[str]:
    """Pick LoRA target module names for ``model`` from its own layer names.

    Raises:
        ValueError: when no known family matches; lists the model's linear names so the user
            can pass ``lora_target_modules`` explicitly.
    """
    linears = leaf_linear_names(model)
    for family in _TARGET_FAMILIES:
        if all(n in linears for n in family):
            return list(family)
    raise ValueError(
        f"cannot auto-detect LoRA target modules for the {where} ({type(model).__name__}); its "
        f"linear layers are named {sorted(linears)}. Set --model.lora_target_modules to a list of "
        "these names."
    )


def add_lora(
    model: nn.Module,
    *,
    r: int,
    alpha: int,
    dropout: float,
    target_modules: Sequence[str] | None = None,
    adapter_name: str = "default",
    where: str = "model",
) -> list[str]:
    """Inject LoRA adapters into ``model`` in place; returns the target module names used.

    Only the adapter tensors require grad afterwards; the wrapped base weights are frozen by
    peft. ``lora_B`` is zero-initialised, so the model's output is unchanged at injection.
    """
    targets = list(target_modules) if target_modules else detect_target_modules(model, where)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    inject_adapter_in_model(config, model, adapter_name=adapter_name)
    return targets


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` contains any injected LoRA layer."""
    return any(isinstance(m, LoraLayer) for m in model.modules())


def is_lora_parameter(name: str) -> bool:
    """Whether a parameter name belongs to a LoRA adapter (``lora_A``/``lora_B``/...)."""
    return ".lora_" in name or name.startswith("lora_")


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Merge every LoRA adapter into its base weight in fp32 and unwrap the layer; returns count.

    Merging in bf16 rounds ``W + BA`` to bf16 and shifts the loss; the base weight is upcast,
    merged and cast back to its own dtype once.
    """
    merged = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, LoraLayer):
                continue
            base = child.get_base_layer()
            weight = base.weight.data.float()
            for adapter in child.active_adapters:
                a = child.lora_A[adapter].weight.float()  # (r, in)
                b = child.lora_B[adapter].weight.float()  # (out, r)
                delta = (b @ a) * child.scaling[adapter]  # (out, in)
                weight += delta.T if child.fan_in_fan_out else delta
            base.weight.data = weight.to(base.weight.dtype)
            setattr(parent, child_name, base)
            merged += 1
    return merged
