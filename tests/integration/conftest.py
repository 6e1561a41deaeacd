"""The package as a user installs it, shared by the integration tests that need it.

One wheel (not editable) is built and installed outside the repository, and one smoke run of the demo
(`python -m ctxrq_jax.demo --workdir=w --smoke`) is made from it, per test process. The tests that use them carry
`xdist_group("wheel")`, so under `-n 2 --dist loadgroup` they all run in one worker and share these fixtures.
"""

import subprocess
import sys

import pytest

from tests import helpers


@pytest.fixture(scope="session")
def installed(tmp_path_factory):
  """(site-packages dir holding the installed wheel, a working directory outside the repository)."""
  root = tmp_path_factory.mktemp("wheel")
  dist, site, work = root / "dist", root / "site", root / "work"
  work.mkdir()
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                  helpers.REPO], check=True, capture_output=True, timeout=300)
  wheels = list(dist.glob("ctxrq_jax-*.whl"))
  assert len(wheels) == 1
  subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheels[0])],
                 check=True, capture_output=True, timeout=300)
  return site, work


@pytest.fixture(scope="session")
def smoke(installed):
  """(CompletedProcess, workdir) of `python -m ctxrq_jax.demo --workdir=w --smoke` run from the installed wheel."""
  site, work = installed
  result = helpers.run_installed(["-m", "ctxrq_jax.demo", "--workdir=w", "--smoke"], site, work, timeout=600)
  return result, work / "w"
