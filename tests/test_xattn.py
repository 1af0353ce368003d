"""Gated cross-attention block, Perceiver resampler, decoder-layer finder and hook injection."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
)

from vlm_lit.models.connectors.perceiver import PerceiverResampler
from vlm_lit.models.connectors.xattn import (
    GatedCrossAttentionBlock,
    VisualContext,
    attach_cross_attention,
    find_decoder_layers,
)

D, DV, L = 16, 12, 3


def _block(**kwargs) -> GatedCrossAttentionBlock:
    return GatedCrossAttentionBlock(D, DV, heads=2, dim_head=8, ff_mult=2, **kwargs)


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden = torch.randn(2, 6, D)
    media = torch.randn(2, 2, L, DV)  # sample 1 has one image: slot 1 is padding
    token_media = torch.tensor([[-1, -1, 0, 0, 1, 1], [-1, 0, 0, 0, 0, 0]])
    return hidden, media, token_media


def _open(block: GatedCrossAttentionBlock, value: float = 0.5) -> GatedCrossAttentionBlock:
    with torch.no_grad():
        block.alpha_attn.fill_(value)
        block.alpha_ff.fill_(value)
    return block


def test_closed_gates_are_an_exact_identity() -> None:
    hidden, media, token_media = _inputs()
    assert torch.equal(_block()(hidden, media, token_media), hidden)


@pytest.mark.parametrize("gated", [True, False])
def test_tokens_without_media_are_untouched_and_nothing_is_nan(gated: bool) -> None:
    block = _open(_block()) if gated else _block(gated=False)
    hidden, media, token_media = _inputs()
    hidden.requires_grad_(True)
    out = block(hidden, media, token_media)
    none = token_media < 0
    assert torch.equal(out[none], hidden[none])  # attention AND feed-forward are zero there
    assert ((out[~none] - hidden[~none]).abs().amax(-1) > 0).all()
    out.square().sum().backward()
    grads = [hidden.grad, *(p.grad for p in block.parameters())]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    all_text = block(hidden, media, torch.full_like(token_media, -1))
    assert torch.equal(all_text, hidden)


def test_gate_options() -> None:
    assert _block(gated=False).alpha_attn is None
    assert not any("alpha" in n for n, _ in _block(gated=False).named_parameters())
    block = _block(gate_init=1.0)
    assert block.alpha_attn.item() == 1.0 and block.alpha_ff.item() == 1.0


@pytest.mark.parametrize("immediate", [True, False])
def test_media_routing_and_padding_slots(immediate: bool) -> None:
    block = _open(_block(only_attend_immediate_media=immediate))
    hidden, media, token_media = _inputs()
    out = block(hidden, media, token_media)
    changed = media.clone()
    changed[0, 0] += 1.0  # first image of sample 0
    changed[1, 1] += 5.0  # a padding slot of sample 1: never visible
    out2 = block(hidden, changed, token_media)
    assert not torch.equal(out[0, 2:4], out2[0, 2:4])
    assert torch.equal(out[0, 4:], out2[0, 4:]) is immediate
    assert torch.equal(out[1], out2[1])


def test_perceiver_resampler_shapes_and_per_image_independence() -> None:
    resampler = PerceiverResampler(DV, D, depth=2, num_latents=5, heads=2, dim_head=8)
    features = torch.randn(3, 7, DV)
    out = resampler(features)
    assert out.shape == (3, 5, D)
    changed = features.clone()
    changed[1] += 1.0
    out2 = resampler(changed)
    assert torch.equal(out[0], out2[0]) and torch.equal(out[2], out2[2])
    assert not torch.equal(out[1], out2[1])
    out.sum().backward()
    assert all(p.grad is not None for p in resampler.parameters())
    with pytest.raises(ValueError, match=r"\(N, P, 12\)"):
        resampler(torch.randn(3, 7, D))


def _lm(family: str) -> nn.Module:
    common = dict(vocab_size=50, num_attention_heads=2, max_position_embeddings=32)
    configs = {
        "llama": lambda: LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3, **common),
        "qwen2": lambda: Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=3, **common),
        "mistral": lambda: MistralConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3, **common),
        "gpt2": lambda: GPT2Config(vocab_size=50, n_embd=16, n_layer=3, n_head=2, n_positions=32),
        "opt": lambda: OPTConfig(hidden_size=16, num_hidden_layers=3, ffn_dim=32, word_embed_proj_dim=16, **common),
    }  # fmt: skip
    return AutoModelForCausalLM.from_config(configs[family]())


@pytest.mark.parametrize(
    ("family", "path"),
    [
        ("llama", "model.layers"),
        ("qwen2", "model.layers"),
        ("mistral", "model.layers"),
        ("gpt2", "transformer.h"),
        ("opt", "model.decoder.layers"),
    ],
)
def test_find_decoder_layers(family: str, path: str) -> None:
    lm = _lm(family)
    layers = find_decoder_layers(lm)
    assert layers is lm.get_submodule(path) and len(layers) == 3


def test_find_decoder_layers_through_peft() -> None:
    from peft import LoraConfig, get_peft_model

    lm = _lm("llama")
    layers = lm.model.layers
    wrapped = get_peft_model(lm, LoraConfig(r=2, target_modules=["q_proj"]))
    assert find_decoder_layers(wrapped) is layers


def test_unknown_lm_family_error_names_the_class() -> None:
    class MysteryLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stack = nn.ModuleList([nn.Linear(4, 4)])

    with pytest.raises(ValueError, match="MysteryLM"):
        find_decoder_layers(MysteryLM())


class KwargLayer(nn.Module):
    def forward(self, hidden_states: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return hidden_states * scale


@pytest.mark.parametrize("as_kwarg", [True, False])
def test_hook_replaces_hidden_states_positional_or_keyword(as_kwarg: bool) -> None:
    layers = nn.ModuleList([KwargLayer(), KwargLayer()])
    blocks = nn.ModuleList([_open(_block())])
    context = VisualContext()
    handles = attach_cross_attention(layers, blocks, [1], context)
    hidden, media, token_media = _inputs()

    def call(index: int) -> torch.Tensor:
        if as_kwarg:
            return layers[index](hidden_states=hidden, scale=2.0)
        return layers[index](hidden, scale=2.0)

    assert torch.equal(call(1), hidden * 2.0)  # no context: plain layer
    context.set(media, token_media)
    expected = blocks[0](hidden, media, token_media) * 2.0
    assert torch.equal(call(1), expected)
    assert torch.equal(call(0), hidden * 2.0)  # layer 0 has no block
    context.set(media, token_media[:, :4])
    with pytest.raises(RuntimeError, match="clear_visual_context"):
        call(1)
    context.clear()
    for handle in handles:
        handle.remove()
    with pytest.raises(ValueError, match="1 blocks for 2 layer indices"):
        attach_cross_attention(layers, blocks, [0, 1], context)


def test_hook_without_hidden_states_is_an_error() -> None:
    class NoArgs(nn.Module):
        def forward(self, x: torch.Tensor | None = None) -> torch.Tensor | None:
            return x

    layers = nn.ModuleList([NoArgs()])
    context = VisualContext()
    attach_cross_attention(layers, nn.ModuleList([_block()]), [0], context)
    hidden, media, token_media = _inputs()
    context.set(media, token_media)
    with pytest.raises(TypeError, match="NoArgs"):
        layers[0](x=hidden)
