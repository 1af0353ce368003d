"""Export only what training changed (safetensors + JSON config + tokenizer) and load it back.

Layout of a saved directory::

    config.json          {"format": "vlm_lit", "family": "mlp", "hparams": {...constructor args}}
    model.safetensors    trained tensors under their ``model.`` state-dict names, plus
                         ``__rows__.<name>`` (k, D) / ``__row_ids__.<name>`` (k,) for embedding
                         matrices of which only the new rows trained
    tokenizer/           the tokenizer (with ``<image>``)

What is saved: the whole connector (Flamingo: resampler + cross-attention blocks), every
trainable tensor (LoRA adapters, the LM under ``freeze=full``, the vision tower under
``vision_mode=full``) and the new embedding rows. The frozen backbones are *named* in the
hparams (paths / configs) and rebuilt from there, then the saved tensors are loaded on top.
Nothing is unpickled: safetensors only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    from vlm_lit.models.module import VLMModule

FORMAT = "vlm_lit"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
ROWS = "__rows__."
ROW_IDS = "__row_ids__."


def trained_state_dict(module: VLMModule) -> dict[str, torch.Tensor]:
    """The tensors training can change, by ``module.model`` state-dict name (CPU copies)."""
    model = module.model
    rows: dict[str, list[int]] = getattr(model, "trainable_rows", {})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name in rows:
            ids = torch.tensor(rows[name], dtype=torch.long)
            out[ROWS + name] = tensor.detach()[ids].cpu().clone()
            out[ROW_IDS + name] = ids
        elif name.startswith("connector.") or name in trainable:
            # clone: tied / shared storages cannot go to safetensors as views
            out[name] = tensor.detach().cpu().clone().contiguous()
    return out


def save_pretrained(module: VLMModule, directory: str | Path) -> Path:
    """Write config, trained tensors and tokenizer to ``directory``; returns its path."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "format": FORMAT,
        "family": module.family,
        "class": type(module).__name__,
        # LightningCLI adds private keys (``_instantiator``) that are not constructor args
        "hparams": _jsonable({k: v for k, v in module.hparams.items() if not k.startswith("_")}),
    }
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file(trained_state_dict(module), str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    module.tokenizer.save_pretrained(str(path / TOKENIZER_DIR))
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(
        f"constructor argument value {value!r} ({type(value).__name__}) is not JSON-serialisable;"
        " VLMModule arguments must be plain types so the model can be rebuilt."
    )


def read_weights(file: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; anything else (e.g. a pickle) is refused, never executed."""
    try:
        return load_file(str(file), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(
            f"{file} is not a valid safetensors file ({exc}); vlm_lit never unpickles weights. "
            "Re-export it with VLMModule.save_pretrained."
        ) from exc


def load_trained_weights(module: VLMModule, directory: str | Path) -> None:
    """Load a saved ``model.safetensors`` into an already built, matching module (in place)."""
    file = Path(directory) / WEIGHTS_NAME
    tensors = read_weights(file)
    model = module.model
    params = dict(model.named_parameters())
    plain = {k: v for k, v in tensors.items() if not k.startswith((ROWS, ROW_IDS))}
    missing_saved = [k for k in plain if k not in model.state_dict()]
    if missing_saved:
        raise ValueError(
            f"{file}: tensors {missing_saved[:5]} have no place in the rebuilt "
            f"{type(module).__name__}; was it saved with other freeze / lora / connector args?"
        )
    model.load_state_dict(plain, strict=False)
    with torch.no_grad():
        for key, rows in tensors.items():
            if not key.startswith(ROWS):
                continue
            name = key[len(ROWS) :]
            if name not in params:
                raise ValueError(f"{file}: embedding {name!r} is not in the rebuilt model")
            ids = tensors[ROW_IDS + name]
            weight = params[name]
            weight[ids.to(weight.device)] = rows.to(weight.device, weight.dtype)


def from_pretrained(directory: str | Path, **overrides: Any) -> VLMModule:
    """Rebuild the module of ``directory``: backbones from the saved hparams, then tensors.

    ``overrides`` replace constructor arguments (e.g. ``seed``, ``gradient_checkpointing``).
    """
    from vlm_lit.models.registry import CONNECTORS

    path = Path(directory)
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: not a VLMModule.save_pretrained dir")
    config = json.loads(config_file.read_text())
    if config.get("format") != FORMAT or config.get("family") not in CONNECTORS:
        raise ValueError(
            f"{config_file}: not a vlm_lit export or unknown family {config.get('family')!r}; "
            f"valid families: {sorted(CONNECTORS)}"
        )
    # The saved tensors already hold what init_from loaded: do not require that dir again.
    hparams = {**config["hparams"], "init_from": None, **overrides}
    if isinstance(hparams.get("betas"), list):
        hparams["betas"] = tuple(hparams["betas"])
    module = CONNECTORS[config["family"]](**hparams)
    load_trained_weights(module, path)
    return module


def init_from_pretrained(module: VLMModule, directory: str | Path) -> None:
    """Initialise ``module`` from a previous stage's ``save_pretrained`` output, in place.

    The directory must come from the same family with the same backbones (vision and LM
    specs); the freezing preset may differ (align -> full / lora is the usual path).
    """
    path = Path(directory)
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(
            f"--model.init_from {directory}: no {CONFIG_NAME}; pass a directory written by "
            "save_pretrained (a run's DIR/model)"
        )
    config = json.loads(config_file.read_text())
    if config.get("family") != module.family:
        raise ValueError(
            f"--model.init_from {directory} holds a {config.get('family')!r} model; this run "
            f"builds {module.family!r}: use --connector {config.get('family')}"
        )
    saved = config.get("hparams", {})
    for key in ("vision", "language_model", "connector_kwargs", "size"):
        if _jsonable(saved.get(key)) != _jsonable(module.hparams.get(key)):
            raise ValueError(
                f"--model.init_from {directory}: its {key} spec {saved.get(key)!r} differs "
                f"from this run's {module.hparams.get(key)!r}; stages must share backbones"
            )
    load_trained_weights(module, path)
