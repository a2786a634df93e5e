"""The notebook runs headless end to end (smoke preset) and produces its figures and metrics."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "vae_chest_xray.ipynb"


def test_notebook_is_committed_without_outputs_or_classes():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.get("outputs") and c.get("execution_count") is None for c in code)
    assert not any(line.lstrip().startswith("class ") for c in code for line in c.source.splitlines())


@pytest.fixture
def notebook_data(request) -> Path:
    """The real data when $SPATIALVAE_DATA is set (what users run), else the fake Kaggle tree."""
    root = os.environ.get("SPATIALVAE_DATA")
    return Path(root) if root else request.getfixturevalue("kaggle_tree")["root"]


def _execute(nb, timeout: int = 600) -> list:
    import nbclient

    nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO)}}).execute()
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def _stream_text(outputs: list) -> str:
    return "".join(o.get("text", "") for o in outputs if o.output_type == "stream")


def test_notebook_runs_headless_with_the_smoke_preset(notebook_data, tmp_path, monkeypatch):
    """Run All once (smoke preset), then the cells up to the first training cell again: they resume."""
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    out = tmp_path / "runs"
    monkeypatch.setenv("SPATIALVAE_PRESET", "smoke")
    monkeypatch.setenv("SPATIALVAE_TEXTURE", "true")  # the optional stage's cell runs too
    monkeypatch.setenv("SPATIALVAE_DATA", str(notebook_data.resolve()))
    monkeypatch.setenv("SPATIALVAE_OUT", str(out))
    monkeypatch.setenv("SPATIALVAE_PERCEPTUAL_WEIGHT", "0")  # no VGG weights on a CI machine: turned off, and said
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # nothing cached: Inception metrics must degrade
    fake = tmp_path in notebook_data.parents
    monkeypatch.setenv("SPATIALVAE_TSTR_PER_CLASS", "0")  # TSTR's 12 small classifiers: tested in test_features
    outputs = _execute(nbformat.read(NOTEBOOK, as_version=4))

    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, errors
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 8  # balance, examples, histograms, curves, 3 sample grids, reconstructions
    text = _stream_text(outputs)
    assert "perceptual term OFF" in text and "validation: patient-grouped" in text
    assert "epoch   1/3" in text and "resumed" not in text

    run = out / "notebook-smoke"
    assert (run / "history.png").is_file() and (run / "checkpoints" / "best.pt").is_file()
    assert (run / "checkpoints" / "sharp.pt").is_file()  # SPATIALVAE_TEXTURE=true ran the stage
    metrics = json.loads((run / "metrics.json").read_text())
    from spatialvae.config import get_preset

    # every readable test image of the tree, or the smoke preset's cap per class on the real data
    n_test = 6 if fake else 2 * get_preset("smoke").data.max_per_class
    assert metrics["reconstruction"]["overall"]["n"] == n_test
    assert metrics["reconstruction"]["overall"]["psnr_db"] > metrics["floors"]["mean_image"]["psnr_db"]
    assert metrics["samplers"]["standard_normal"]["fid"] is None and metrics["inception_unavailable"]
    assert metrics["tstr"] is None  # the notebook passed its TSTR_PER_CLASS parameter on
    history_size = os.path.getsize(run / "history.csv")

    # Running the cells again (a new session) resumes the finished run instead of training again.
    nb = nbformat.read(NOTEBOOK, as_version=4)
    first_fit = next(i for i, c in enumerate(nb.cells) if "trainer.fit(" in c.source)
    nb.cells = nb.cells[:first_fit + 1]
    text2 = _stream_text(_execute(nb))
    assert "resumed" in text2 and "epoch   1/3" not in text2
    assert os.path.getsize(run / "history.csv") == history_size
