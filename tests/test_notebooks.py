"""The notebooks run top to bottom on small settings, and are stored without outputs."""

from pathlib import Path

import nbformat
import pytest
from helpers import write_run
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["01_forward_process", "02_sampling", "03_ablation"]


@pytest.mark.unit
@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_without_outputs(name: str) -> None:
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)


@pytest.mark.integration
@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the kernel inherits these: a short schedule, 3 training steps, 4 DDIM steps, a small ablation output
    monkeypatch.setenv("DDPM_NB_T", "100")
    monkeypatch.setenv("DDPM_NB_TRAIN_STEPS", "3")
    monkeypatch.setenv("DDPM_NB_SAMPLE_STEPS", "4")
    monkeypatch.setenv("DDPM_ABLATION_DIR", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for schedule, seed in [("linear", 0), ("cosine", 0), ("linear", 1), ("cosine", 1)]:
        write_run(tmp_path, schedule, seed, [1.0 / (k + 1) for k in range(20)], {19: 40.0 + seed}, wall=5.0)
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    assert any("image/png" in out.get("data", {}) for out in outputs)  # the figures were drawn


@pytest.mark.integration
def test_the_ablation_notebook_runs_on_a_fresh_clone_from_the_shipped_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shipped = NOTEBOOKS.parent / "docs" / "results" / "ablation"
    assert sorted(p.name for p in (shipped / "runs").iterdir()), "the README's ablation runs are shipped"
    # a fresh clone: notebooks/ and docs/results/ablation, no results/ folder
    clone = tmp_path / "clone"
    (clone / "notebooks").mkdir(parents=True)
    (clone / "docs" / "results").mkdir(parents=True)
    (clone / "docs" / "results" / "ablation").symlink_to(shipped)
    monkeypatch.delenv("DDPM_ABLATION_DIR", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = {p: p.stat().st_mtime_ns for p in shipped.rglob("*")}
    notebook = nbformat.read(NOTEBOOKS / "03_ablation.ipynb", as_version=4)
    NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(clone / "notebooks")}}
    ).execute()
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    assert any("docs/results/ablation" in out.get("text", "") for out in outputs)
    assert any("image/png" in out.get("data", {}) for out in outputs)
    assert {p: p.stat().st_mtime_ns for p in shipped.rglob("*")} == before  # the shipped folder is left as it is
