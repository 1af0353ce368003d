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
    rows = {(r["loader"], r["num_workers"]): r for r in saved["rows"]}
    assert set(rows) == {("datamodule", 0), ("llava_map", 0)}
    # both loaders saw the same samples (the datamodule epoch is whole batches of them)
    assert rows["llava_map", 0]["samples"] == 64
    assert rows["datamodule", 0]["samples"] == 64
    assert all(r["samples_per_s"] > 0 and r["peak_pss_mb"] > 0 for r in saved["rows"])
    ratio = saved["ratios_datamodule_over_llava"]["0"]
    assert ratio["samples_per_s"] > 0 and ratio["peak_pss"] > 0
    # --quick checks that both loaders produce equal batches (up to order) before timing
    assert saved["equal_batches"] == {"samples": 64, "batches": 8}
