"""Every benchmark script runs end to end with --quick and writes a JSON of sane measurements."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

BENCH = Path(__file__).parents[1] / "experiments" / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(name: str, tmp_path: Path, *extra: str) -> dict[str, Any]:
    out = tmp_path / f"{name}.json"
    result = _load(name).main(["--quick", "--threads", "1", "--out", str(out), *extra])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["machine"]["threads"] >= 1 and saved["machine"]["torch"]
    return saved


@pytest.fixture(autouse=True)
def _restore_process_state() -> Any:
    """The scripts add their folder to sys.path and set torch's thread count."""
    before, threads = list(sys.path), torch.get_num_threads()
    yield
    sys.path[:] = before
    torch.set_num_threads(threads)


def test_step_throughput_quick_pairs_each_family_with_its_reference(tmp_path: Path) -> None:
    saved = _run("step_throughput", tmp_path, "--presets", "align")
    rows = {r["family"]: r for r in saved["rows"]}
    assert set(rows) == {"mlp", "qformer", "flamingo"}
    assert rows["mlp"]["reference"] == "LlavaForConditionalGeneration"
    for row in rows.values():
        assert row["ratio"] > 0 and row["vlm_lit_tok_s"] > 0 and row["reference_tok_s"] > 0
        assert 0.5 < row["flop_ratio"] < 2
        assert row["trainable_reference"] > 0 and row["trainable_vlm_lit"] > 0
    # Llava gets every vlm_lit weight: the same model, so the same loss before training.
    assert rows["mlp"]["loss_vlm_lit"] == pytest.approx(rows["mlp"]["loss_reference"], abs=1e-4)
    # Flamingo's gates start at 0 (so does Idefics' alpha): both equal their identical LM.
    flamingo = rows["flamingo"]
    assert flamingo["loss_vlm_lit"] == pytest.approx(flamingo["loss_reference"], abs=1e-4)


def test_framework_overhead_quick(tmp_path: Path) -> None:
    row = _run("framework_overhead", tmp_path)["rows"][0]
    assert row["plain_steps_s"] > 0 and row["lightning_steps_s"] > 0 and row["ratio"] > 0


def test_mfu_quick_counts_flops_and_explains_low_utilisation(tmp_path: Path) -> None:
    row = _run("mfu", tmp_path)["rows"][0]
    assert row["step_gflop"] > 0 and row["peak_mm_gflops"] > 0 and 0 < row["mfu"] < 10
    if row["mfu"] < 0.5:
        assert row["top_ops"] and all(op["self_ms"] >= 0 for op in row["top_ops"])


def test_packing_quick_same_tokens_less_padding(tmp_path: Path) -> None:
    saved = _run("packing", tmp_path)
    padded, packed = saved["results"]
    assert padded["supervised"] == packed["supervised"] > 0
    assert packed["padding_fraction"] < padded["padding_fraction"]
    assert saved["speedup"] > 0


def test_token_scaling_quick_writes_rows_and_plot(tmp_path: Path) -> None:
    saved = _run("token_scaling", tmp_path)
    assert {(r["family"], r["visual_tokens"]) for r in saved["rows"]} == {
        (f, t) for f in ("mlp", "qformer", "flamingo") for t in (4, 16)
    }
    assert Path(saved["plot"]).stat().st_size > 1000
