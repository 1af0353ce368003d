"""VLMModule: token-weighted loss, accumulation equivalence, optimizer, registries, Trainer fit."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from vlm_lit.models import CONNECTORS, FREEZE_PRESETS, build_vlm
from vlm_lit.models.freezing import count_parameters
from vlm_lit.models.loss import token_weighted_loss
from vlm_lit.models.optim import warmup_cosine
from vlm_test_utils import FAMILIES, make_batch, open_flamingo_gates, tiny


def _grads(module) -> dict[str, torch.Tensor]:
    return {
        n: p.grad.detach().clone()
        for n, p in module.named_parameters()
        if p.requires_grad and p.grad is not None
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_is_mean_cross_entropy_over_supervised_tokens(family: str) -> None:
    module = tiny(family)
    batch = make_batch(module)
    out = module(batch)
    logits, labels = out.logits[:, :-1].float(), out.labels[:, 1:]
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    assert torch.allclose(out.loss, expected, atol=1e-6)
    assert out.loss.dtype == torch.float32
    assert int((labels != -100).sum()) == int(batch["num_supervised_tokens"])


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_without_supervised_tokens_gives_zero_loss_with_graph(family: str) -> None:
    module = tiny(family)
    batch = make_batch(module, [(1, "Describe.", None), (0, "Hello?", None)])
    assert int(batch["num_supervised_tokens"]) == 0
    module.train()
    out = module(batch)
    assert out.loss.item() == 0.0 and out.loss.grad_fn is not None
    out.loss.backward()
    for name, p in module.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_accumulation_matches_full_batch(family: str) -> None:
    """4 micro-batches of 1 (normalised by the step's token count) == one batch of 4."""
    module = tiny(family)
    open_flamingo_gates(module)
    module.train()
    full = make_batch(module)
    module(full).loss.backward()
    reference = _grads(module)
    module.zero_grad()
    micro = [make_batch(module, [spec]) for spec in _specs()]
    total = sum(int(b["num_supervised_tokens"]) for b in micro)
    assert total == int(full["num_supervised_tokens"])
    lengths = {int(b["num_supervised_tokens"]) for b in micro}
    assert len(lengths) > 1, "responses must differ in length for the test to mean anything"
    for b in micro:
        b["step_supervised_tokens"] = torch.tensor(total)
        module(b).loss.backward()
    accumulated = _grads(module)
    assert reference.keys() == accumulated.keys() and reference
    for name, grad in reference.items():
        assert torch.allclose(grad, accumulated[name], atol=1e-6, rtol=1e-4), name
    # The per-micro-batch mean (the bug) weights short answers more: visibly different.
    module.zero_grad()
    for b in micro:
        b["step_supervised_tokens"] = b["num_supervised_tokens"]
        (module(b).loss / len(micro)).backward()
    naive = _grads(module)
    assert any(not torch.allclose(reference[n], naive[n], atol=1e-6) for n in reference)


def _specs():
    from vlm_test_utils import DEFAULT_SPECS

    return DEFAULT_SPECS


def test_ddp_scaling_gives_global_token_mean() -> None:
    """Two ranks with loss W * S_r / N, gradients averaged, equal the global token mean."""
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, 1:4] = -100  # rank 0 has fewer supervised tokens than rank 1
    n_total = int((labels[:, 1:] != -100).sum())
    reference = torch.autograd.grad(token_weighted_loss(logits, labels), logits)[0]
    averaged = torch.zeros_like(logits)
    for rank in range(2):
        part = logits[rank : rank + 1]
        loss = token_weighted_loss(part, labels[rank : rank + 1], n_total, world_size=2)
        averaged += torch.autograd.grad(loss, logits)[0] / 2  # DDP averages
    assert torch.allclose(averaged, reference, atol=1e-7)


def test_unknown_names_list_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"\['flamingo', 'mlp', 'qformer'\]"):
        build_vlm("linear", size="tiny")
    with pytest.raises(ValueError, match=str(sorted(FREEZE_PRESETS)).replace("[", r"\[")):
        build_vlm("mlp", size="tiny", freeze="stage3")
    with pytest.raises(ValueError, match=r"\['frozen', 'full', 'lora'\]"):
        build_vlm("mlp", size="tiny", vision_mode="half")
    with pytest.raises(ValueError, match=r"\['hf', 'open_clip'\]"):
        build_vlm("mlp", size="tiny", vision={"backend": "timm"})
    assert sorted(CONNECTORS) == ["flamingo", "mlp", "qformer"]


def test_frozen_components_stay_in_eval_mode() -> None:
    module = tiny("mlp", freeze="align")
    module.train()
    assert module.training and module.connector.training
    assert not module.vision.training and not module.language_model.training
    full = tiny("mlp", freeze="full", vision_mode="full")
    full.train()
    assert full.vision.training and full.language_model.training


def test_optimizer_groups_rates_and_no_decay() -> None:
    module = tiny("flamingo", freeze="full", weight_decay=0.1, lr_connector=1e-3, lr_lm=1e-4)
    module.trainer = None  # not attached; max_steps must then be given
    module.hparams.max_steps = 10
    config = module.configure_optimizers()
    groups = {g["name"]: g for g in config["optimizer"].param_groups}
    assert groups["connector"]["lr"] == 1e-3 and groups["lm"]["lr"] == 1e-4
    assert groups["connector"]["weight_decay"] == 0.1
    names = {id(p): n for n, p in module.named_parameters()}
    no_decay = [
        names[id(p)] for g in groups.values() if g["weight_decay"] == 0 for p in g["params"]
    ]
    decay = [names[id(p)] for g in groups.values() if g["weight_decay"] > 0 for p in g["params"]]
    assert any("alpha_attn" in n for n in no_decay) and any("norm" in n for n in no_decay)
    assert any("embed_tokens" in n for n in no_decay) and any("lm_head" in n for n in no_decay)
    assert not any("alpha" in n or "norm" in n or n.endswith("bias") for n in decay)
    assert any("q_proj" in n for n in decay)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == trainable


