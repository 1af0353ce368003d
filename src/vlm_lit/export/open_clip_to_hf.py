"""Rewrite a (pruned) open_clip ViT image tower as an equivalent transformers ``CLIPVisionModel``.

Only the plain CLIP ViT layout converts exactly: learnable positions with a class token,
``ln_pre``, pre-norm blocks of ``nn.MultiheadAttention`` + ``c_fc``/``c_proj`` MLP with
GELU (erf) or QuickGELU, no layer scale, no custom attention. Everything else is refused
with the reason; the caller checks the converted tower's features numerically as well.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from vlm_lit.export.inputs import ExportError

if TYPE_CHECKING:
    from transformers import CLIPVisionModel

    from vlm_lit.models.vision import OpenCLIPVisionTower


def _refuse(why: str) -> ExportError:
    return ExportError(
        f"--format hf-llava: this open_clip tower cannot be rewritten as a transformers CLIP "
        f"vision model ({why}); use --format vlm-lit, or train with a transformers tower "
        '(--model.vision {"backend": "hf", ...})'
    )


def _activation(block: nn.Module) -> str:
    """The transformers ``hidden_act`` equivalent to the block's MLP activation."""
    from open_clip.transformer import QuickGELU

    act = block.mlp.gelu
    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return "gelu"
    raise _refuse(f"MLP activation {act!r}")


def _check_layout(visual: nn.Module) -> None:
    from open_clip.transformer import ResidualAttentionBlock

    blocks = list(visual.transformer.resblocks)
    if not isinstance(visual.ln_pre, nn.LayerNorm):
        raise _refuse("no ln_pre (no_ln_pre=True)")
    if not isinstance(visual.patch_dropout, nn.Identity):
        raise _refuse("patch dropout")
    grid = visual.grid_size[0] * visual.grid_size[1]
    if visual.positional_embedding.shape[0] != grid + 1:
        raise _refuse("positional embedding without a class position")
    for i, block in enumerate(blocks):
        if type(block) is not ResidualAttentionBlock:
            raise _refuse(f"block {i} is {type(block).__name__}")
        if not isinstance(block.attn, nn.MultiheadAttention) or hasattr(block, "ln_1_kv"):
            raise _refuse(f"block {i} has custom attention")
        if not (isinstance(block.ls_1, nn.Identity) and isinstance(block.ls_2, nn.Identity)):
            raise _refuse(f"block {i} uses layer scale (ls_init_value)")
        if block.attn.in_proj_bias is None or block.attn.out_proj.bias is None:
            raise _refuse(f"block {i} attention without biases")


@torch.no_grad()
def open_clip_to_hf_clip(tower: OpenCLIPVisionTower) -> CLIPVisionModel:
    """A ``CLIPVisionModel`` whose ``hidden_states[-1]`` equals the tower's kept-block output.

    The tower is already pruned after its feature layer, so the HF model has that many
    layers; its ``post_layernorm`` is left at identity init (it only feeds the pooled output).
    """
    from transformers import CLIPVisionConfig, CLIPVisionModel

    visual = tower.model
    _check_layout(visual)
    blocks = list(visual.transformer.resblocks)
    first = blocks[0]
    width = int(visual.transformer.width)
    config = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=int(first.mlp.c_fc.out_features),
        num_hidden_layers=len(blocks),
        num_attention_heads=int(first.attn.num_heads),
        num_channels=3,
        image_size=int(tower.image_size),
        patch_size=int(visual.conv1.kernel_size[0]),
        hidden_act=_activation(first),
        layer_norm_eps=float(visual.ln_pre.eps),
        attention_dropout=0.0,
    )
    hf = CLIPVisionModel(config).float().eval()
    state: dict[str, torch.Tensor] = {
        "embeddings.patch_embedding.weight": visual.conv1.weight,
        "embeddings.class_embedding": visual.class_embedding,
        "embeddings.position_embedding.weight": visual.positional_embedding,
        "pre_layrnorm.weight": visual.ln_pre.weight,
        "pre_layrnorm.bias": visual.ln_pre.bias,
    }
    for i, block in enumerate(blocks):
        if _activation(block) != config.hidden_act:
            raise _refuse("blocks use different activations")
        prefix = f"encoder.layers.{i}."
        q, k, v = block.attn.in_proj_weight.chunk(3, dim=0)  # (D, D) each
        qb, kb, vb = block.attn.in_proj_bias.chunk(3, dim=0)  # (D,) each
        for name, weight, bias in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
            state[f"{prefix}self_attn.{name}.weight"] = weight
            state[f"{prefix}self_attn.{name}.bias"] = bias
        pairs = {
            "self_attn.out_proj": block.attn.out_proj,
            "layer_norm1": block.ln_1,
            "layer_norm2": block.ln_2,
            "mlp.fc1": block.mlp.c_fc,
            "mlp.fc2": block.mlp.c_proj,
        }
        for hf_name, mod in pairs.items():
            state[f"{prefix}{hf_name}.weight"] = mod.weight
            state[f"{prefix}{hf_name}.bias"] = mod.bias
    state = {k: v.detach().float().clone() for k, v in state.items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [
        k for k in missing if not k.startswith(("post_layernorm.", "embeddings.position_ids"))
    ]
    if missing or unexpected:
        raise _refuse(f"weights do not map: missing {missing[:5]}, unexpected {unexpected[:5]}")
    _check_features(tower, hf)
    return hf


def _check_features(tower: OpenCLIPVisionTower, hf: CLIPVisionModel) -> None:
    """Compare the two towers' patch features on a random image (fp32)."""
    pixels = torch.randn(
        1, 3, tower.image_size, tower.image_size, generator=torch.Generator().manual_seed(0)
    )
    was_training = tower.training
    tower.eval()
    try:
        ours = tower(pixels).float()  # (1, P, D)
    finally:
        tower.train(was_training)
    theirs = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]  # (1, 1+G, D)
    theirs = theirs[:, theirs.shape[1] - ours.shape[1] :]
    diff = float((ours - theirs).abs().max())
    if diff > 1e-4:
        raise _refuse(f"converted features differ by {diff:.3g}")
