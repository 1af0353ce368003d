"""Run a grid's arms through ``vlm_lit.fit`` (in-process or one subprocess each), resumably."""

from __future__ import annotations

import functools
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vlm_lit.ablation.config import arm_config, deep_merge, nest, same_experiment
from vlm_lit.ablation.grid import Arm, Grid
from vlm_lit.ablation.results import ARM_RECORD, model_stats, write_reports

ARM_CONFIG = "arm.yaml"
ARM_ERROR = "error.txt"
Status = Literal["done", "skipped", "failed"]


@dataclass
class RunOptions:
    """How to run a grid (the ``python -m vlm_lit.ablate`` flags)."""

    out_dir: Path
    """grid output directory: one ``ARM/seedN/`` run directory per arm, results at the top"""
    seeds: list[int] | None = None
    """replace the grid's seeds"""
    max_steps: int | None = None
    """``trainer.max_steps`` of every arm (short runs also log every ``max(1, N // 10)`` steps)"""
    world: Literal["default", "micro"] | None = None
    """shapes-world size for arms that take backbones or data from the embedded world"""
    overrides: dict[str, Any] = field(default_factory=dict)
    """dotted fit keys set on every arm, after everything else (``--set KEY=VALUE``)"""
    processes: int = 1
    """arms run at once; 1 runs them in this process (unless ``devices`` is given), more
    runs one subprocess per arm"""
    devices: list[str] | None = None
    """CUDA device ids handed round-robin to subprocess arms (``CUDA_VISIBLE_DEVICES``)"""

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if self.devices and self.processes == 1:
            self.processes = len(self.devices)  # one arm per listed device
        if self.processes < 1:
            raise ValueError(f"--processes must be >= 1, got {self.processes}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1, got {self.max_steps}")

    @property
    def use_subprocesses(self) -> bool:
        """One subprocess per arm: for concurrency, and to pin an arm to a device."""
        return self.processes > 1 or bool(self.devices)

    def fit_overrides(self) -> dict[str, Any]:
        """The nested fit settings these options impose on every arm."""
        extra: dict[str, Any] = {}
        if self.world is not None:
            extra["world"] = self.world
        if self.max_steps is not None:
            extra["trainer"] = {"max_steps": self.max_steps}
        return deep_merge(extra, nest(self.overrides))


@dataclass
class ArmOutcome:
    """What happened to one arm in this invocation."""

    arm: Arm
    run_dir: Path
    status: Status
    wall_seconds: float | None = None
    error: str | None = None


def is_finished(run_dir: Path) -> bool:
    """An arm is finished when its run directory has ``metrics.json`` (fit writes it last)."""
    return (run_dir / "metrics.json").is_file()


