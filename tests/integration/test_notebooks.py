"""Every notebook under colab/ runs headless (nbclient) from the installed wheel on its smoke settings and shows its
figures. The notebooks read the session's smoke run (tests/integration/conftest.py) instead of training their own, and
write only under their OUT directory."""

import pathlib

import jax
import nbformat
from nbclient import NotebookClient
from nbclient.util import run_sync
import pytest

from tests import helpers

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[2] / "colab").glob("*.ipynb"))
# The figures each notebook shows on the smoke settings (inline PNGs: matplotlib figures and displayed images).
FIGURES = {"quickstart.ipynb": 2, "editing.ipynb": 4, "rqvae.ipynb": 2, "explorer.ipynb": 4}


def _code(nb):
  return [c for c in nb.cells if c.cell_type == "code"]


def test_there_are_notebooks_stored_without_outputs():
  assert sorted(p.name for p in NOTEBOOKS) == sorted(FIGURES)
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = _code(nb)
    assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} is stored with outputs"
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "SMOKE = False" in params[0].source, f"{path.name}: one 'parameters' cell with SMOKE"
    assert all(f"\n{name} = " in "\n" + params[0].source for name in ("WORKDIR", "OUT")), path.name
    install = code[0].source  # a regular install from git (Colab) or a local path, never an editable one
    assert "pip" in install and "install" in install and "git+https://" in install and " -e" not in install, path.name


def test_every_notebook_trains_the_demo_run_it_reads_when_it_is_not_there():
  """On Colab each notebook has its own runtime: the run the quickstart trained is not where the others look. Each
  trains it with `demo.ensure_run` (not executed here: the test points WORKDIR at the finished smoke run; what it
  does is tests/unit/recipes/test_demo.py's), as `python -m ctxrq_jax.demo [--smoke]` would."""
  for path in NOTEBOOKS:
    code = "\n".join(c.source for c in _code(nbformat.read(path, as_version=4)))
    assert "demo.ensure_run(WORKDIR, smoke=SMOKE, quick=True" in code, path.name


@pytest.fixture(scope="module")
def kernel(installed, tmp_path_factory):
  """One Jupyter kernel for the notebooks, run one after another as a user would in one session. Each notebook starts
  from an empty namespace (`%reset -f`), so a missing import or parameter still fails; what carries over is the
  imported modules and JAX's compiled programs (the kernel's start and imports were a fifth of the notebooks' time)."""
  site, _ = installed
  starter = NotebookClient(nbformat.v4.new_notebook(), kernel_name="python3")
  starter.km = starter.create_kernel_manager()
  env = dict(helpers.installed_env(site), JAX_DEFAULT_PRNG_IMPL=jax.config.jax_default_prng_impl)
  starter.start_new_kernel(env=env, cwd=str(tmp_path_factory.mktemp("kernel")))
  yield starter.km
  run_sync(starter.km.shutdown_kernel)(now=True)


@pytest.mark.slow
@pytest.mark.xdist_group("wheel")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_on_smoke_settings(path, kernel, smoke, tmp_path):
  # The kernel imports the installed wheel (not this checkout), as in Colab. The notebooks read the wheel's smoke run
  # (no notebook trains). The kernel draws with this process's PRNG, so the programs that the demo tests compiled on
  # the same run (test_demo.py: the same sampling settings, likelihood and digit judge) come from the suite's
  # compilation cache; the notebooks only check that every cell runs, never particular numbers.
  result, workdir = smoke
  assert result.returncode == 0, result.stderr[-3000:]
  nb = nbformat.read(path, as_version=4)
  for cell in nb.cells:
    if "parameters" in cell.metadata.get("tags", []):  # appended, as papermill injects parameters
      cell.source += (f"\n# the test's settings\nSMOKE = True\nWORKDIR = {str(workdir)!r}\n"
                      f"OUT = {str(tmp_path / 'out')!r}\n")
  # The shared kernel as a fresh one: no names from the notebook before, the working directory this test's.
  nb.cells.insert(0, nbformat.v4.new_code_cell(f"%reset -f\n__import__('os').chdir({str(tmp_path)!r})"))
  client = NotebookClient(nb, km=kernel, timeout=600, kernel_name="python3")
  try:
    client.execute()
  finally:
    if client.kc is not None:
      client.kc.stop_channels()
  outputs = [o for c in _code(nb) for o in c.outputs]
  errors = [f"{o.ename}: {o.evalue}" for o in outputs if o.output_type == "error"]
  assert not errors, errors
  figures = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(figures) == FIGURES[path.name], f"{path.name} showed {len(figures)} figures"
  assert not (workdir / "notebooks").exists()  # the shared smoke run is only read
