"""The demo pipeline end to end (the wheel's smoke run: stage 1 -> codes -> stage 2 -> samples), then evaluation and
decoding of its outputs."""

import os

import numpy as np
import pytest
from PIL import Image

from ctxrq_jax.evaluation import digits
from ctxrq_jax.evaluation import likelihood
from ctxrq_jax.sampling import loader
from ctxrq_jax.sampling import runner

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("wheel")]


def test_demo_outputs_evaluate(smoke, tmp_path):
  # The smoke run of the installed wheel (tests/integration/conftest.py) is the pipeline; its outputs are read here
  # by the library of this checkout, as a user's later `evaluate` / `sample` would.
  result, workdir = smoke
  assert result.returncode == 0, result.stderr[-3000:]
  workdir = str(workdir)
  with np.load(os.path.join(workdir, "samples", "samples.npz")) as f:
    images, labels, codes = f["arr_0"], f["labels"], f["codes"]
  n, h, w, d = codes.shape
  assert images.shape == (n, 4 * h, 4 * w, 3) and images.dtype == np.uint8  # RGB for FID evaluators
  np.testing.assert_array_equal(labels, np.repeat(np.arange(10), n // 10))  # --smoke: 2 per class
  loaded = loader.Stage2Model(os.path.join(workdir, "stage2"), decode_batch_size=16)
  codebook_size = loaded.decoder.model.codebook_size
  assert codes.min() >= 0 and codes.max() < codebook_size
  # The draft and its revision side by side: panels as wide as the final grid.
  assert Image.open(os.path.join(workdir, "samples", "phases.png")).width >= 2 * Image.open(
      os.path.join(workdir, "samples", "samples.png")).width

  stage2_dir = os.path.join(workdir, "stage2")
  stage2 = likelihood.evaluate_stage2(stage2_dir, num_draws=1)
  assert np.isfinite(stage2["nll"]) and stage2["masked_codes"] > 0
  assert 0 < stage2["unigram_per_depth"] <= stage2["unigram_pooled"] + 1e-6 <= np.log(codebook_size) + 1e-6
  assert "NLL / per-depth unigram" in likelihood.format_stage2_results(stage2)
  assert np.isfinite(stage2["nll_null_condition"])
  assert stage2["condition_gain"] == pytest.approx(stage2["nll_null_condition"] - stage2["nll"])

  evaluator = digits.SampleEvaluator(stage2_dir, per_class=2, classifier_steps=5)
  fidelity = digits.score_run(evaluator)
  assert fidelity["num_samples"] == 20
  phases = ["draft"] + [f"revision {m + 1}" for m in range(loaded.config.sample.M)]
  assert list(fidelity["rows"]) == ["real held-out digits", "RQ-VAE reconstructions"] + [f"samples: {p}"
                                                                                          for p in phases]
  for row in fidelity["rows"].values():
    assert np.isfinite(row["fd"]) and row["fd"] >= -1e-9, row
    assert all(0.0 <= row[k] <= 1.0 for k in ("precision", "recall", "accuracy")), row
  report = digits.format_sample_results(fidelity)
  assert "FD" in report and "recall" in report and all(p in report for p in phases)
  # The ablation sweeps on a real run: colab/explorer.ipynb (test_notebooks.py) runs them on this smoke run; their
  # logic, skips and files: tests/unit/evaluation/test_ablation.py.

  # Decoding in chunks (padded last chunk) equals one big call; preview grids are capped, the npz is whole.
  chunked = loader.Stage2Model(stage2_dir, decode_batch_size=3)
  flat = codes.reshape(n, -1, d)
  whole = loaded.images(flat)
  # (Other batch shapes compile to other convolution kernels: equal up to float rounding, uint8 up to one level.)
  np.testing.assert_allclose(chunked.images(flat), whole, atol=1e-5)
  near = lambda a, b: np.abs(a.astype(np.int32) - b.astype(np.int32)).max() <= 1  # noqa: E731
  assert near(chunked.images(flat, uint8=True)[..., 0], images[..., 0])
  history = np.stack([flat, flat])
  paths = runner.write_outputs(chunked, history, labels, str(tmp_path / "capped"), ncols=5, preview_per_class=1,
                               preview_classes=3)
  # One sample of each of 3 classes, one column: 3 tiles + 2 px padding each, enlarged to ~128 px tiles.
  tile, scale = images.shape[1] + 2, 128 // images.shape[1]
  assert Image.open(paths["samples_png"]).size == (scale * (tile + 2), scale * (3 * tile + 2))
  with np.load(paths["samples_npz"]) as f:
    assert f["arr_0"].shape == images.shape and near(f["arr_0"], images)  # all of them, although the grid shows 3
  assert not any(n.startswith(".samples") for n in os.listdir(tmp_path / "capped"))  # scratch file removed
  with pytest.raises(ValueError, match=rf"codes must lie in \[0, {codebook_size}\)"):
    loaded.images(flat + codebook_size)
  with pytest.raises(ValueError, match="samples_per_class must be >= 1"):
    runner.sample_all_classes(stage2_dir, str(tmp_path / "none"), samples_per_class=0)

