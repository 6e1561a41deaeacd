"""The notebooks are valid and their code cells compile (running them is the demo's job)."""

import glob
import json
import os

import pytest

NOTEBOOKS = sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(__file__)), "colab", "*.ipynb")))


def test_there_are_notebooks():
  assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_code_compiles(path):
  with open(path) as f:
    nb = json.load(f)
  assert nb["nbformat"] == 4
  code_cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
  assert code_cells
  for i, cell in enumerate(code_cells):
    compile("".join(cell["source"]), f"{os.path.basename(path)}[cell {i}]", "exec")
