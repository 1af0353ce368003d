"""Model soups: uniform average, LoRA runs averaged after merging, greedy soup, refusals, CLI."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from vlm_lit.export.inputs import ExportError, resolve_source
from vlm_lit.export.merge import merge_module_lora
from vlm_lit.models.module import VLMModule
from vlm_lit.soup import check_compatible, fit_validation, greedy_soup, main, write_soup
from vlm_test_utils import make_batch, perturb_lora, tiny

BIAS = "connector.proj.0.bias"


def make_run(tmp: Path, name: str, metrics: dict[str, float] | None, **kwargs: Any) -> Path:
    """A run directory (model/, config.yaml, optional metrics.json) of a tiny mlp model."""
    module = tiny("mlp", **kwargs)
    run = tmp / name
    module.save_pretrained(run / "model")
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"batch_size": 2}}))
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def mark(run: Path, value: float) -> None:
    """Set element 0 of the projector bias to ``value`` (a fingerprint for fake evaluators)."""
    state = weights(run / "model")
    state[BIAS][0] = value
    save_file(state, str(run / "model" / "model.safetensors"), metadata={"format": "pt"})


def test_uniform_soup_is_the_average(tmp_path: Path, capsys: Any) -> None:
    runs = [make_run(tmp_path, f"r{s}", {"val/acc": 0.1 * s}, seed=s) for s in (1, 2)]
    main([str(r) for r in runs] + ["--out", str(tmp_path / "soup")])
    a, b, soup = weights(runs[0] / "model"), weights(runs[1] / "model"), weights(tmp_path / "soup")
    assert set(soup) == set(a) and any(k.startswith("__rows__") for k in soup)
    assert not torch.equal(a[BIAS], b[BIAS])  # different seeds -> different connectors
    for name, tensor in soup.items():
        if name.startswith("__row_ids__"):
            assert torch.equal(tensor, a[name])
        else:
            assert torch.allclose(tensor, (a[name] + b[name]) / 2, atol=1e-7), name
    module = VLMModule.from_pretrained(tmp_path / "soup")
    assert torch.allclose(module.model.connector.proj[0].bias, soup[BIAS])
    record = json.loads((tmp_path / "soup" / "soup.json").read_text())
    assert record["method"] == "uniform" and len(record["kept"]) == 2
    assert "uniform average of 2 runs" in (tmp_path / "soup" / "README.md").read_text()


def test_lora_soup_averages_merged_weights(tmp_path: Path) -> None:
    runs = []
    for seed, scale in ((1, 0.1), (2, 0.3)):
        module = tiny("mlp", freeze="lora", seed=seed)
        perturb_lora(module, scale)
        runs.append(tmp_path / f"r{seed}")
        module.save_pretrained(runs[-1] / "model")
    write_soup([resolve_source(r) for r in runs], tmp_path / "soup")
    merged = []
    for run in runs:
        module = VLMModule.from_pretrained(run / "model").eval()
        merge_module_lora(module)
        merged.append(module)
    soup = VLMModule.from_pretrained(tmp_path / "soup").eval()
    assert soup.hparams.freeze == "full"
    name = "model.layers.0.self_attn.q_proj.weight"
    mean = sum(m.language_model.state_dict()[name] for m in merged) / 2
    assert torch.allclose(soup.language_model.state_dict()[name], mean, atol=1e-6)
    batch = make_batch(soup, [(1, "How many circles?", "Three.")])
    with torch.no_grad():  # every soup tensor is the mean, so the logits are well defined
        assert torch.isfinite(soup(batch).logits).all()


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"connector_kwargs": {"depth": 1}}, "hparams.connector_kwargs"),
        ({"freeze": "full"}, "hparams.freeze"),
    ],
)
def test_mismatched_config_is_refused(tmp_path: Path, kwargs: dict[str, Any], needle: str) -> None:
    runs = [make_run(tmp_path, "a", None), make_run(tmp_path, "b", None, **kwargs)]
    with pytest.raises(ExportError, match=needle):
        check_compatible([resolve_source(r) for r in runs])


def test_mismatched_tensor_is_refused_by_name(tmp_path: Path, capsys: Any) -> None:
    runs = [make_run(tmp_path, "a", None), make_run(tmp_path, "b", None, seed=3)]
    state = weights(runs[1] / "model")
    state[BIAS] = state[BIAS][:-1].clone()
    save_file(state, str(runs[1] / "model" / "model.safetensors"))
    with pytest.raises(SystemExit) as info:
        main([str(r) for r in runs] + ["--out", str(tmp_path / "soup")])
    assert info.value.code == 2
    assert f"tensor '{BIAS}' has shape/dtype" in capsys.readouterr().err
    with pytest.raises(ExportError, match="'family' differs"):
        flamingo = tmp_path / "f"
        tiny("flamingo").save_pretrained(flamingo)
        check_compatible([resolve_source(runs[0]), resolve_source(flamingo)])


def test_greedy_soup_keeps_helpful_runs_and_drops_harmful_ones(tmp_path: Path) -> None:
    # Ranking by metrics.json: a (0.9) > b (0.8) > c (0.7). The fake evaluator scores a soup
    # by its bias fingerprint: a+b averages to 0.5 (better), a+b+c to 1.0 (worse).
    runs = {
        n: make_run(tmp_path, n, {"val/acc": acc})
        for n, acc in (("c", 0.7), ("a", 0.9), ("b", 0.8))
    }
    for name, value in (("a", 0.0), ("b", 1.0), ("c", 2.0)):
        mark(runs[name], value)
    calls: list[float] = []

    def fake_evaluate(model_dir: Path) -> dict[str, float]:
        value = round(float(weights(model_dir)[BIAS][0]), 4)
        calls.append(value)
        return {"val/acc": {0.5: 0.95, 1.0: 0.5}[value], "val/loss": 1.0}

    sources = [resolve_source(r) for r in runs.values()]
    result = greedy_soup(
        sources, tmp_path / "soup", metric="val/acc", evaluate=fake_evaluate, log=print
    )
    assert calls == [0.5, 1.0]  # a+b, then a+b+c
    assert result.kept == [str(runs["a"]), str(runs["b"])]
    assert [t["kept"] for t in result.trials] == [True, True, False]
    assert result.metrics["val/acc"] == 0.95
    soup = weights(tmp_path / "soup")
    a, b = weights(runs["a"] / "model"), weights(runs["b"] / "model")
    assert torch.allclose(soup[BIAS], (a[BIAS] + b[BIAS]) / 2)


def test_greedy_min_mode_and_ingredients_without_metrics(tmp_path: Path) -> None:
    runs = [make_run(tmp_path, n, None) for n in ("x", "y")]
    mark(runs[0], 0.0)
    mark(runs[1], 4.0)
    losses = {0.0: 2.0, 4.0: 1.0, 2.0: 1.5}  # y alone is best; x+y is worse than y

    def fake_evaluate(model_dir: Path) -> dict[str, float]:
        return {"val/loss": losses[round(float(weights(model_dir)[BIAS][0]), 4)]}

    sources = [resolve_source(r) for r in runs]
    result = greedy_soup(
        sources, tmp_path / "soup", metric="val/loss", mode="min", evaluate=fake_evaluate, log=print
    )
    assert result.kept == [str(runs[1])]
    assert torch.equal(weights(tmp_path / "soup")[BIAS], weights(runs[1] / "model")[BIAS])
    with pytest.raises(ExportError, match="'val/acc' is not among"):
        greedy_soup(sources, tmp_path / "s2", metric="val/acc", evaluate=fake_evaluate)


def test_default_evaluator_runs_fit_validation(tmp_path: Path) -> None:
    from vlm_lit.data.synthetic import make_synthetic_shards

    shards = make_synthetic_shards(tmp_path / "val", num_samples=4, split="val", image_size=32)
    run = make_run(tmp_path, "r", None)
    data = {"train": shards, "val": shards, "batch_size": 2, "val_generation_subset": 2}
    config = {"data": data, "trainer": {"accelerator": "cpu"}, "eval": {"max_new_tokens": 2}}
    metrics = fit_validation(config)(run / "model")
    assert metrics["val/loss"] > 0 and "val/acc" in metrics
    single = fit_validation(config)(run / "model")
    assert single["val/loss"] == metrics["val/loss"]  # deterministic: a fair comparison


def test_default_evaluator_needs_validation_data() -> None:
    with pytest.raises(ExportError, match="data.val"):
        fit_validation({"data": {"train": "x.tar"}})


def test_help(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setattr(sys, "argv", ["vlm_lit.soup", "--help"])
    monkeypatch.delitem(sys.modules, "vlm_lit.soup", raising=False)  # run it fresh as __main__
    with pytest.raises(SystemExit) as info:
        runpy.run_module("vlm_lit.soup", run_name="__main__")
    assert info.value.code == 0
    assert "--greedy" in capsys.readouterr().out
