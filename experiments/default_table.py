"""Run the embedded default once per connector family and print the README's results table.

    python experiments/default_table.py [--families mlp qformer flamingo] [--out runs/default]

Each family runs exactly as a user types it (``python -m vlm_lit.fit --connector NAME``, a
subprocess per family, nothing else changed but the run directory), so the wall time in the
table is what a user waits for, interpreter start-up and the final validation included. The
first family pays for building the shapes world if ``$VLM_LIT_HOME`` has none yet; its build
time is printed separately.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

TASKS = ("vqa_color", "vqa_count", "vqa_position", "vqa_exist", "mc", "multiturn", "compare")


def run_family(family: str, out: Path, extra: list[str]) -> dict[str, float]:
    run_dir = out / family
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "vlm_lit.fit",
            "--connector",
            family,
            "--trainer.default_root_dir",
            str(run_dir),
            *extra,
        ],
        check=True,
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["wall_seconds"] = time.perf_counter() - start
    return metrics


def table(results: dict[str, dict[str, float]]) -> str:
    head = [
        "family",
        "acc",
        *(f"acc {t}" for t in TASKS),
        "blank-image acc",
        "majority",
        "POPE F1",
        "yes-ratio",
        "wall time",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for family, m in results.items():
        cells = [family, f"{m['val/acc']:.3f}"]
        cells += [f"{m[f'val/acc_{t}']:.2f}" if f"val/acc_{t}" in m else "-" for t in TASKS]
        cells += [
            f"{m['val/acc_blank_image']:.3f}",
            f"{m['val/acc_majority']:.3f}",
            f"{m['val/pope_f1']:.3f}",
            f"{m['val/pope_yes_ratio']:.2f}",
            f"{m['wall_seconds'] / 60:.1f} min",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["mlp", "qformer", "flamingo"])
    parser.add_argument("--out", type=Path, default=Path("runs/default"))
    args, extra = parser.parse_known_args()  # anything else goes to every fit run
    from vlm_lit.world import ensure_world

    start = time.perf_counter()
    world = ensure_world()  # built here (once) so the families' times exclude the build
    print(f"shapes world ready in {time.perf_counter() - start:.0f} s: {world.root}")
    results = {family: run_family(family, args.out, extra) for family in args.families}
    (args.out / "table.md").write_text(table(results) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
