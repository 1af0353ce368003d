"""FlamingoModel: exact LM equality at init, gating, media routing, decoding, gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
)

from vlm_lit.models.connectors.xattn import find_decoder_layers
from vlm_lit.models.flamingo import FlamingoModel

IMG = 99  # image token id of the tiny vocab
PAD = 0
VOCAB = 100
DIM = 32


def _config(family: str):
    common = dict(vocab_size=VOCAB, num_attention_heads=4, max_position_embeddings=64)
    if family == "gpt2":
        return GPT2Config(
            vocab_size=VOCAB, n_embd=DIM, n_layer=2, n_head=4, n_positions=64,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
    if family == "opt":
        return OPTConfig(
            hidden_size=DIM, num_hidden_layers=2, ffn_dim=64, word_embed_proj_dim=DIM,
            dropout=0.0, attention_dropout=0.0, **common,
        )  # fmt: skip
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[family]
    return cls(
        hidden_size=DIM, intermediate_size=64, num_hidden_layers=2, num_key_value_heads=2, **common
    )


FAMILIES = ["llama", "qwen2", "mistral", "gpt2", "opt"]


class TinyVision(nn.Module):
    """Stand-in vision tower: conv patch embedding, (N, 3, 8, 8) -> (N, 4, 24)."""

    width = 24
    num_patches = 4

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, self.width, kernel_size=4, stride=4)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values).flatten(2).transpose(1, 2)


def _model(family: str = "llama", **kwargs) -> tuple[FlamingoModel, nn.Module]:
    lm = AutoModelForCausalLM.from_config(_config(family)).eval()
    kwargs = {"num_latents": 4, "xattn_heads": 2, "resampler_heads": 2, **kwargs}
    model = FlamingoModel(TinyVision(), lm, IMG, **kwargs).eval()
    return model, lm


def _batch(rows: list[list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded batch; ``IMG`` entries are placeholders, each gets one random image."""
    g = torch.Generator().manual_seed(seed)
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), PAD)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    sample = [i for i, r in enumerate(rows) for tok in r if tok == IMG]
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": torch.randn(len(sample), 3, 8, 8, generator=g),
        "image_sample_index": torch.tensor(sample, dtype=torch.long),
    }


# row 0: text only; row 1: text before one image; row 2: two images; row 3: image first
ROWS = [
    [5, 6, 7, 8, 9, 10],
    [11, 12, 13, IMG, 14, 15, 16, 17, 18],
    [19, IMG, 20, 21, IMG, 22, 23],
    [IMG, 24, 25, 26, 27],
]


