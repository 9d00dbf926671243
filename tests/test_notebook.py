"""examples/quickstart.ipynb, executed by a real Jupyter kernel (nbclient): the example cannot rot."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


def test_the_committed_notebook_has_no_outputs():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_the_quickstart_notebook_runs(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    # the kernel is this interpreter (ipykernel's native python3), in a scratch folder
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outs if o.output_type == "error"]
    text = "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in outs)
    assert "torch.Size([32, 3, 56, 56]) torch.Size([32, 1]) 1 torch" in text  # x, y, dls.c, the backend
    assert "pred_tta_metallicity" in text and " ok" in text  # the JPEG folder's table
    pngs = [o for o in outs if "image/png" in o.get("data", {})]
    assert len(pngs) >= 3  # show_batch, lr_find's curve, predictions vs truth
    batch = next(c for c in nb.cells if c.cell_type == "code" and "show_batch" in c.source)
    assert len([o for o in batch.outputs if "image/png" in o.get("data", {})]) == 1  # once, not again as its value
    assert any("progress" in str(o.get("data", {})) or "<progress" in str(o.get("data", {}).get("text/html", ""))
               for o in outs)  # fastai's notebook progress bars, not lines on stderr
    assert (tmp_path / "quickstart" / "shards" / "manifest.json").is_file()
