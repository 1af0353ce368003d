"""``python -m vlm_lit.ablate``: grid expansion, arm configs, a micro grid run, resume, reports."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from vlm_lit import ablate
from vlm_lit.ablation import Grid, RunOptions, arm_config, load_grid, plan, run_grid
from vlm_lit.ablation import runner as runner_module

ROOT = Path(__file__).resolve().parents[1]
GRIDS = sorted((ROOT / "experiments" / "grids").glob("*.yaml"))
MICRO = [
    "--world",
    "micro",
    "--max-steps",
    "2",
    "--set",
    "data.batch_size=4",
    "data.val_generation_subset=8",
    "eval.max_new_tokens=3",
]


def write_grid(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_dry_run_lists_cartesian_product_times_seeds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    grid = write_grid(
        tmp_path / "g.yaml",
        {
            "axes": {"connector": ["mlp", "qformer", "flamingo"], "freeze": ["align", "lora"]},
            "seeds": [0, 1],
        },
    )
    assert ablate.main([str(grid), "--dry-run", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    expected = {
        f"connector-{c}__freeze-{f}/seed{s}"
        for c in ("mlp", "qformer", "flamingo")
        for f in ("align", "lora")
        for s in (0, 1)
    }
    listed = {line.split()[0] for line in out.splitlines()[1:]}
    assert listed == expected
    assert "12 arms (6 cells x 2 seeds)" in out
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
    ablate.main([str(grid), "--dry-run", "--seeds", "7", "8", "9"])
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert len(listed) == 18 and {x.rsplit("/", 1)[1] for x in listed} == {
        "seed7",
        "seed8",
        "seed9",
    }


def test_sweeps_bundles_and_config_merge(tmp_path: Path) -> None:
    grid = Grid.from_dict(
        {
            "base": {
                "freeze": "full",
                "model.connector_kwargs": {"depth": 2},
                "trainer.max_steps": 9,
            },
            "sweeps": [
                {
                    "connector": {
                        "pooled": {
                            "connector": "mlp",
                            "model.connector_kwargs.token_reduction": "avgpool",
                        }
                    },
                    "model.connector_kwargs.num_tokens": [1, 4],
                },
                {"connector": ["flamingo"], "model.connector_kwargs.gated": [True, False]},
            ],
            "seeds": [3],
        }
    )
    names = [arm.name for arm in grid.arms()]
    assert names == [
        "pooled__num_tokens-1",
        "pooled__num_tokens-4",
        "connector-flamingo__gated-true",
        "connector-flamingo__gated-false",
    ]
    arm = grid.arms()[1]
    config = arm_config(grid, arm, tmp_path / "run", {"trainer": {"max_steps": 2}})
    # the axis keys merge into the base's connector_kwargs instead of replacing them
    assert config["model"]["connector_kwargs"] == {
        "depth": 2,
        "token_reduction": "avgpool",
        "num_tokens": 4,
    }
    assert config["connector"] == "mlp" and config["seed"] == 3 and config["freeze"] == "full"
    assert config["trainer"]["max_steps"] == 2
    assert config["trainer"]["default_root_dir"] == str(tmp_path / "run")
    assert config["trainer"]["logger"]["class_path"].endswith("CSVLogger")
    # no base config files: the embedded default recipe is the base
    import yaml

    from vlm_lit.configs import DEFAULT_CONFIG

    default = yaml.safe_load(DEFAULT_CONFIG.read_text())
    assert config["data"]["batch_size"] == default["data"]["batch_size"]
    assert "gate_init" not in config["model"]["connector_kwargs"]  # mlp: no override file
    # ... and each arm gets its own family's overrides on top, as `fit --connector` does
    flamingo = arm_config(grid, grid.arms()[2], tmp_path / "run")
    kwargs = flamingo["model"]["connector_kwargs"]
    assert kwargs["gate_init"] == 0.1 and kwargs["gated"] is True and kwargs["depth"] == 2
    assert flamingo["data"]["batch_size"] == default["data"]["batch_size"]
    with_base = Grid.from_dict(
        {"base": {"config": str(DEFAULT_CONFIG)}, "axes": {"connector": ["flamingo"]}}
    )
    with_base_config = arm_config(with_base, with_base.arms()[0], tmp_path)
    assert "connector_kwargs" not in with_base_config.get("model", {})


def test_grid_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['axis'\]"):
        Grid.from_dict({"axis": {"connector": ["mlp"]}})
    with pytest.raises(ValueError, match="exactly one of `axes`"):
        Grid.from_dict({"seeds": [0]})
    with pytest.raises(ValueError, match="seeds must be distinct"):
        Grid.from_dict({"axes": {"connector": ["mlp"]}, "seeds": [1, 1]})
    with pytest.raises(ValueError, match="same arm twice"):
        Grid.from_dict({"sweeps": [{"connector": ["mlp"]}, {"connector": ["mlp"]}]})
    with pytest.raises(SystemExit, match="base.config .*missing.yaml does not exist"):
        ablate.main(
            [
                str(
                    write_grid(
                        tmp_path / "g.yaml",
                        {"base": {"config": "missing.yaml"}, "axes": {"connector": ["mlp"]}},
                    )
                ),
                "--dry-run",
            ]
        )
    grid = write_grid(tmp_path / "ok.yaml", {"axes": {"connector": ["mlp"]}})
    with pytest.raises(SystemExit, match="expected KEY=VALUE"):
        ablate.main([str(grid), "--dry-run", "--set", "batch_size"])


def test_default_base_is_the_fit_default() -> None:
    from vlm_lit.configs import DEFAULT_CONFIG
    from vlm_lit.fit import DEFAULT_CONFIG as FIT_DEFAULT

    assert DEFAULT_CONFIG == FIT_DEFAULT.resolve() and DEFAULT_CONFIG.is_file()


@pytest.fixture(scope="module")
def world_home(micro_world_home: Path) -> Path:
    """The session's micro shapes world (built once, see conftest.py)."""
    return micro_world_home


