"""The notebooks: committed without outputs, and executed end to end (reduced mode) by nbclient."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
KERNEL = "vlm-lit-test"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_committed_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {index} has outputs"
            assert cell.execution_count is None, f"{path.name} cell {index} has a count"


def test_both_notebooks_exist() -> None:
    assert {p.name for p in NOTEBOOKS} >= {"connector_ablation.ipynb", "inspect_masking.ipynb"}


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory: pytest.TempPathFactory) -> KernelSpecManager:
    """A kernelspec that starts *this* interpreter (the venv's), whatever other python3
    kernels the machine has registered."""
    from ipykernel.kernelspec import write_kernel_spec

    kernels = tmp_path_factory.mktemp("kernels")
    write_kernel_spec(kernels / KERNEL, overrides={"display_name": "vlm_lit test"})
    manager = KernelSpecManager(kernel_dirs=[str(kernels)])
    assert manager.get_kernel_spec(KERNEL).argv[0] == sys.executable
    return manager


@pytest.fixture(scope="module")
def world_home(micro_world_home: Path) -> Path:
    """The session's micro shapes world (built once, see conftest.py)."""
    return micro_world_home


def execute(path: Path, workdir: Path, specs: KernelSpecManager) -> nbformat.NotebookNode:
    """Run every cell in a kernel started from ``sys.executable``, with ``workdir`` as cwd."""
    nb = nbformat.read(path, as_version=4)
    manager = KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)
    client = NotebookClient(
        nb, km=manager, timeout=600, resources={"metadata": {"path": str(workdir)}}
    )
    client.execute()
    return nb


def _outputs(nb: nbformat.NotebookNode, mime: str) -> list[str]:
    return [
        str(out.get("data", {}).get(mime, ""))
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if mime in out.get("data", {})
    ]


def _stream(nb: nbformat.NotebookNode) -> str:
    return "".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.get("output_type") == "stream"
    )


def test_inspect_masking_renders_every_sample_kind(
    kernel_specs: KernelSpecManager, tmp_path: Path
) -> None:
    nb = execute(ROOT / "notebooks" / "inspect_masking.ipynb", tmp_path, kernel_specs)
    pages = _outputs(nb, "text/html")
    kinds = [
        "caption",
        "VQA",
        "multiple choice",
        "multi-turn",
        "two-image comparison",
        "interleaved document",
        "text-only",
    ]
    for kind in kinds:
        page = next((p for p in pages if p.startswith(f"<h4>{kind}:")), None)
        assert page is not None, f"no rendering of {kind}"
        assert 'class="supervised"' in page and 'class="masked"' in page, kind
    images = [p for p in pages if 'class="image"' in p]
    assert len(images) >= 4  # caption, VQA, multiple choice, comparison, document have images
    assert "masking checks passed" in _stream(nb)


def test_connector_ablation_runs_in_reduced_mode(
    kernel_specs: KernelSpecManager,
    world_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "out"
    monkeypatch.setenv("VLM_LIT_NOTEBOOK_QUICK", "1")  # the kernel inherits this environment
    monkeypatch.setenv("VLM_LIT_NOTEBOOK_OUT", str(out))
    nb = execute(ROOT / "notebooks" / "connector_ablation.ipynb", tmp_path, kernel_specs)
    with (out / "quick" / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["arm"] for r in rows) == ["flamingo", "mlp"]
    assert {r["global_step"] for r in rows} == {"2"}
    assert len(_outputs(nb, "image/png")) == 2  # loss curves and accuracy, inline
    table = "".join(_outputs(nb, "text/markdown"))
    assert "| mlp | 1 |" in table and "| flamingo | 1 |" in table
