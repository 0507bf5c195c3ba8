"""notebooks/quickstart.ipynb runs top to bottom at toy sizes (T5X_LITE_NOTEBOOK_SMALL=1), in a
kernel of this Python, as a user's fresh CPU session would: any cell error fails the test."""
import os

import nbclient
import nbformat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")


def test_the_quickstart_notebook_runs_without_a_cell_error(tmp_path, monkeypatch):
  monkeypatch.setenv("T5X_LITE_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("T5X_LITE_NOTEBOOK_DIR", str(tmp_path))
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
  # One CPU device, as in Colab: the 8 simulated devices of the other tests only cost compiles.
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "").replace(
      "--xla_force_host_platform_device_count=8", ""))
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
  client.execute()  # raises CellExecutionError naming the cell and its traceback
  outputs = {i: "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
                        for o in cell.get("outputs", []))
             for i, cell in enumerate(notebook.cells) if cell.cell_type == "code"}
  text = "\n".join(outputs.values())
  assert "toy sizes" in text and "largest logit difference" in text
  assert any("image/png" in o.get("data", {}) for cell in notebook.cells
             for o in cell.get("outputs", []))  # the loss curve was drawn
