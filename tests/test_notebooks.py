"""Execute notebooks/exploration.ipynb and notebooks/results.ipynb headless
(nbclient, kernel ``python3`` = this interpreter) on a synthetic run, and
check that no cell errored and the figures were drawn. Also checks that the
committed notebooks match their generator and carry no outputs.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from nbclient import NotebookClient  # noqa: E402

from test_report import CLASSES, make_run  # noqa: E402  (tests/ is on sys.path under pytest)

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("nbrun"), audio=True)


def execute(name: str, monkeypatch, **env) -> nbformat.NotebookNode:
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # let ipykernel pick its inline backend
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    # "python3" resolves to this interpreter: jupyter_client swaps a kernelspec's
    # bare "python" for sys.executable, and the kernelspec lives in this venv.
    client = NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    errors = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
              if out.output_type == "error"]
    assert not errors, f"{name}: {errors[0].ename}: {errors[0].evalue}"
    return nb


def _text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                parts.append(out.text)
            elif "data" in out:
                parts.append(out.data.get("text/plain", ""))
    return "\n".join(parts)


def _images(nb) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))


def test_exploration_notebook_runs(synthetic_run, monkeypatch):
    data, _ = synthetic_run
    nb = execute("exploration.ipynb", monkeypatch, AT_DATA=data)
    text = _text(nb)
    assert "24 train clips, 6 test clips, 3 classes" in text
    assert "bad_train.wav" in text  # unreadable header listed
    assert f"{len(CLASSES)} of {len(CLASSES)} classes shown" in text
    assert _images(nb) >= 3  # class balance, durations, log-mels


def test_results_notebook_runs(synthetic_run, monkeypatch):
    _, work = synthetic_run
    nb = execute("results.ipynb", monkeypatch, AT_WORK=work)
    text = _text(nb)
    assert "final: logreg (stacker, stacking final)" in text
    assert "p_given" in text and "top3" in text  # the most-wrong table
    assert _images(nb) >= 2  # per-class chart, confusion matrix


def test_committed_notebooks_match_generator(tmp_path):
    out = subprocess.run([sys.executable, str(NOTEBOOKS / "make_notebooks.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for name in ("exploration.ipynb", "results.ipynb"):
        text = (NOTEBOOKS / name).read_text()
        assert (tmp_path / name).read_text() == text, f"{name} differs from make_notebooks.py: regenerate it"
        nb = nbformat.reads(text, as_version=4)
        assert all(not c.get("outputs") and c.get("execution_count") is None
                   for c in nb.cells if c.cell_type == "code"), f"{name} has outputs"
