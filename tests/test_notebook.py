"""notebooks/quickstart.ipynb runs top to bottom in a fresh kernel and reports an AUC."""
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
KERNEL = "python3"


def _text(cell) -> str:
    """Everything a code cell printed or displayed as text."""
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif "data" in out:
            parts.append(out["data"].get("text/plain", ""))
    return "".join(parts)


def _tagged(nb, tag):
    cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    # The kernel must be this interpreter (the venv with ctrkit): jupyter_client maps a spec whose
    # argv[0] is plain "python"/"python3" (ipykernel's built-in spec) to sys.executable.
    from jupyter_client.kernelspec import KernelSpecManager
    argv0 = KernelSpecManager().get_kernel_spec(KERNEL).argv[0]
    assert argv0 in ("python", "python3", f"python{sys.version_info[0]}.{sys.version_info[1]}",
                     sys.executable), f"kernel {KERNEL!r} runs {argv0}, not {sys.executable}"

    work = tmp_path / "work"
    monkeypatch.setenv("CTRKIT_NOTEBOOK_DIR", str(work))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name=KERNEL,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError if any cell fails

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.get("output_type") == "error"]
    assert not errors

    assert (work / "run" / "metrics.csv").is_file()  # the notebook used CTRKIT_NOTEBOOK_DIR

    metrics = _text(_tagged(nb, "metrics"))
    assert "AUC" in metrics, metrics
    aucs = dict(re.findall(r"(?m)^(valid|test)\s+AUC (\d\.\d+)", metrics))
    assert set(aucs) == {"valid", "test"}, metrics
    assert all(0.6 < float(a) <= 1.0 for a in aucs.values()), metrics

    assert "AUC" in _text(_tagged(nb, "evaluate"))
    predicted = _text(_tagged(nb, "predict"))
    assert re.search(r"scored 4000 rows; test AUC 0\.\d+", predicted), predicted
    assert re.search(r"\[(\s*0\.\d+){5}\s*\]", predicted), predicted
    exported = _text(_tagged(nb, "export"))
    m = re.search(r"max difference to predict (\S+)", exported)
    assert m and float(m.group(1)) < 1e-6, exported
    plot = _tagged(nb, "plot")
    assert any("image/png" in o.get("data", {}) for o in plot.outputs), "the plot cell showed no figure"