def _lm_logits(lm: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    mask = batch["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return lm(input_ids=batch["input_ids"], attention_mask=mask, position_ids=pos).logits


def _set_alphas(model: FlamingoModel, value: float) -> None:
    with torch.no_grad():
        for block in model.connector["xattn"]:
            block.alpha_attn.fill_(value)
            block.alpha_ff.fill_(value)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rows", [ROWS, ROWS[:1]], ids=["0-1-2-images", "text-only"])
def test_equals_lm_exactly_at_init(family: str, rows: list[list[int]]) -> None:
    model, lm = _model(family)
    batch = _batch(rows)
    with torch.no_grad():
        out = model(**batch)
        ref = _lm_logits(lm, batch)
    assert torch.equal(out.logits, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_open_gates_change_only_tokens_that_see_an_image(family: str) -> None:
    model, lm = _model(family)
    _set_alphas(model, 0.5)
    batch = _batch(ROWS)
    logits = model(**batch).logits
    with torch.no_grad():
        ref = _lm_logits(lm, batch)
    assert torch.isfinite(logits).all()
    assert torch.equal(logits[0], ref[0])  # text-only sample
    assert torch.equal(logits[1, :3], ref[1, :3])  # text before the first image
    assert torch.equal(logits[2, :1], ref[2, :1])
    for row, first_img in [(1, 3), (2, 1), (3, 0)]:
        length = len(ROWS[row])
        diff = (logits[row, first_img:length] - ref[row, first_img:length]).abs().amax(-1)
        assert (diff > 0).all(), f"row {row}: some token after the image is unchanged"
    logits.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("gated", [True, False])
def test_text_only_batch_with_open_gates_equals_lm(gated: bool) -> None:
    model, lm = _model(gated=gated)
    if gated:
        _set_alphas(model, 0.7)
    batch = _batch(ROWS[:1] + [[30, 31, 32]])
    assert batch["pixel_values"].shape[0] == 0
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, _lm_logits(lm, batch))
        out = model(batch["input_ids"], batch["attention_mask"])  # pixel_values=None
        assert torch.equal(out.logits, _lm_logits(lm, batch))


def _first_block_output(model: FlamingoModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Output of the block in front of decoder layer 0 (no self-attention mixing yet)."""
    seen: list[torch.Tensor] = []
    handle = model.connector["xattn"][0].register_forward_hook(lambda m, a, o: seen.append(o))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("immediate", [True, False])
def test_only_attend_immediate_media(immediate: bool) -> None:
    model, _ = _model(only_attend_immediate_media=immediate)
    _set_alphas(model, 0.5)
    batch = _batch([ROWS[2]])  # 19 IMG1 20 21 IMG2 22 23
    changed = {**batch, "pixel_values": batch["pixel_values"].clone()}
    changed["pixel_values"][0] += 3.0  # image 1 of the sample
    a, b = _first_block_output(model, batch), _first_block_output(model, changed)
    assert not torch.equal(a[0, 1:4], b[0, 1:4])  # tokens between image 1 and image 2
    after_second = torch.equal(a[0, 4:], b[0, 4:])
    assert after_second is immediate


def test_placeholder_sees_its_own_image() -> None:
    model, _ = _model()
    _set_alphas(model, 0.5)
    batch = _batch([ROWS[3]])
    changed = {**batch, "pixel_values": batch["pixel_values"] + 3.0}
    a, b = _first_block_output(model, batch), _first_block_output(model, changed)
    assert not torch.equal(a[0, 0], b[0, 0])


def test_image_token_count_mismatch_is_an_error() -> None:
    model, _ = _model()
    batch = _batch(ROWS)
    batch["image_sample_index"] = torch.tensor([1, 1, 2, 3])  # row 2 has two images
    with pytest.raises(ValueError, match="exactly one <image> token"):
        model(**batch)
    batch["image_sample_index"] = torch.tensor([1, 2, 2, 4])
    with pytest.raises(ValueError, match="outside the batch of 4 rows"):
        model(**batch)
    batch["image_sample_index"] = None
    with pytest.raises(ValueError, match="image_sample_index"):
        model(**batch)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_incremental_decoding_matches_full_forward(family: str) -> None:
    model, _ = _model(family)
    _set_alphas(model, 0.5)
    # Left-padded prompts as generation builds them: an image row, a text row.
    prompt_ids = torch.tensor([[PAD, PAD, 11, IMG, 12], [17, 18, 19, 20, 21]])
    prompt_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    cont = torch.tensor([[13, 14, 15], [22, 23, 24]])
    ids = torch.cat([prompt_ids, cont], 1)
    mask = torch.cat([prompt_mask, torch.ones_like(cont)], 1)
    pixels, index = torch.randn(1, 3, 8, 8), torch.tensor([0])
    with torch.no_grad():
        ref = model(ids, mask, pixels, index).logits
        out = model(prompt_ids, prompt_mask, pixels, index, use_cache=True)
        assert out.state.last_media.tolist() == [0, -1]
        step_logits = [out.logits]
        for start, end in [(5, 7), (7, 8)]:  # a two-token step, then a one-token step
            out = model(
                ids[:, start:end],
                mask[:, :end],
                past_key_values=out.past_key_values,
                state=out.state,
                use_cache=True,
            )
            step_logits.append(out.logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(step_logits, 1)[real], ref[real], atol=1e-5, rtol=1e-4)
    # The image actually reaches the decoded tokens of row 0.
    with torch.no_grad():
        lm_only = _lm_logits(model.language_model, {"input_ids": ids, "attention_mask": mask})
    assert torch.equal(ref[1], lm_only[1]) and not torch.allclose(ref[0, -1], lm_only[0, -1])


def test_gradients_reach_every_flamingo_parameter() -> None:
    model, _ = _model()
    batch = _batch(ROWS)
    model(**batch).logits.square().mean().backward()
    for block in model.connector["xattn"]:  # at alpha = 0 only the gates learn, and they do
        assert block.alpha_attn.grad.abs().item() > 0
        assert block.alpha_ff.grad.abs().item() > 0
    model.zero_grad(set_to_none=True)
    _set_alphas(model, 0.5)
    model(**batch).logits.square().mean().backward()
    for name, p in [*model.connector.named_parameters(), *model.vision.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def _loss(model: FlamingoModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(**batch).logits
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gradient_checkpointing_same_loss_and_grads(family: str) -> None:
    model, lm = _model(family)
    _set_alphas(model, 0.5)
    model.train()
    batch = _batch(ROWS)
    plain = copy.deepcopy(model)
    loss_plain = _loss(plain, batch)
    loss_plain.backward()
    lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    lm.requires_grad_(False)  # frozen LM, as in Flamingo training
    assert all(layer.gradient_checkpointing for layer in find_decoder_layers(lm))
    loss = _loss(model, batch)
    loss.backward()
    torch.testing.assert_close(loss, loss_plain)
    for (name, p), (_, q) in zip(
        model.connector.named_parameters(), plain.connector.named_parameters(), strict=True
    ):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4)


class CheckpointWrapper(nn.Module):
    """Checkpoints the wrapped layer's ``__call__`` (so its pre-hooks re-run in backward)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return checkpoint(self.inner, *args, use_reentrant=False, **kwargs)


def test_hooks_recomputed_inside_a_checkpoint_still_see_the_images() -> None:
    model, lm = _model()
    _set_alphas(model, 0.5)
    model.train()
    batch = _batch(ROWS)
    plain = copy.deepcopy(model)
    loss_plain = _loss(plain, batch)
    loss_plain.backward()
    layers = find_decoder_layers(lm)
    for i in range(len(layers)):
        layers[i] = CheckpointWrapper(layers[i])  # like FSDP's activation checkpoint wrapper
    loss = _loss(model, batch)
    loss.backward()  # recomputation runs the hooks after forward returned
    torch.testing.assert_close(loss, loss_plain)
    for (name, p), (_, q) in zip(
        model.connector.named_parameters(), plain.connector.named_parameters(), strict=True
    ):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_state_dict_keys_and_parameter_groups() -> None:
    model, lm = _model(cross_attn_every=2)
    bare = AutoModelForCausalLM.from_config(_config("llama"))
    assert list(lm.state_dict()) == list(bare.state_dict())
    assert model.xattn_layer_indices == [0] and len(model.connector["xattn"]) == 1
    groups = model.parameter_groups()
    assert set(groups) == {"vision", "connector", "lm"}
    named = dict(model.named_parameters())
    grouped = [n for g in groups.values() for n, _ in g]
    assert sorted(grouped) == sorted(named)
    assert all(named[n] is p for g in groups.values() for n, p in g)
    assert all(n.startswith("connector.") for n, _ in groups["connector"])
    assert model.tokens_per_image == 1


def test_gate_variants() -> None:
    model, _ = _model(gated=False)
    names = [n for n, _ in model.connector.named_parameters()]
    assert not any("alpha" in n for n in names)
    model, lm = _model(gate_init=1.0)
    block = model.connector["xattn"][0]
    assert block.alpha_attn.item() == 1.0 and block.alpha_ff.item() == 1.0
    batch = _batch(ROWS[1:2])
    with torch.no_grad():
        assert not torch.equal(model(**batch).logits, _lm_logits(lm, batch))


def test_deepcopy_hooks_follow_the_copy_and_bare_lm_usable_after_training_forward() -> None:
    model, lm = _model()
    twin = copy.deepcopy(model)
    _set_alphas(twin, 0.5)
    batch = _batch(ROWS)
    with torch.no_grad():
        ref = _lm_logits(lm, batch)
        assert torch.equal(model(**batch).logits, ref)  # the copy's gates do not leak back
        assert not torch.equal(twin(**batch).logits, ref)
    model.train()
    model(**batch)  # grad-enabled training forward keeps the context for recomputation
    model.clear_visual_context()
    with torch.no_grad():
        assert torch.equal(_lm_logits(lm.eval(), batch), ref)


def test_bf16_lm_with_fp32_connector() -> None:
    model, lm = _model()
    lm.to(torch.bfloat16)
    batch = _batch(ROWS)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, _lm_logits(lm, batch))
        _set_alphas(model, 0.5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(**batch).logits
    assert torch.isfinite(logits).all()


def test_lora_injected_into_the_blocks_is_used_by_the_hooks() -> None:
    from peft import LoraConfig, inject_adapter_in_model

    model, lm = _model()
    _set_alphas(model, 0.5)
    batch = _batch(ROWS)
    with torch.no_grad():
        before = model(**batch).logits
        config = LoraConfig(r=2, target_modules=["to_q", "to_kv", "to_out", "fc_in", "fc_out"])
        inject_adapter_in_model(config, model.connector["xattn"])
        assert torch.equal(model(**batch).logits, before)  # lora_B starts at zero
        for name, p in model.connector["xattn"].named_parameters():
            if "lora_B" in name:
                p.normal_()
        after = model(**batch).logits
    assert not torch.equal(after, before)
    assert torch.equal(after[0], _lm_logits(lm, batch)[0])  # text-only row still the LM
