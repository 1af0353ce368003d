"""Freezing presets (which parts train), the vision switch, and per-component parameter counts.

Presets, for the LM side (the connector always trains):

- ``align`` (LLaVA stage 1, Flamingo): LM frozen except the embedding rows of newly added
  tokens (``<image>``, ...), whose old rows get a zero gradient through a hook.
- ``lora``: LoRA adapters on the LM (peft, injected in place) + the new rows.
- ``full``: the whole LM.

The vision tower has its own switch, ``vision_mode`` = ``frozen`` | ``lora`` | ``full``.

Frozen components are kept in eval mode (see :func:`set_frozen_eval`): with their weights
fixed, dropout would only add noise to the features that the trained parts learn from, and a
frozen LM should behave at train time as it will at inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from torch import nn

from vlm_lit.models.base import BaseVLM
from vlm_lit.models.lora import add_lora, is_lora_parameter, leaf_linear_names

VisionMode = Literal["frozen", "lora", "full"]
VISION_MODES: tuple[str, ...] = ("frozen", "full", "lora")
COMPONENTS: tuple[str, ...] = ("vision", "connector", "lm")


@dataclass(frozen=True)
class FreezePreset:
    """What a preset trains in the LM (the connector always trains)."""

    name: str
    lm: Literal["new_rows", "lora", "full"]
    description: str


FREEZE_PRESETS: dict[str, FreezePreset] = {
    "align": FreezePreset("align", "new_rows", "connector + new token rows; LM frozen"),
    "lora": FreezePreset("lora", "lora", "connector + LoRA on the LM + new token rows"),
    "full": FreezePreset("full", "full", "connector + the whole LM"),
}


def get_preset(name: str) -> FreezePreset:
    """Look up a preset; an unknown name fails with the sorted list of valid ones."""
    if name not in FREEZE_PRESETS:
        raise ValueError(
            f"unknown freezing preset {name!r} (--model.freeze); valid: {sorted(FREEZE_PRESETS)}"
        )
    return FREEZE_PRESETS[name]


def check_vision_mode(mode: str) -> None:
    """Fail with the valid names when ``mode`` is not a vision mode."""
    if mode not in VISION_MODES:
        raise ValueError(
            f"unknown vision_mode {mode!r} (--model.vision_mode); valid: {sorted(VISION_MODES)}"
        )


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters shared by the LM, the vision tower and Flamingo's blocks."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: Sequence[str] | None = None
    vision_target_modules: Sequence[str] | None = None


def _embedding_params(model: BaseVLM) -> list[tuple[str, nn.Parameter]]:
    """The LM's input and (untied) output embedding weights, with their model-level names."""
    lm = model.language_model
    by_id = {id(p): f"language_model.{n}" for n, p in lm.named_parameters()}
    found: dict[int, tuple[str, nn.Parameter]] = {}
    for emb in (lm.get_input_embeddings(), lm.get_output_embeddings()):
        weight = getattr(emb, "weight", None)
        if isinstance(weight, nn.Parameter) and id(weight) in by_id:
            found[id(weight)] = (by_id[id(weight)], weight)  # tied -> one entry
    return list(found.values())


