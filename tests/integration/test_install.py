"""The package as a user gets it: a wheel (not editable) installed outside the repository, run from another directory.

One smoke run (`python -m ctxrq_jax.demo --smoke` from the installed wheel, tests/integration/conftest.py) serves the
checks of what a user sees: its outputs, its quiet progress lines, and one-line errors for the usual mistakes.
"""

import pathlib

import pytest

from tests import helpers

REPO = pathlib.Path(helpers.REPO)
_run = helpers.run_installed

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("wheel")]


def test_the_wheel_is_what_runs(installed):
  site, work = installed
  out = _run(["-c", "import ctxrq_jax, ctxrq_jax.configs.demo as d; print(ctxrq_jax.__file__); print(d.__file__)"],
             site, work)
  assert out.returncode == 0, out.stderr
  for line in out.stdout.split():
    assert pathlib.Path(line).is_relative_to(site), line  # not the repository's (editable) copy
  assert not (site / "configs").exists()  # the top-level configs/ are the repository's, not the package's


def test_smoke_demo_runs_every_stage_from_the_wheel(smoke):
  result, workdir = smoke
  assert result.returncode == 0, result.stderr[-3000:]
  for path in ("stage1/rqvae/model_config.json", "codes/metadata.json", "stage2/config.json",
               "samples/samples.png", "samples/phases.png", "samples/samples.npz"):
    assert (workdir / path).exists(), path
  # Quiet: one progress line per stage, no dependency chatter (orbax, absl, TensorFlow) on stderr.
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  stages = ("stage 1 (RQ-VAE):", "encode train:", "encode test:", "stage 2 (Contextual RQ-Transformer):", "sample:")
  assert [l.split(":")[0] + ":" for l in lines] == list(stages), result.stderr
  assert "held-out PSNR" in result.stdout and "samples_npz" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["-m", "ctxrq_jax.sample", "--workdir=w/stage2", "--classes=3,12"], "class ids [12] are outside [0, 10)"),
    (["-m", "ctxrq_jax.sample", "--workdir=w/stage2", "--t_draft=65"], "t_draft=65 exceeds N=64"),
    (["-m", "ctxrq_jax.sample", "--workdir=missing/stage2"], "missing/stage2 does not exist"),
    (["-m", "ctxrq_jax.evaluate", "stage2", "--workdir=w/codes"], "config.json not found"),
    (["-m", "ctxrq_jax.train", "--config=w/stage2/config.json", "--workdir=x"], "a --config must be a Python file"),
])
def test_user_mistakes_print_one_error_line_and_exit_2(smoke, installed, args, message):
  site, work = installed
  out = _run(args, site, work)
  assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr[-2000:]


def test_misspelt_config_key_and_traceback_on_request(smoke, installed):
  site, work = installed
  args = ["-m", "ctxrq_jax.train", f"--config={REPO}/configs/demo.py", "--config.train.batch_sise=8", "--workdir=x"]
  out = _run(args, site, work)
  assert out.returncode == 2 and out.stderr.startswith("error: ") and "batch_sise" in out.stderr
  assert len(out.stderr.strip().splitlines()) == 1
  out = _run(["-m", "ctxrq_jax.sample", "--workdir=w/stage2", "--classes=12", "--verbosity=1"], site, work)
  assert out.returncode != 0 and "Traceback" in out.stderr
