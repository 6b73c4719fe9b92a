"""notebooks/analysis.ipynb executes (nbclient) against a small results folder and shows the report tables."""
from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

from test_report import build_known_store

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "analysis.ipynb"


def test_analysis_notebook_runs(tmp_path, monkeypatch):
    folder = build_known_store(tmp_path / "results")
    monkeypatch.setenv("RESULTS_DIR", str(folder))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    text = "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/markdown", ""))
                     for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", []))
    assert "Table 3 (RULER" in text and "paper: Gated DeltaNet-2" in text
    assert "accuracy_vs_length_niah_single_1.png" in text
    assert (folder / "report" / "plots" / "needle_heatmap_niah_single_1.png").is_file()
