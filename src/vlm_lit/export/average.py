"""Uniform weight averaging of compatible runs (the core of ``python -m vlm_lit.soup``).

Runs must share family, backbones and architecture (same saved tensors). Non-LoRA runs are
averaged tensor by tensor from their ``model.safetensors``. LoRA runs are first merged (fp32)
and the merged weights averaged: averaging ``A`` and ``B`` separately would give
``mean(B) @ mean(A)``, not the mean of the runs' weight updates.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vlm_lit.export.inputs import RUN_CONFIG_NAME, ExportError, ExportSource

#: hparams that fix which tensors exist and what they mean.
ARCH_KEYS: tuple[str, ...] = (
    "vision",
    "language_model",
    "connector_kwargs",
    "size",
    "freeze",
    "vision_mode",
    "lora_on_xattn",
    "lora_target_modules",
    "lora_vision_target_modules",
)
WEIGHTS = "model.safetensors"


def _tensor_specs(source: ExportSource) -> dict[str, tuple[tuple[int, ...], str]]:
    with safe_open(str(source.model_dir / WEIGHTS), framework="pt") as f:
        return {
            k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()
        }


def check_compatible(sources: Sequence[ExportSource]) -> None:
    """Refuse runs that differ in a config key or a saved tensor, naming the first difference."""
    if len(sources) < 2:
        raise ExportError(f"a soup needs at least 2 runs, got {len(sources)}")
    base, base_cfg = sources[0], sources[0].saved_config
    base_specs = _tensor_specs(base)
    for other in sources[1:]:
        cfg = other.saved_config
        if cfg.get("family") != base_cfg.get("family"):
            raise ExportError(
                f"config key 'family' differs: {base.name} is {base_cfg.get('family')!r}, "
                f"{other.name} is {cfg.get('family')!r}; soups average runs of one architecture"
            )
        for key in ARCH_KEYS:
            mine, theirs = base_cfg["hparams"].get(key), cfg["hparams"].get(key)
            if mine != theirs:
                raise ExportError(
                    f"config key 'hparams.{key}' differs: {base.name} has {mine!r}, {other.name} "
                    f"has {theirs!r}; soups need the same backbones and architecture"
                )
        specs = _tensor_specs(other)
        for name in sorted(set(base_specs) | set(specs)):
            if name not in specs or name not in base_specs:
                where, missing = (other, base) if name in specs else (base, other)
                raise ExportError(
                    f"tensor {name!r} is saved by {where.name} but not by {missing.name}; "
                    "the runs trained different parameters"
                )
            if specs[name] != base_specs[name]:
                raise ExportError(
                    f"tensor {name!r} has shape/dtype {base_specs[name]} in {base.name} but "
                    f"{specs[name]} in {other.name}"
                )


def _needs_merge(source: ExportSource) -> bool:
    hp = source.saved_config["hparams"]
    return (
        hp.get("freeze") == "lora"
        or hp.get("vision_mode") == "lora"
        or bool(hp.get("lora_on_xattn"))
    )


def _merged_state(source: ExportSource) -> tuple[dict[str, torch.Tensor], Any]:
    from vlm_lit.export.merge import merge_module_lora
    from vlm_lit.models.module import VLMModule
    from vlm_lit.models.serialization import trained_state_dict

    module = VLMModule.from_pretrained(source.model_dir)
    merge_module_lora(module)
    return trained_state_dict(module), module


def _check_row_ids(name: str, a: torch.Tensor, b: torch.Tensor, where: str) -> None:
    if not torch.equal(a, b):
        raise ExportError(f"tensor {name!r} (new token ids) differs in {where}; not averageable")


@torch.no_grad()
def write_soup(sources: Sequence[ExportSource], out_dir: str | Path) -> Path:
    """Average ``sources`` uniformly into the ``save_pretrained`` directory ``out_dir``.

    Tensors are summed in fp32 and cast back to their saved dtype. Row-id tensors (which new
    embedding rows a saved slice belongs to) must agree and are copied, not averaged.
    """
    from vlm_lit.models.serialization import ROW_IDS, read_weights

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merge = any(_needs_merge(s) for s in sources)
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    template = None
    for source in sources:
        if merge:
            state, template = _merged_state(source)
        else:
            state = read_weights(source.model_dir / WEIGHTS)
        for name, tensor in state.items():
            if name.startswith(ROW_IDS):
                if name in total:
                    _check_row_ids(name, total[name], tensor, source.name)
                total[name] = tensor
                continue
            dtypes.setdefault(name, tensor.dtype)
            total[name] = total.get(name, 0) + tensor.double()
    averaged = {
        name: t if name.startswith(ROW_IDS) else (t / len(sources)).to(dtypes[name]).contiguous()
        for name, t in total.items()
    }
    if template is not None:
        # The merged module knows the LoRA-free hparams; give it the average and save it.
        template.model.load_state_dict(averaged, strict=False)
        template.save_pretrained(out)
    else:
        first = sources[0].model_dir
        shutil.copy2(first / "config.json", out / "config.json")
        shutil.copytree(first / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
        save_file(averaged, str(out / WEIGHTS), metadata={"format": "pt"})
    run_config = sources[0].run_config_file
    if run_config is not None:  # lets the soup be validated like a run (default evaluator)
        shutil.copy2(run_config, out / RUN_CONFIG_NAME)
    return out