@pytest.mark.parametrize("path", GRIDS, ids=[p.name for p in GRIDS])
def test_every_grid_cell_builds_a_model(world_home: Path, path: Path) -> None:
    """Each cell's fit config parses and its model builds on the world's backbones (this
    catches e.g. more pooled tokens than the tower has patches)."""
    from vlm_lit import fit
    from vlm_lit.models.registry import CONNECTORS
    from vlm_lit.world import ensure_world

    grid = load_grid(path)
    assert len(grid.seeds) >= 2, "every grid arm needs at least 2 seeds"
    world = ensure_world(profile="micro")
    items = plan(grid, RunOptions(out_dir=world_home / "plan", world="micro", seeds=[0]))
    for index, (_, run_dir, config) in enumerate(items):
        model_args = {
            k: v for k, v in config["model"].items() if k not in ("vision", "language_model")
        }
        module = CONNECTORS[config["connector"]](
            vision=world.vision_spec(),
            language_model=world.language_model_spec(),
            **{**model_args, "freeze": config.get("freeze", "align")},
        )
        if "num_tokens" in config["model"].get("connector_kwargs", {}):
            assert (
                module.model.tokens_per_image == config["model"]["connector_kwargs"]["num_tokens"]
            )
        if index == 0:  # the CLI accepts the arm file as it is written to disk
            run_dir.mkdir(parents=True)
            (run_dir / "arm.yaml").write_text(yaml.safe_dump(config))
            with pytest.raises(SystemExit) as exit_info:
                fit.main(["--config", str(run_dir / "arm.yaml"), "--print_config"])
            assert exit_info.value.code == 0