def test_flamingo_gates_get_their_own_rate_only_when_asked() -> None:
    gates = {"alpha_attn", "alpha_ff"}

    def groups_of(**kwargs: float) -> dict[str, list[str]]:
        module = tiny("flamingo", freeze="align", lr_connector=1e-3, **kwargs)
        module.trainer = None
        module.hparams.max_steps = 10
        names = {id(p): n for n, p in module.model.named_parameters()}
        optimizer = module.configure_optimizers()["optimizer"]
        return {
            g["name"]: (g["lr"], [names[id(p)] for p in g["params"]])
            for g in optimizer.param_groups
        }

    default = groups_of()
    assert "gates" not in default
    lr, members = default["connector_no_decay"]
    assert lr == 1e-3 and any(n.rsplit(".", 1)[-1] in gates for n in members)
    split = groups_of(lr_gates=5e-2)
    lr, members = split["gates"]
    assert lr == 5e-2 and members and all(n.rsplit(".", 1)[-1] in gates for n in members)
    assert len(members) == 2 * len(tiny("flamingo").model.connector.xattn)
    assert not any(
        n.rsplit(".", 1)[-1] in gates for g, (_, ns) in split.items() if g != "gates" for n in ns
    )
    assert split["connector"][0] == 1e-3


def test_warmup_cosine_schedule() -> None:
    f = warmup_cosine(warmup_steps=4, total_steps=14, min_ratio=0.1)
    assert [round(f(s), 3) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert f(4) == pytest.approx(1.0) and f(14) == pytest.approx(0.1)
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(f(s) >= f(s + 1) for s in range(4, 20))


def test_count_parameters_counts_new_rows_and_everything() -> None:
    module = tiny("mlp", freeze="align")
    counts = count_parameters(module)
    total = sum(p.numel() for p in module.parameters())
    assert counts["total"][0] + counts["total"][1] == total
    assert counts["vision"][0] == 0
    emb = module.language_model.get_input_embeddings().weight
    n_new = len(module.new_token_ids)
    # input + (untied) output embedding rows of the new tokens are the LM's only trainables
    assert counts["lm"][0] == 2 * n_new * emb.shape[1]
    assert counts["connector"] == (sum(p.numel() for p in module.connector.parameters()), 0)


class _Batches(torch.utils.data.Dataset):
    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        return self.batches[i]


def _loader(batches: list[dict]) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(_Batches(batches), batch_size=None, shuffle=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_trainer_fit_two_steps(family: str, capsys: pytest.CaptureFixture[str]) -> None:
    module = tiny(family, freeze="lora", warmup_steps=1)
    before = copy.deepcopy(module.connector.state_dict())
    batches = [make_batch(module, seed=i) for i in range(2)]
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    # a validation batch without supervised tokens (e.g. a rank's padding batch) must not
    # drag the token-weighted val/loss down or make it NaN
    empty = make_batch(module, [(1, "Describe.", None)])
    trainer.fit(module, _loader(batches), _loader([batches[0], empty]))
    assert trainer.global_step == 2
    assert "trainable" in capsys.readouterr().out  # the parameter table was printed
    after = module.connector.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    val_loss = float(trainer.callback_metrics["val/loss"])
    module.eval()
    with torch.no_grad():
        assert val_loss == pytest.approx(float(module(batches[0]).loss), rel=1e-5)


def test_bf16_autocast_training_step() -> None:
    module = tiny("mlp", freeze="lora")
    batch = make_batch(module)
    module.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(batch)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in module.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_trainer_bf16_mixed_fit() -> None:
    module = tiny("flamingo")
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        precision="bf16-mixed",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, _loader([make_batch(module)]))
    assert trainer.global_step == 1


def test_accumulation_in_trainer_undoes_lightning_division() -> None:
    """With accumulate_grad_batches=2 the Trainer's step gradient equals the full batch's."""

    class GradCapture(L.Callback):
        def __init__(self) -> None:
            self.grads: dict[str, torch.Tensor] = {}

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            self.grads = _grads(pl_module)

    specs = _specs()
    reference = tiny("mlp", max_steps=10)
    accumulated = copy.deepcopy(reference)
    full = make_batch(reference, specs)
    halves = [make_batch(reference, specs[:2]), make_batch(reference, specs[2:])]
    total = sum(int(b["num_supervised_tokens"]) for b in halves)
    for b in halves:
        b["step_supervised_tokens"] = torch.tensor(total)
    kwargs = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=1,
    )
    ref_cb, acc_cb = GradCapture(), GradCapture()
    L.Trainer(callbacks=[ref_cb], **kwargs).fit(reference, _loader([full]))
    L.Trainer(callbacks=[acc_cb], accumulate_grad_batches=2, **kwargs).fit(
        accumulated, _loader(halves)
    )
    assert ref_cb.grads.keys() == acc_cb.grads.keys() and ref_cb.grads
    for key, grad in ref_cb.grads.items():
        assert torch.allclose(grad, acc_cb.grads[key], atol=1e-6, rtol=1e-4), key
