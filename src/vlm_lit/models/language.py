"""Causal LM + tokenizer loading, attention choice, and trainable rows for added tokens."""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

AttnImplementation = Literal["auto", "sdpa", "eager", "flash_attention_2"]

#: flash-attn is optional: only looked up, never imported, until transformers needs it.
FLASH_ATTN_AVAILABLE: bool = importlib.util.find_spec("flash_attn") is not None


def resolve_attn_implementation(
    requested: AttnImplementation, device: str | torch.device | None = None
) -> str:
    """The attention kernel to ask transformers for.

    ``flash_attention_2`` needs the flash-attn package *and* a CUDA device; otherwise (and
    for ``"auto"``) PyTorch SDPA is used, with a warning when flash was asked for explicitly.
    ``device=None`` means CUDA when available.
    """
    valid = ("auto", "eager", "flash_attention_2", "sdpa")
    if requested not in valid:
        raise ValueError(f"unknown attn_implementation {requested!r}; valid: {sorted(valid)}")
    if requested in ("sdpa", "eager"):
        return requested
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    flash_ok = FLASH_ATTN_AVAILABLE and torch.device(device).type == "cuda"
    if flash_ok:
        return "flash_attention_2"
    if requested == "flash_attention_2":
        why = "flash-attn is not installed" if not FLASH_ATTN_AVAILABLE else f"device is {device}"
        warnings.warn(f"flash_attention_2 unavailable ({why}); using sdpa", stacklevel=2)
    return "sdpa"


def _load_tokenizer(
    tokenizer: PreTrainedTokenizerBase | str | None, path: str | None, trust_remote_code: bool
) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    if tokenizer is not None and not isinstance(tokenizer, str):
        return tokenizer
    source = tokenizer if tokenizer is not None else path
    if source is None:
        raise ValueError(
            "build_language_model(config=...) builds no tokenizer: pass tokenizer= "
            "(a tokenizer object or a local tokenizer directory)"
        )
    if not os.path.isdir(source):
        raise FileNotFoundError(f"tokenizer directory not found: {source}")
    return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)


def build_language_model(
    path: str | None = None,
    config: dict[str, Any] | None = None,
    *,
    tokenizer: PreTrainedTokenizerBase | str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: AttnImplementation = "sdpa",
    gradient_checkpointing: bool = False,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM from a local directory, or build a random one from a config dict.

    ``config`` is a transformers config as a dict with ``model_type`` (e.g. ``{"model_type":
    "llama", "hidden_size": 64, ...}``); then ``tokenizer`` (object or directory) is required.
    ``device`` only informs the attention choice (see :func:`resolve_attn_implementation`).

    The tokenizer always ends up with a pad token: EOS when it has one (padding positions
    are masked by ``attention_mask`` and labelled -100, so sharing the id is harmless),
    otherwise a new ``<pad>`` special token whose embedding row is added here.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if (path is None) == (config is None):
        raise ValueError("build_language_model: pass exactly one of path= or config=")
    attn = resolve_attn_implementation(attn_implementation, device)
    kwargs: dict[str, Any] = {"attn_implementation": attn, "trust_remote_code": trust_remote_code}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if path is not None:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"language model directory not found: {path}")
        try:
            lm = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except Exception as exc:
            raise RuntimeError(f"could not load a causal LM from {path}: {exc}") from exc
    else:
        cfg = dict(config)
        model_type = cfg.pop("model_type", None)
        if model_type is None:
            raise ValueError("build_language_model(config=...) needs a 'model_type' key")
        lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg), **kwargs)
    tok = _load_tokenizer(tokenizer, path, trust_remote_code)
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        else:
            tok.add_special_tokens({"pad_token": "<pad>"})
            resize_for_tokenizer(lm, tok, [tok.pad_token_id])
    lm.config.pad_token_id = tok.pad_token_id
    if getattr(lm, "generation_config", None) is not None:
        lm.generation_config.pad_token_id = tok.pad_token_id
    if gradient_checkpointing:
        enable_gradient_checkpointing(lm)
    return lm, tok


