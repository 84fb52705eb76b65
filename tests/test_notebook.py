"""notebooks/quickstart.ipynb runs top to bottom in a Jupyter kernel, as a user's Jupyter runs it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbclient
import nbformat
import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def _code_cells():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    return ["".join(cell["source"]) for cell in cells if cell["cell_type"] == "code"]


def test_notebook_runs_top_to_bottom_in_a_kernel(tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(str(NOTEBOOK), as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in notebook.cells for o in c.get("outputs", []))
    assert "routed experts of 2 layer(s)" in outputs and "adapter_config.json" in outputs
    assert ".experts.0.gate_proj.lora_A.weight" in outputs
    workdir = Path(re.search(r"writing to (\S+)", outputs).group(1))
    assert not workdir.exists(), "the last cell removes what the notebook wrote"
    assert list(tmp_path.iterdir()) == [], "the notebook writes nothing into its working directory"


@pytest.mark.parametrize("source", _code_cells(), ids=lambda source: source.splitlines()[0][:30])
def test_notebook_cells_compile(source):
    compile(source, str(NOTEBOOK), "exec")
