"""FSDP through Lightning: which blocks to wrap (decoder layers, vision blocks, xattn blocks)."""

from __future__ import annotations

from typing import Any

from torch import nn

#: Block classes of the non-transformers parts (open_clip towers, Flamingo cross-attention).
EXTRA_BLOCKS: frozenset[str] = frozenset(
    {"ResidualAttentionBlock", "CustomResidualAttentionBlock", "GatedCrossAttentionBlock"}
)


def fsdp_wrap_classes(module: nn.Module) -> set[type[nn.Module]]:
    """The block classes of ``module`` that become FSDP units.

    Every transformers model inside declares its repeated blocks in ``_no_split_modules``
    (``LlamaDecoderLayer``, ``CLIPEncoderLayer``, ``Blip2QFormerLayer``, ...); open_clip
    towers and Flamingo's gated cross-attention add theirs (``EXTRA_BLOCKS``). Wrapping per
    block keeps one block's full parameters in memory at a time.
    """
    names = set(EXTRA_BLOCKS)
    for sub in module.modules():
        names.update(getattr(sub, "_no_split_modules", None) or ())
    found = {type(sub) for sub in module.modules() if type(sub).__name__ in names}
    if not found:
        raise ValueError(
            f"no FSDP block class found in {type(module).__name__}; looked for {sorted(names)}"
        )
    return found


def fsdp_strategy(module: nn.Module, **kwargs: Any) -> Any:
    """A Lightning ``FSDPStrategy`` wrapping :func:`fsdp_wrap_classes` of ``module``.

    ``use_orig_params=True`` because a unit mixes frozen and trainable tensors (frozen LM
    with trainable new embedding rows, LoRA); checkpoints are full state dicts by default so
    they load anywhere. ``kwargs`` override (``sharding_strategy``, ``mixed_precision``,
    ``activation_checkpointing_policy``, ...).
    """
    from lightning.pytorch.strategies import FSDPStrategy

    options: dict[str, Any] = {
        "auto_wrap_policy": fsdp_wrap_classes(module),
        "use_orig_params": True,
        "state_dict_type": "full",
    }
    options.update(kwargs)
    return FSDPStrategy(**options)
