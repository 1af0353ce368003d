"""The data-throughput benchmark runs end to end in --quick mode and writes its JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "experiments" / "benchmarks" / "data_throughput.py"


def test_data_throughput_quick_writes_ratios(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("data_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "bench.json"
    result = module.main(["--quick", "--workers", "0", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    rows = {(r["loader"], r["num_workers"], r["measure"]): r for r in saved["rows"]}
    kinds = ("datamodule", "llava_map")
    assert set(rows) == {(k, 0, m) for k in kinds for m in ("speed", "memory")}
    # both loaders saw the same samples (the datamodule epoch is whole batches of them)
    assert all(r["samples"] == 64 for r in saved["rows"])
    # speed runs are timed without the memory probe; memory runs carry no timing
    assert all(rows[k, 0, "speed"]["samples_per_s"] > 0 for k in kinds)
    assert all("peak_pss_mb" not in rows[k, 0, "speed"] for k in kinds)
    assert all(rows[k, 0, "memory"]["peak_pss_mb"] > 0 for k in kinds)
    assert all("samples_per_s" not in rows[k, 0, "memory"] for k in kinds)
    ratio = saved["ratios_datamodule_over_llava"]["0"]
    assert ratio["samples_per_s"] > 0 and ratio["peak_pss"] > 0
    # --quick checks that both loaders produce equal batches (up to order) before timing
    assert saved["equal_batches"] == {"samples": 64, "batches": 8}