def enable_gradient_checkpointing(lm: PreTrainedModel) -> None:
    """Non-reentrant checkpointing, with input grads so frozen embeddings don't cut the graph."""
    ckpt_kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5 name
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt_kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
    # With a frozen embedding the checkpointed blocks' inputs would not require grad and
    # LoRA/visual-token gradients would silently vanish; recent transformers already
    # hook this in, older ones do not.
    if not getattr(lm, "_require_grads_hooks", None):
        lm.enable_input_require_grads()
    lm.config.use_cache = False


def embeddings_tied(lm: PreTrainedModel) -> bool:
    """True when the output projection shares its weight with the input embedding."""
    out = lm.get_output_embeddings()
    return out is not None and out.weight is lm.get_input_embeddings().weight


def resize_for_tokenizer(
    lm: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    new_ids: Sequence[int],
    pad_to_multiple_of: int | None = None,
) -> list[int]:
    """Grow the embeddings to cover the tokenizer; rows of ``new_ids`` start at the old mean.

    Returns the ids whose rows were (re)initialised: ``new_ids`` plus any tokenizer id that
    had no row before. Initialising at the mean of the old rows (as LLaVA does) keeps the
    LM's output distribution almost unchanged when a new token is seen.
    """
    old_rows = lm.get_input_embeddings().weight.shape[0]
    ids = sorted(set(new_ids) | set(range(old_rows, len(tokenizer))))
    if not ids:
        return []
    if len(tokenizer) > old_rows:
        lm.resize_token_embeddings(
            len(tokenizer), pad_to_multiple_of=pad_to_multiple_of, mean_resizing=False
        )
    in_w = lm.get_input_embeddings().weight
    # Rows past the tokenizer (padding to a multiple) are never looked up; give them the
    # mean too so that no random row can win an argmax.
    fill = sorted(set(ids) | set(range(old_rows, in_w.shape[0])))
    old = torch.ones(old_rows, dtype=torch.bool)
    old[[i for i in ids if i < old_rows]] = False  # rows of pre-existing tokens only
    weights = [in_w] if embeddings_tied(lm) else [in_w, lm.get_output_embeddings().weight]
    with torch.no_grad():
        for w in weights:
            w[fill] = w[:old_rows][old.to(w.device)].float().mean(0).to(w.dtype)
    return ids


def add_image_token(
    lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None
) -> list[int]:
    """Ensure ``IMAGE_TOKEN`` exists, give it (and any row-less token) a mean-initialised row.

    Returns the ids of the rows initialised here (``[]`` when the LM already had a row for
    every tokenizer id and the image token was already there, e.g. a reloaded model).
    """
    from vlm_lit.data.tokenize import IMAGE_TOKEN, ensure_image_token

    added = ensure_image_token(tokenizer)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    return resize_for_tokenizer(lm, tokenizer, [image_id] if added else [], pad_to_multiple_of)


def _keep_rows(grad: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Zero the gradient of every row except ``ids``: (V, D) -> (V, D)."""
    mask = torch.zeros(grad.shape[0], 1, dtype=grad.dtype, device=grad.device)
    mask[ids.to(grad.device)] = 1
    return grad * mask


class _RowMask:
    """The row-mask gradient hook as a picklable object (a lambda breaks ``ddp_spawn``)."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        return _keep_rows(grad, self.ids)


def keep_new_rows_trainable(lm: PreTrainedModel, new_ids: Sequence[int]) -> None:
    """Make only the rows ``new_ids`` of the input (and untied output) embedding learn.

    Sets ``requires_grad=True`` on the embedding weight(s) and registers a gradient hook
    that zeroes all other rows, so with the rest of the LM frozen only the new rows move.
    The optimizer MUST use ``weight_decay=0`` for these tensors: decoupled weight decay
    would still shrink the frozen rows. Call it after any resize (a resize makes a new
    Parameter without the hook) and only when the LM embedding is otherwise frozen.
    Calling it again replaces the previous hook. Not for FSDP-flattened parameters.
    """
    ids = torch.tensor(sorted(set(new_ids)), dtype=torch.long)
    weights = [lm.get_input_embeddings().weight]
    if not embeddings_tied(lm) and lm.get_output_embeddings() is not None:
        weights.append(lm.get_output_embeddings().weight)
    for w in weights:
        previous = getattr(w, "_vlm_lit_row_hook", None)
        if previous is not None:
            previous.remove()
        w.requires_grad_(True)
        w._vlm_lit_row_hook = w.register_hook(_RowMask(ids))
