"""The package as a user gets it: a wheel (not editable) installed outside the repository, run from another directory.

One smoke run (`python -m ctxrq_jax.demo --smoke` from the installed wheel, tests/integration/conftest.py) serves the
checks of what a user sees: its outputs, its quiet progress lines, and one-line errors for the usual mistakes.
"""

import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from tests import helpers

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
  # --smoke encodes the first 500 digits of each split (recipes/demo.SMOKE_MAX_EXAMPLES): the whole held-out split.
  splits = json.loads((workdir / "codes/metadata.json").read_text())["splits"]
  assert {k: v["num_examples"] for k, v in splits.items()} == {"train": 500, "test": 500}
  # Quiet: one progress line per stage, no dependency chatter (orbax, absl, TensorFlow) on stderr.
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  stages = ("stage 1 (RQ-VAE):", "encode train:", "encode test:", "stage 2 (Contextual RQ-Transformer):", "sample:")
  assert [l.split(":")[0] + ":" for l in lines] == list(stages), result.stderr
  assert "held-out PSNR" in result.stdout and "samples_npz" in result.stdout


# The one-line wrapper (ctxrq_jax/core/cli.py) from a real process of the wheel: a mistake found after JAX is imported
# and the run loaded (nothing of orbax, absl or XLA may add a line), and one found parsing the flags, before any import.
# Which exceptions become one line, and the other commands' messages, are checked in process (tests/unit/core/
# test_cli_run.py; the text of each library message where it is raised).
@pytest.mark.parametrize("args, message", [
    (["-m", "ctxrq_jax.sample", "--workdir=w/stage2", "--t_draft=65"], "t_draft=65 exceeds N=64"),
    (["-m", "ctxrq_jax.demo", "--workdir=x", "--max_examples=0"], "--max_examples=0: 0 is not a positive integer"),
])
def test_user_mistakes_print_one_error_line_and_exit_2(smoke, installed, args, message):
  site, work = installed
  out = _run(args, site, work)
  assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr[-2000:]


def test_traceback_on_request(smoke, installed):
  # `sample` passes --classes to the run's class check; with --verbosity=1 its ValueError is a traceback (exit 1).
  site, work = installed
  out = _run(["-m", "ctxrq_jax.sample", "--workdir=w/stage2", "--classes=3,12", "--verbosity=1"], site, work)
  assert out.returncode == 1 and "Traceback (most recent call last)" in out.stderr, out.stderr[-2000:]
  assert "ValueError: class ids [12] are outside [0, 10) for this model" in out.stderr, out.stderr[-2000:]


def test_inpaint_from_the_wheel(smoke, installed):
  # `sample inpaint` on the smoke run: a 28 x 28 digit padded to 32 (--resize=pad), its top 10 rows masked, i.e.
  # pixel rows 2 ... 11 of the 32 x 32 image -> code rows 0 ... 2 of the 8 x 8 map (cells of 4 x 4 pixels).
  site, work = installed
  edit = work / "edit"
  edit.mkdir(exist_ok=True)
  digit = np.zeros((28, 28), np.uint8)
  digit[4:24, 12:16] = 255
  mask = np.zeros((28, 28), np.uint8)
  mask[:10] = 255
  for name, array in (("digit.png", digit), ("mask.png", mask)):
    Image.fromarray(array).save(edit / name)
  args = ["-m", "ctxrq_jax.sample", "inpaint", "--workdir=w/stage2", "--image=edit/digit.png", "--resize=pad",
          "--num_samples=2"]
  out = _run([*args, "--mask=edit/mask.png", "--class=1", "--out=edit/out"], site, work)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "2 completions of 24 of 64 code positions" in out.stdout
  with np.load(edit / "out" / "inpaint.npz") as f:
    want = np.zeros((8, 8), bool)
    want[:3] = True
    np.testing.assert_array_equal(f["region"], want)
    assert f["codes"].shape == (2, 8, 8, 4) and f["images"].shape == (2, 32, 32, 1)
    for codes in f["codes"]:  # every code below the mask is the input's
      np.testing.assert_array_equal(codes[~want], f["input_codes"][~want])
  assert Image.open(edit / "out" / "strip.png").size[0] > Image.open(edit / "out" / "inpainted.png").size[0]
  # Its mistakes (a mask of another size, a class the run lacks) are the library's messages, checked where they are
  # raised (tests/unit/sampling/test_editing.py), and one line through `sample` (tests/unit/core/test_cli_run.py).


def test_text_demo_beside_the_class_demo_and_a_rerun_that_keeps_the_samples(smoke, installed):
  # `demo --task=text` in the smoke run's workdir reuses its stage 1 (its progress line says no step ran: no rate)
  # and writes the prompt grid with its samples.json; the class demo run again draws nothing and keeps its samples
  # and an `evaluate` result written beside them.
  site, work = installed
  out = _run(["-m", "ctxrq_jax.demo", "--workdir=w", "--smoke", "--task=text"], site, work, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert [l.split(":")[0] for l in lines] == ["stage 1 (RQ-VAE)", "encode train", "encode test",
                                              "stage 2 (Contextual RQ-Transformer)", "sample"], out.stderr
  assert "steps/s" not in lines[0], lines[0]
  splits = json.loads((work / "w" / "text_codes" / "metadata.json").read_text())["splits"]
  assert {k: v["num_examples"] for k, v in splits.items()} == {"train": 500, "test": 500}  # as the class smoke run's
  settings = json.loads((work / "w" / "text_samples" / "samples.json").read_text())
  with np.load(work / "w" / "text_samples" / "samples.npz") as f:
    assert settings["prompts"] == f["prompts"].tolist() and settings["num_samples"] == len(f["arr_0"])
  samples = work / "w" / "samples"
  before = (samples / "samples.npz").read_bytes()
  (samples / "samples.fid.json").write_text('{"fid": 1.0}')
  try:
    again = _run(["-m", "ctxrq_jax.demo", "--workdir=w", "--smoke"], site, work, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not any(l.startswith("sample:") for l in again.stderr.splitlines()), again.stderr  # nothing drawn
    assert (samples / "samples.npz").read_bytes() == before and (samples / "samples.fid.json").exists()
  finally:
    (samples / "samples.fid.json").unlink()
