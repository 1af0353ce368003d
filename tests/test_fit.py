"""The `python -m vlm_lit.fit` command line: parsing, errors, and micro end-to-end runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vlm_lit.ablation.config import flatten
from vlm_lit.fit import DEFAULT_CONFIG, default_config_files, main

ROOT = Path(__file__).resolve().parents[1]
# fit configs only: experiments/grids/ holds ablation grids (parsed by tests/test_ablate.py)
EXPERIMENT_YAMLS = sorted(
    p
    for p in (ROOT / "experiments").rglob("*.yaml")
    if "grids" not in p.relative_to(ROOT / "experiments").parts
)


@pytest.fixture(scope="module")
def world_home(micro_world_home: Path) -> Path:
    """The session's micro shapes world (see conftest.py)."""
    return micro_world_home


def micro_args(tmp_path: Path, connector: str, steps: int = 2) -> list[str]:
    return [
        "--connector",
        connector,
        "--world",
        "micro",
        "--trainer.max_steps",
        str(steps),
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.logger",
        "false",
        "--data.batch_size",
        "4",
        "--data.val_generation_subset",
        "8",
        "--eval.max_new_tokens",
        "3",
    ]


def test_help_lists_short_flags_and_typed_groups(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--connector",
        "--freeze",
        "--seed",
        "--model.freeze",
        "--model.lr_connector",
        "--data.batch_size",
        "--data.allow_pipe",
        "--trainer.max_steps",
    ):
        assert flag in text, flag


def test_unknown_connector_names_valid_ones() -> None:
    with pytest.raises(
        SystemExit, match=r"--connector 'perceiver'.*\['flamingo', 'mlp', 'qformer'\]"
    ):
        main(["--connector", "perceiver"])


def test_unknown_freeze_preset_names_valid_ones() -> None:
    with pytest.raises(SystemExit, match=r"--freeze 'everything'.*align"):
        main(["--freeze", "everything"])


def test_bad_flag_is_a_parse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--model.lr_conector", "1e-3", "--print_config"])
    assert exit_info.value.code != 0
    assert "lr_conector" in capsys.readouterr().err


def test_print_config_shows_short_flags_applied(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "--connector",
                "qformer",
                "--freeze",
                "lora",
                "--seed",
                "7",
                "--eval.num_samples",
                "37",
                "--print_config",
            ]
        )
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "connector: qformer" in out
    assert "freeze: lora" in out
    assert "seed_everything: 7" in out
    assert "val_generation_subset: 37" in out