def plan(grid: Grid, options: RunOptions) -> list[tuple[Arm, Path, dict[str, Any]]]:
    """Every arm with its run directory and the config it will run with."""
    out = []
    for arm in grid.arms(options.seeds):
        run_dir = (options.out_dir / arm.run_id).resolve()
        config = arm_config(grid, arm, run_dir, options.fit_overrides())
        if options.max_steps is not None:
            trainer = config.setdefault("trainer", {})
            every = int(trainer.get("log_every_n_steps", 50))
            trainer["log_every_n_steps"] = min(every, max(1, options.max_steps // 10))
        out.append((arm, run_dir, config))
    return out


def _check_unchanged(arm: Arm, run_dir: Path, config: dict[str, Any]) -> None:
    saved = run_dir / ARM_CONFIG
    if saved.is_file() and not same_experiment(yaml.safe_load(saved.read_text()), config):
        raise ValueError(
            f"arm {arm.run_id} finished in {run_dir} with a different config than the grid now "
            f"asks for (compare {saved}); pass another --out or delete {run_dir} to rerun it"
        )


def _fit_in_process(config_path: Path, device: str | None) -> None:
    from vlm_lit import fit  # looked up at call time, so tests can swap fit.main

    argv = ["--config", str(config_path)]
    saved = sys.argv
    # LightningCLI warns when sys.argv holds flags besides its args (ours): hide them.
    sys.argv = ["vlm_lit.fit"]
    try:
        fit.main(argv)
    except SystemExit as exc:  # argument errors exit; for a grid that is one failed arm
        if exc.code not in (None, 0):
            raise RuntimeError(f"vlm_lit.fit exited with {exc.code}") from exc
    finally:
        sys.argv = saved


THREAD_VARIABLES: tuple[str, ...] = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def subprocess_env(device: str | None, processes: int, environ: Any = None) -> dict[str, str]:
    """The environment of one arm's ``vlm_lit.fit`` subprocess.

    ``device`` becomes ``CUDA_VISIBLE_DEVICES``. On a CPU (no device), concurrent arms share
    the cores: each gets ``cpu_count // processes`` threads (at least 1) unless the user set
    ``OMP_NUM_THREADS`` already. Without it every arm would start one thread per core, and
    two 2-thread trainings on 2 cores run several times slower than two 1-thread ones.
    """
    env = dict(os.environ if environ is None else environ)
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    elif processes > 1 and "OMP_NUM_THREADS" not in env:
        threads = str(max(1, (os.cpu_count() or 1) // processes))
        env.update({name: threads for name in THREAD_VARIABLES if name not in env})
    return env


def _fit_subprocess(config_path: Path, device: str | None, processes: int = 1) -> None:
    env = subprocess_env(device, processes)
    log_path = config_path.parent / "fit.log"
    with log_path.open("w") as log:
        proc = subprocess.run(
            [sys.executable, "-m", "vlm_lit.fit", "--config", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"vlm_lit.fit exited with {proc.returncode}; see {log_path}")


def _run_arm(
    arm: Arm,
    run_dir: Path,
    config: dict[str, Any],
    fit_fn: Callable[[Path, str | None], None],
    device: str | None,
) -> ArmOutcome:
    if run_dir.exists():  # an interrupted attempt: start clean, not on top of its files
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    config_path = run_dir / ARM_CONFIG
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    start = time.perf_counter()
    try:
        fit_fn(config_path, device)
        if not is_finished(run_dir):
            raise RuntimeError(f"vlm_lit.fit returned but wrote no {run_dir / 'metrics.json'}")
    except Exception as exc:  # one broken arm must not stop the grid; it is reported
        (run_dir / ARM_ERROR).write_text(traceback.format_exc())
        return ArmOutcome(arm, run_dir, "failed", error=f"{type(exc).__name__}: {exc}")
    wall = round(time.perf_counter() - start, 2)
    record = {"arm": arm.name, "seed": arm.seed, "labels": arm.labels, "wall_seconds": wall}
    record.update(model_stats(run_dir))
    partial = run_dir / (ARM_RECORD + ".partial")  # atomic: other arms' reports read it
    partial.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(partial, run_dir / ARM_RECORD)
    return ArmOutcome(arm, run_dir, "done", wall_seconds=wall)


def run_grid(
    grid: Grid, options: RunOptions, *, log: Callable[[str], None] = print
) -> list[ArmOutcome]:
    """Run every unfinished arm, then write ``results.csv``, ``summary.csv`` and the plots.

    Finished arms (``metrics.json`` present) are skipped, after checking that their saved
    config is still the one the grid describes. A failing arm is recorded (``error.txt``)
    and the others still run. Results are rewritten after every arm, so a long grid can be
    inspected while it runs.
    """
    options.out_dir.mkdir(parents=True, exist_ok=True)
    if grid.source is not None:
        shutil.copyfile(grid.source, options.out_dir / "grid.yaml")
    planned = plan(grid, options)
    outcomes: list[ArmOutcome] = []
    todo = []
    for arm, run_dir, config in planned:
        if is_finished(run_dir):
            _check_unchanged(arm, run_dir, config)
            outcomes.append(ArmOutcome(arm, run_dir, "skipped"))
        else:
            todo.append((arm, run_dir, config))
    log(f"grid {grid.name}: {len(planned)} arms, {len(outcomes)} finished, {len(todo)} to run")
    arms = [arm for arm, _, _ in planned]
    lock = threading.Lock()
    devices: queue.Queue[str | None] = queue.Queue()
    for i in range(options.processes):
        devices.put(options.devices[i % len(options.devices)] if options.devices else None)
    fit_fn: Callable[[Path, str | None], None] = _fit_in_process
    if options.use_subprocesses:
        fit_fn = functools.partial(_fit_subprocess, processes=options.processes)

    def one(item: tuple[Arm, Path, dict[str, Any]]) -> ArmOutcome:
        arm, run_dir, config = item
        device = devices.get()
        try:
            log(f"[{arm.run_id}] running in {run_dir}")
            outcome = _run_arm(arm, run_dir, config, fit_fn, device)
        finally:
            devices.put(device)
        with lock:
            log(
                f"[{arm.run_id}] {outcome.status}"
                + (f" in {outcome.wall_seconds:.1f} s" if outcome.wall_seconds else "")
                + (f": {outcome.error}" if outcome.error else "")
            )
            write_reports(grid, arms, options.out_dir, plots=False)
        return outcome

    if options.processes == 1:  # also with one device: its subprocesses run one at a time
        outcomes += [one(item) for item in todo]
    else:
        with ThreadPoolExecutor(max_workers=options.processes) as pool:
            outcomes += list(pool.map(one, todo))
    write_reports(grid, arms, options.out_dir, plots=True)
    return outcomes
