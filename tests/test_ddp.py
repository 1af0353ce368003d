"""Multi-process training on CPU through Lightning's own strategies (2 ranks, gloo).

Each test launches ``ddp_scripts/dist_run.py`` in a subprocess with a hard time bound, so a
hang fails the test instead of blocking the suite. See RELIABILITY.md for what each shows.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import lightning as L
import pytest
import torch

from ddp_scripts.make_data import make_data
from subprocess_utils import run_script
from vlm_lit.data.datamodule import VLMDataModule
from vlm_lit.models import build_vlm
from vlm_lit.reliability import fsdp_strategy, fsdp_wrap_classes
from vlm_test_utils import make_batch, tiny

TIMEOUT = 420  # a loaded 2-core machine; ~70 s when idle


def _merge(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], pad: int) -> dict:
    """Two collated batches as one (right-padded to the longer), with the step token count."""
    length = max(a["input_ids"].shape[1], b["input_ids"].shape[1])

    def padded(x: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, length - x.shape[1]), value=value)

    merged = {
        "input_ids": torch.cat([padded(a["input_ids"], pad), padded(b["input_ids"], pad)]),
        "labels": torch.cat([padded(a["labels"], -100), padded(b["labels"], -100)]),
        "attention_mask": torch.cat(
            [padded(a["attention_mask"], 0), padded(b["attention_mask"], 0)]
        ),
        "pixel_values": torch.cat([a["pixel_values"], b["pixel_values"]]),
        "image_sample_index": torch.cat(
            [a["image_sample_index"], b["image_sample_index"] + a["input_ids"].shape[0]]
        ),
    }
    merged["step_supervised_tokens"] = (merged["labels"][:, 1:] != -100).sum()
    return merged


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ddp")
    make_data(root / "data")
    out = root / "out"
    out.mkdir()
    result = run_script(
        "dist_run.py", "ddp", str(root / "data"), str(out), timeout=TIMEOUT, cwd=root
    )
    assert result.returncode == 0, result.stdout[-4000:]
    return root / "data", out


def _ranks(out: Path, name: str) -> list[dict]:
    return [json.loads((out / f"{name}-rank{r}.json").read_text()) for r in (0, 1)]


def test_ddp_every_training_sample_exactly_once_with_text_only_batches(ddp_run) -> None:
    data, out = ddp_run
    ranks = _ranks(out, "even")
    expected = sorted(f"even{i}-{j:03d}" for i in range(8) for j in range(2))
    seen = ranks[0]["keys"] + ranks[1]["keys"]
    assert sorted(seen) == expected  # 16 samples, each once, none on both ranks
    assert ranks[0]["steps"] == ranks[1]["steps"] == 4
    # Odd shards are text-only: some steps had a text-only batch on one rank and images on
    # the other, which hangs plain DDP unless every trainable tensor gets a gradient.
    firsts = [r["keys"][0].split("-")[0] for r in ranks]
    assert {int(f[len("even") :]) % 2 for f in firsts} == {0, 1}


def test_ddp_gradient_equals_single_process_on_the_global_batch(ddp_run) -> None:
    _, out = ddp_run
    rank0 = torch.load(out / "even-rank0.pt", weights_only=True)
    rank1 = torch.load(out / "even-rank1.pt", weights_only=True)
    for name, grad in rank0["grads"].items():  # DDP averaged: both ranks hold the same
        torch.testing.assert_close(grad, rank1["grads"][name], rtol=0, atol=0)
    module = build_vlm("mlp", size="tiny", freeze="full", max_steps=10)
    module.train()
    batch = _merge(rank0["batch"], rank1["batch"], module.tokenizer.pad_token_id)
    module(batch).loss.backward()
    reference = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    assert set(reference) <= set(rank0["grads"])
    assert sum(float(g.abs().sum()) for g in reference.values()) > 0
    for name, grad in rank0["grads"].items():
        expected = reference.get(name, torch.zeros_like(grad))
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6, msg=name)


def test_ddp_validation_is_synced_and_equals_single_process(ddp_run) -> None:
    data, out = ddp_run
    ranks = _ranks(out, "even")
    assert ranks[0]["val"] == ranks[1]["val"]  # synced: every rank logs the global value
    module = build_vlm("mlp", size="tiny", freeze="full", max_steps=10)
    dm = VLMDataModule(val=str(data / "val"), batch_size=2)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    single = trainer.validate(module, datamodule=dm, verbose=False)[0]
    assert single["val/supervised_tokens"] == ranks[0]["val"]["val/supervised_tokens"]
    assert single["val/loss"] == pytest.approx(ranks[0]["val"]["val/loss"], rel=1e-5)


def test_ddp_uneven_shards_give_equal_step_counts(ddp_run) -> None:
    _, out = ddp_run
    ranks = _ranks(out, "uneven")
    # 11 samples over 2 ranks x batch 2 -> 2 batches each; the run ended (no hang).
    assert ranks[0]["steps"] == ranks[1]["steps"] == ranks[0]["global_step"] == 2
    assert not set(ranks[0]["keys"]) & set(ranks[1]["keys"])


@pytest.mark.slow
def test_ddp_spawn_keeps_frozen_embedding_rows(tmp_path: Path) -> None:
    make_data(tmp_path / "data")
    result = run_script(
        "dist_run.py", "spawn", str(tmp_path / "data"), str(tmp_path), timeout=TIMEOUT, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout[-4000:]
    record = json.loads((tmp_path / "spawn.json").read_text())
    assert record["connector_changed"]  # it trained
    # Only the new <image> row may move (its output row gets gradient through the softmax).
    assert record["changed_output_rows"] == record["new_token_ids"]
    assert set(record["changed_input_rows"]) <= set(record["new_token_ids"])


def test_pickling_drops_the_row_mask_and_on_fit_start_rearms_it() -> None:
    module = tiny("mlp")
    clone = pickle.loads(pickle.dumps(module))  # what ddp_spawn does to the module
    weight = clone.model.language_model.get_input_embeddings().weight

    def rows_with_grad() -> set[int]:
        weight.grad = None
        clone(make_batch(clone)).loss.backward()
        return set((weight.grad.abs().sum(1) > 0).nonzero().flatten().tolist())

    assert len(rows_with_grad()) > 1  # the bug: every looked-up row would train
    clone.on_fit_start()
    assert rows_with_grad() <= set(clone.new_token_ids)


def test_text_only_batch_gives_every_trainable_tensor_a_gradient() -> None:
    for family in ("mlp", "qformer", "flamingo"):
        module = tiny(family)
        module.train()
        module(make_batch(module, [(0, "Say yes.", "Yes."), (0, "hi", "ok")])).loss.backward()
        missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
        assert missing == [], (family, missing[:3])  # plain DDP would hang on these


def test_fsdp_wrap_policy_names_decoder_vision_and_xattn_blocks() -> None:
    from lightning.pytorch.strategies import FSDPStrategy

    expected = {
        "mlp": {"LlamaDecoderLayer", "ResidualAttentionBlock"},
        "qformer": {
            "LlamaDecoderLayer",
            "ResidualAttentionBlock",
            "Blip2QFormerMultiHeadAttention",
        },
        "flamingo": {"LlamaDecoderLayer", "ResidualAttentionBlock", "GatedCrossAttentionBlock"},
    }
    for family, names in expected.items():
        module = tiny(family)
        assert {c.__name__ for c in fsdp_wrap_classes(module)} == names
    strategy = fsdp_strategy(module, process_group_backend="gloo")
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["use_orig_params"] is True  # frozen + trainable in one unit
    policy = strategy.kwargs["auto_wrap_policy"]
    assert {c.__name__ for c in policy._module_classes} == names
    with pytest.raises(ValueError, match="no FSDP block class"):
        fsdp_wrap_classes(torch.nn.Linear(2, 2))