@pytest.fixture(scope="module")
def micro_grid(world_home: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 2-arm x 1-seed grid run once with the CLI on the micro world (2 steps per arm)."""
    tmp = tmp_path_factory.mktemp("grid")
    grid = write_grid(
        tmp / "micro.yaml",
        {
            "base": {"freeze": "align"},
            "axes": {
                "connector": {
                    "mlp": {"connector": "mlp"},
                    "qformer": {
                        "connector": "qformer",
                        "model.connector_kwargs": {
                            "num_queries": 3,
                            "hidden_size": 32,
                            "num_layers": 1,
                            "num_heads": 2,
                            "cross_attention_frequency": 1,
                        },
                    },
                }
            },
            "seeds": [0],
        },
    )
    out = tmp / "out"
    assert ablate.main([str(grid), "--out", str(out), *MICRO]) == 0
    return grid, out


def test_micro_grid_writes_results_and_plots(micro_grid: tuple[Path, Path]) -> None:
    _, out = micro_grid
    rows = read_rows(out / "results.csv")
    assert [(r["arm"], r["seed"]) for r in rows] == [("mlp", "0"), ("qformer", "0")]
    for column in (
        "connector",
        "status",
        "wall_seconds",
        "trainable_params",
        "total_params",
        "tokens_per_image",
        "supervised_tokens_seen",
        "val/loss",
        "val/acc",
        "val/acc_blank_image",
        "train_seconds",
    ):
        assert all(r[column] != "" for r in rows), column
    by_arm = {r["arm"]: r for r in rows}
    assert by_arm["mlp"]["tokens_per_image"] == "9"  # 3x3 patches, no pooling
    assert by_arm["qformer"]["tokens_per_image"] == "3"
    for arm, row in by_arm.items():
        metrics = json.loads((out / arm / "seed0" / "metrics.json").read_text())
        assert float(row["val/loss"]) == pytest.approx(metrics["val/loss"])
        logged = read_rows(out / arm / "seed0" / "logs" / "metrics.csv")
        tokens = sum(
            float(r["train/supervised_tokens"]) for r in logged if r["train/supervised_tokens"]
        )
        assert float(row["supervised_tokens_seen"]) == pytest.approx(tokens) and tokens > 0
    # align trains the connector (+ new rows) only: different connectors, different counts
    assert by_arm["mlp"]["trainable_params"] != by_arm["qformer"]["trainable_params"]
    for name in ("loss_curves.png", "accuracy.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    from vlm_lit.ablation import collect_rows, format_summary, load_grid, summarize

    grid = load_grid(micro_grid[0])
    table = format_summary(summarize(collect_rows(grid, grid.arms(), out))).splitlines()
    assert table[0].startswith("| arm | seeds | acc | acc_blank_image |")
    assert "_std" not in table[0] and len(table) == 4  # header, rule, one line per arm
    summary = read_rows(out / "summary.csv")
    assert {r["arm"] for r in summary} == {"mlp", "qformer"}
    assert all(float(r["val/acc_std"]) == 0.0 for r in summary)  # one seed


def test_resume_skips_finished_arms(
    micro_grid: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    grid, out = micro_grid
    done = out / "mlp" / "seed0" / "metrics.json"
    before = done.stat().st_mtime_ns
    (out / "qformer" / "seed0" / "metrics.json").unlink()  # as if killed before the end
    calls: list[list[str]] = []

    def fake_fit(argv: list[str]) -> dict[str, float]:
        calls.append(argv)
        raise RuntimeError("simulated crash")

    from vlm_lit import fit

    monkeypatch.setattr(fit, "main", fake_fit)
    assert ablate.main([str(grid), "--out", str(out), *MICRO]) == 1  # the rerun arm failed
    assert calls == [["--config", str(out / "qformer" / "seed0" / "arm.yaml")]]
    assert done.stat().st_mtime_ns == before
    rows = {r["arm"]: r for r in read_rows(out / "results.csv")}
    assert rows["mlp"]["status"] == "done" and rows["qformer"]["status"] == "failed"
    assert "simulated crash" in (out / "qformer" / "seed0" / "error.txt").read_text()
    # a finished arm whose config no longer matches the grid is an error, not a silent reuse
    with pytest.raises(SystemExit, match="different config"):
        ablate.main([str(grid), "--out", str(out), *MICRO, "model.lr_connector=0.5"])


def test_subprocess_mode_hands_out_devices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--processes/--devices: every arm runs once, each with one of the listed devices."""
    seen: list[tuple[str, str | None]] = []

    def fake_subprocess(config_path: Path, device: str | None, processes: int = 1) -> None:
        assert processes == 2
        seen.append((config_path.parent.parent.name, device))
        run = config_path.parent
        (run / "logs").mkdir()
        (run / "logs" / "metrics.csv").write_text(
            "step,train/loss,train/supervised_tokens\n0,2.0,5\n"
        )
        # as fit does: written last and atomically (other arms' threads read it meanwhile)
        (run / "metrics.partial").write_text(json.dumps({"val/acc": 0.5, "global_step": 1}))
        (run / "metrics.partial").replace(run / "metrics.json")

    monkeypatch.setattr(runner_module, "_fit_subprocess", fake_subprocess)
    monkeypatch.setattr(runner_module, "model_stats", lambda run_dir: {"trainable_params": 1})
    grid = Grid.from_dict({"axes": {"connector": ["mlp", "qformer", "flamingo"]}})
    options = RunOptions(out_dir=tmp_path, devices=["0", "1"])
    assert options.processes == 2
    outcomes = run_grid(grid, options, log=lambda _: None)
    assert sorted(o.status for o in outcomes) == ["done"] * 3
    assert sorted(name for name, _ in seen) == sorted(a.name for a in grid.arms())
    assert {device for _, device in seen} <= {"0", "1"}
    assert len(read_rows(tmp_path / "results.csv")) == 3


def test_report_never_overwrites_the_record_a_concurrent_arm_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Arms run two at a time: one arm's report may read another arm that has just written
    metrics.json but not yet its record; the record the runner writes must win."""
    from vlm_lit.ablation import results as results_module

    grid = Grid.from_dict({"axes": {"connector": ["mlp"]}})
    arm = grid.arms()[0]
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"val/acc": 0.5, "global_step": 3}))
    record = run / results_module.ARM_RECORD

    def slow_stats(run_dir: Path) -> dict[str, int]:
        # while the report counts parameters, the arm's runner finishes and writes its record
        record.write_text(json.dumps({"wall_seconds": 12.5, "trainable_params": 7}))
        return {"trainable_params": 7}

    monkeypatch.setattr(results_module, "model_stats", slow_stats)
    row = results_module.arm_row(arm, run, ["connector"])
    assert row["wall_seconds"] == 12.5
    assert json.loads(record.read_text())["wall_seconds"] == 12.5


def test_concurrent_cpu_arms_share_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner_module.os, "cpu_count", lambda: 8)
    env = runner_module.subprocess_env(None, processes=2, environ={"PATH": "/bin"})
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "4" and env["PATH"] == "/bin"
    assert runner_module.subprocess_env(None, 16, environ={})["OMP_NUM_THREADS"] == "1"
    # one arm at a time, a GPU per arm, or the user's own setting: left alone
    assert "OMP_NUM_THREADS" not in runner_module.subprocess_env(None, 1, environ={})
    gpu = runner_module.subprocess_env("1", 2, environ={})
    assert gpu["CUDA_VISIBLE_DEVICES"] == "1" and "OMP_NUM_THREADS" not in gpu
    own = runner_module.subprocess_env(None, 2, environ={"OMP_NUM_THREADS": "3"})
    assert own["OMP_NUM_THREADS"] == "3" and "MKL_NUM_THREADS" not in own


def readme_commands() -> list[list[str]]:
    """Every ``python -m vlm_lit.ablate ...`` line of experiments/README.md, as argv."""
    import shlex

    text = (ROOT / "experiments" / "README.md").read_text()
    prefix = "python -m vlm_lit.ablate "
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith(prefix)]
    return [shlex.split(line.removeprefix(prefix).split(" #")[0]) for line in lines]


def test_readme_commands_parse_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's commands, with --dry-run added: flags exist and the grids load."""
    commands = readme_commands()
    assert len(commands) >= 3
    monkeypatch.chdir(ROOT)
    for argv in commands:
        assert ablate.main([*argv, "--dry-run"]) == 0, argv
        assert "arms (" in capsys.readouterr().out
