"""Every notebook under colab/ runs headless (nbclient) on its smoke settings and shows its figures."""

import pathlib

import nbformat
from nbclient import NotebookClient
import pytest

from tests import helpers

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[2] / "colab").glob("*.ipynb"))


def test_there_are_notebooks_stored_without_outputs():
  assert NOTEBOOKS
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} is stored with outputs"
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "SMOKE = False" in params[0].source, f"{path.name}: one 'parameters' cell with SMOKE"


@pytest.mark.slow
@pytest.mark.xdist_group("wheel")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_on_smoke_settings(path, installed, smoke, tmp_path):
  # The kernel imports the installed wheel (not this checkout), as in Colab; after the wheel's smoke run
  # (tests/integration/conftest.py) the smoke programs are in the suite's compilation cache.
  del smoke
  site, _ = installed
  nb = nbformat.read(path, as_version=4)
  for cell in nb.cells:
    if "parameters" in cell.metadata.get("tags", []):
      cell.source = f"SMOKE = True\nWORKDIR = {str(tmp_path / 'run')!r}\nSAMPLES_PER_CLASS = 2\n"
  client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
  client.execute(env=helpers.installed_env(site))
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  figures = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(figures) >= 2, f"{path.name} showed {len(figures)} figures"