def apply_freezing(
    model: BaseVLM,
    preset: str,
    vision_mode: VisionMode,
    *,
    new_token_ids: Sequence[int],
    lora: LoraSettings,
    lora_on_xattn: bool = False,
) -> None:
    """Set ``requires_grad`` for ``preset`` / ``vision_mode``, injecting LoRA where asked.

    Records ``model.trainable_rows``: embedding parameter name -> row ids that train while the
    rest of that matrix is frozen (used by :func:`count_parameters` and serialization).
    With ``lora_on_xattn`` (Flamingo), the cross-attention blocks' linears get LoRA and their
    base weights freeze; the resampler, norms and gates keep training.
    """
    spec = get_preset(preset)
    check_vision_mode(vision_mode)
    model.requires_grad_(False)
    model.trainable_rows = {}
    model.connector.requires_grad_(True)
    if lora_on_xattn:
        is_dict = isinstance(model.connector, nn.ModuleDict)
        xattn = model.connector["xattn"] if is_dict and "xattn" in model.connector else None
        if xattn is None:
            raise ValueError(
                "--model.lora_on_xattn applies to Flamingo's cross-attention blocks; "
                f"{type(model).__name__} has none. Set it to false."
            )
        targets = sorted(leaf_linear_names(xattn))  # attention and feed-forward linears
        add_lora(xattn, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=targets)
        for name, param in xattn.named_parameters():
            param.requires_grad_(is_lora_parameter(name) or param.ndim < 2)
    if spec.lm == "full":
        model.language_model.requires_grad_(True)
    else:
        if spec.lm == "lora":
            add_lora(
                model.language_model,
                r=lora.r,
                alpha=lora.alpha,
                dropout=lora.dropout,
                target_modules=lora.target_modules,
                where="language model",
            )
        if new_token_ids:
            from vlm_lit.models.language import keep_new_rows_trainable

            keep_new_rows_trainable(model.language_model, list(new_token_ids))
            for name, _ in _embedding_params(model):
                model.trainable_rows[name] = sorted(int(i) for i in new_token_ids)
    if vision_mode == "full":
        model.vision.requires_grad_(True)
    elif vision_mode == "lora":
        add_lora(
            model.vision,
            r=lora.r,
            alpha=lora.alpha,
            dropout=lora.dropout,
            target_modules=lora.vision_target_modules,
            where="vision tower",
        )


def frozen_components(preset: str, vision_mode: VisionMode) -> list[str]:
    """Components whose own weights do not train (kept in eval mode): among vision, lm."""
    frozen = []
    if vision_mode == "frozen":
        frozen.append("vision")
    if get_preset(preset).lm == "new_rows":
        frozen.append("lm")
    return frozen


def set_frozen_eval(model: BaseVLM, frozen: Sequence[str], keep_checkpointing: bool) -> None:
    """Put frozen components in eval mode (dropout off).

    transformers only checkpoints a decoder layer whose own ``training`` flag is set, so with
    gradient checkpointing on, the layer objects (not their attention/MLP children, which hold
    the dropout) are flagged as training again: a frozen LM still carries the gradient back to
    the connector and still needs the activation memory savings.
    """
    parts = {"vision": model.vision, "lm": model.language_model}
    for name in frozen:
        parts[name].eval()
        if keep_checkpointing:
            for mod in parts[name].modules():
                if getattr(mod, "gradient_checkpointing", False) is True:
                    mod.training = True


def count_parameters(module: nn.Module) -> dict[str, tuple[int, int]]:
    """``{component: (trainable, frozen)}`` element counts for vision, connector, lm and total.

    Accepts a ``VLMModule`` (uses its ``.model``) or a plain ``BaseVLM``. An embedding matrix
    whose only trainable part is its new rows counts those rows as trainable and the rest as
    frozen. Works on meta-device models (counts come from shapes only).
    """
    model = getattr(module, "model", module)
    rows: dict[str, list[int]] = getattr(model, "trainable_rows", {})
    counts: dict[str, tuple[int, int]] = {}
    seen: set[int] = set()
    for component, named in model.parameter_groups().items():
        trainable = frozen = 0
        for name, param in named:
            if id(param) in seen:  # tied weights count once
                continue
            seen.add(id(param))
            n = param.numel()
            if not param.requires_grad:
                frozen += n
            elif name in rows:
                live = len(rows[name]) * (n // param.shape[0])
                trainable, frozen = trainable + live, frozen + n - live
            else:
                trainable += n
        counts[component] = (trainable, frozen)
    counts["total"] = (
        sum(t for t, _ in counts.values()),
        sum(f for _, f in counts.values()),
    )
    return counts


def flat_parameter_counts(counts: dict[str, tuple[int, int]]) -> dict[str, int]:
    """``{"params/<component>_trainable": n, "params/<component>_frozen": n}`` for loggers."""
    return {
        f"params/{name}_{kind}": pair[i]
        for name, pair in counts.items()
        for i, kind in enumerate(("trainable", "frozen"))
    }


def print_parameter_table(counts: dict[str, tuple[int, int]], title: str) -> None:
    """Print ``counts`` (from :func:`count_parameters`) as a rich table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("component", "trainable", "frozen", "total"):
        table.add_column(col, justify="left" if col == "component" else "right")
    for name, (trainable, frozen) in counts.items():
        table.add_row(name, f"{trainable:,}", f"{frozen:,}", f"{trainable + frozen:,}")
    Console().print(table)