@pytest.mark.parametrize("connector", ["mlp", "qformer", "flamingo"])
def test_embedded_recipe_applies_the_family_overrides(
    connector: str, capsys: pytest.CaptureFixture[str]
) -> None:
    files = default_config_files(connector)
    assert files[0] == DEFAULT_CONFIG and all(f.is_file() for f in files)
    own: dict = {}
    for f in files[1:]:
        own.update(flatten(yaml.safe_load(f.read_text())["model"]))
    with pytest.raises(SystemExit):
        main(["--connector", connector, "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["max_steps"] == 800  # the shared recipe still applies
    model = flatten(printed["model"])
    for key, value in own.items():  # ... and the family's own file on top of it
        assert model[key] == value, key
    if connector == "flamingo":
        assert model["connector_kwargs.gate_init"] == 0.1
    with pytest.raises(SystemExit):  # a flag still wins over both files
        main(["--connector", connector, "--model.lr_gates", "0.01", "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["model"]["lr_gates"] == 0.01


def test_eval_num_samples_in_a_config_file_sets_the_generation_subset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "eval.yaml"
    config.write_text("eval:\n  num_samples: 41\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    assert "val_generation_subset: 41" in capsys.readouterr().out


@pytest.mark.parametrize("path", EXPERIMENT_YAMLS, ids=[p.name for p in EXPERIMENT_YAMLS])
def test_every_experiment_yaml_parses(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(path), "--print_config"])
    assert exit_info.value.code == 0, capsys.readouterr().err


@pytest.mark.parametrize("connector", ["mlp", "qformer", "flamingo"])
def test_micro_fit_writes_metrics_config_and_model(
    world_home: Path, tmp_path: Path, connector: str
) -> None:
    metrics = main(micro_args(tmp_path, connector))
    written = json.loads((tmp_path / "metrics.json").read_text())
    for key in (
        "val/loss",
        "val/acc",
        "val/acc_blank_image",
        "val/acc_majority",
        "val/pope_f1",
        "val/pope_yes_ratio",
        "global_step",
    ):
        assert key in written, key
    assert written["global_step"] == 2
    assert written["val/loss"] == pytest.approx(metrics["val/loss"])
    assert (tmp_path / "config.yaml").is_file()
    assert f"connector: {connector}" in (tmp_path / "config.yaml").read_text()
    assert (tmp_path / "model" / "config.json").is_file()


def test_default_loggers_write_csv_tensorboard_and_throughput(
    world_home: Path, tmp_path: Path
) -> None:
    """No --trainer.logger: metrics.csv always (and TensorBoard events when installed) in one
    version folder, with loss, learning rates, samples/s and supervised tokens/s."""
    import csv

    from vlm_lit.loggers import tensorboard_available

    args = micro_args(tmp_path, "mlp", steps=5)
    at = args.index("--trainer.logger")
    del args[at : at + 2]
    # unpacked, so that every batch holds exactly batch_size samples
    main([*args, "--trainer.log_every_n_steps", "2", "--data.packing", "false"])
    version = tmp_path / "lightning_logs" / "version_0"
    rows = list(csv.DictReader((version / "metrics.csv").open()))
    columns = set(rows[0])
    for key in ("train/loss", "train/samples_per_sec", "train/supervised_tokens_per_sec"):
        assert key in columns, sorted(columns)
    assert any(c.startswith("lr/") for c in columns), sorted(columns)
    speeds = [r for r in rows if r["train/samples_per_sec"]]
    assert speeds, "no throughput row"
    for row in speeds:  # batch size 4: samples/s x s/step is the batch size
        per_step = float(row["train/sec_per_step"])
        assert float(row["train/samples_per_sec"]) * per_step == pytest.approx(4.0)
        assert float(row["train/supervised_tokens_per_sec"]) > 0
    assert any(version.glob("events.out.tfevents.*")) == tensorboard_available()


def test_throughput_counts_packed_samples_and_skips_padding_batches() -> None:
    import torch

    from vlm_lit.loggers import batch_samples

    ids = torch.zeros(2, 8, dtype=torch.long)
    assert batch_samples({"input_ids": ids, "keys": ["a", "b", "c", "d", "e"]}) == 5
    assert batch_samples({"input_ids": ids, "keys": ["a"], "is_padding": True}) == 0
    assert batch_samples({"input_ids": ids}) == 2


def test_module_entry_point_runs_as_documented(world_home: Path, tmp_path: Path) -> None:
    """`python -m vlm_lit.fit` (the README's form) in a subprocess, micro world."""
    import os

    env = {**os.environ, "VLM_LIT_HOME": str(world_home)}
    proc = subprocess.run(
        [sys.executable, "-m", "vlm_lit.fit", *micro_args(tmp_path, "mlp", steps=1)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "metrics.json").is_file()


def test_two_stage_init_from_round_trip(world_home: Path, tmp_path: Path) -> None:
    """Stage 1 (align) writes DIR/model; stage 2 (full) starts from exactly those tensors."""
    import torch

    from vlm_lit.models import VLMModule

    stage1, stage2 = tmp_path / "align", tmp_path / "finetune"
    main([*micro_args(stage1, "mlp"), "--freeze", "align"])
    aligned = VLMModule.from_pretrained(stage1 / "model")
    resumed = VLMModule.from_pretrained(
        stage1 / "model", freeze="full", seed=123, init_from=str(stage1 / "model")
    )
    for (name, a), (_, b) in zip(
        aligned.connector.state_dict().items(), resumed.connector.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    main(
        [*micro_args(stage2, "mlp"), "--freeze", "full", "--model.init_from", str(stage1 / "model")]
    )
    assert (stage2 / "metrics.json").is_file()


def test_init_from_other_family_is_refused(world_home: Path, tmp_path: Path) -> None:
    from vlm_lit.models import build_vlm

    first = build_vlm("mlp", size="tiny")
    first.save_pretrained(tmp_path / "mlp")
    with pytest.raises(ValueError, match="--connector mlp"):
        build_vlm("qformer", size="tiny", init_from=str(tmp_path / "mlp"))


def test_recipe_yaml_with_world_parts_runs(world_home: Path, tmp_path: Path) -> None:
    """A recipe naming `shapes-world:align` / `shapes-world:val` resolves and trains."""
    recipe = ROOT / "experiments" / "recipes" / "mlp_align.yaml"
    main(
        [
            "--config",
            str(recipe),
            "--world",
            "micro",
            "--trainer.max_steps",
            "1",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.logger",
            "false",
            "--data.batch_size",
            "4",
            "--data.val_generation_subset",
            "4",
            "--eval.max_new_tokens",
            "2",
        ]
    )
    config = (tmp_path / "config.yaml").read_text()
    assert "shapes-world:" not in config and "/align/" in config
