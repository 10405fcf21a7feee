"""The walkthrough notebook runs top to bottom on a small setting and shows its tables and plots."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "walkthrough.ipynb"

pytestmark = pytest.mark.slow


def test_walkthrough_notebook_runs(tmp_path, tiny_dinov2):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", []))
    out = tmp_path / "walkthrough"
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(
        f"N_TRAIN = 24\nN_TEST = 6\nFOLDS = 3\nFAST = True\n"
        f"OUT = {str(out)!r}\nENCODER = {str(tiny_dinov2)!r}"))
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    plots = [o for o in outputs if "image/png" in o.get("data", {})]
    tables = [o for o in outputs if "text/html" in o.get("data", {}) and "<table" in o["data"]["text/html"]]
    assert len(plots) >= 3, "the notebook should show its plots"
    assert len(tables) >= 4, "the notebook should show the intermediate tables"
    assert (out / "run" / "submission.csv").exists()
    assert (out / "run" / "report.html").exists()
