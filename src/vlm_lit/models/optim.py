"""AdamW parameter groups per component (decay / no-decay) and the warmup + cosine schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from vlm_lit.models.base import BaseVLM

#: Name fragments of parameters that never get weight decay: normalisation layers, Flamingo's
#: tanh gates (decay would pull them back to the closed-gate identity) and embeddings.
_NO_DECAY_FRAGMENTS: tuple[str, ...] = ("norm", "alpha_", "embed", "ln_")
_GATE_PREFIX = "alpha_"


def no_weight_decay(name: str, param: nn.Parameter, embedding_ids: set[int]) -> bool:
    """Biases, norms, gates, scalars and embedding matrices are not decayed.

    Embedding rows matter most: with only new rows trainable, decay would shrink every
    *frozen* row too (AdamW's decay does not look at the gradient).
    """
    leaf = name.rsplit(".", 1)[-1].lower()
    return (
        param.ndim < 2
        or id(param) in embedding_ids
        or leaf == "bias"
        or any(f in name.lower() for f in _NO_DECAY_FRAGMENTS)
    )


def is_gate(name: str) -> bool:
    """Whether ``name`` is one of Flamingo's tanh gate scalars (``...alpha_attn/alpha_ff``)."""
    return name.rsplit(".", 1)[-1].startswith(_GATE_PREFIX)


def build_optimizer(
    model: BaseVLM,
    lrs: dict[str, float],
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    new_rows_lr: float | None = None,
    gates_lr: float | None = None,
) -> torch.optim.AdamW:
    """AdamW with a group per (component, decay) pair, named ``<component>[_no_decay]``.

    Embedding matrices that only train their new rows (``model.trainable_rows``) go to a
    ``new_rows`` group at ``new_rows_lr``: they belong to what the connector stage aligns.
    Flamingo's tanh gates (``alpha_*`` scalars) go to a ``gates`` group at ``gates_lr`` when
    it is given (else they stay in the connector's no-decay group). Frozen parameters are
    left out.
    """
    lm = model.language_model
    embedding_ids = {
        id(m.weight)
        for m in (lm.get_input_embeddings(), lm.get_output_embeddings())
        if m is not None and isinstance(getattr(m, "weight", None), nn.Parameter)
    }
    row_names = set(getattr(model, "trainable_rows", {}))
    groups: dict[str, dict] = {}
    seen: set[int] = set()
    for component, named in model.parameter_groups().items():
        if component not in lrs:
            raise ValueError(f"no learning rate for component {component!r}; have {sorted(lrs)}")
        for name, param in named:
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if name in row_names:
                key, lr, decay = "new_rows", new_rows_lr or lrs[component], 0.0
            elif gates_lr is not None and is_gate(name):
                key, lr, decay = "gates", gates_lr, 0.0
            elif no_weight_decay(name, param, embedding_ids):
                key, lr, decay = f"{component}_no_decay", lrs[component], 0.0
            else:
                key, lr, decay = component, lrs[component], weight_decay
            group = groups.setdefault(
                key, {"name": key, "params": [], "lr": lr, "weight_decay": decay}
            )
            group["params"].append(param)
    if not groups:
        raise ValueError(
            "no trainable parameter: check --model.freeze / --model.vision_mode "
            "(the connector should always train)."
        )
    return torch.optim.AdamW(list(groups.values()), betas=betas)


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> Callable:
    """LR multiplier: linear 0 -> 1 over ``warmup_steps``, then cosine 1 -> ``min_ratio``
    at ``total_steps`` (held there after)."""
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(
            f"need warmup_steps >= 0 and total steps >= 1 (--model.warmup_steps / "
            f"--model.max_steps); got {warmup_steps}, {total_steps}"
        )

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
