"""The demo pipeline end to end on tiny configs: stage 1 -> codes -> stage 2 -> samples -> evaluation."""

import os

import numpy as np
import pytest
from PIL import Image

from ctxrq_jax.data import codes as codes_lib
from ctxrq_jax.evaluation import digits
from ctxrq_jax.evaluation import likelihood
from ctxrq_jax.recipes import demo
from ctxrq_jax.sampling import loader
from ctxrq_jax.sampling import runner
from tests import helpers

pytestmark = pytest.mark.slow


def test_demo_pipeline_writes_samples_and_evaluates(tmp_path):
  """Also the augmented-codes path (the demo itself encodes one view): codes of each digit and its mirror image,
  stage 2 drawing one of them per example, evaluation and sampling as usual."""
  workdir = str(tmp_path / "demo")
  stage2_config = helpers.tiny_demo_stage2_config()
  with stage2_config.unlocked():
    stage2_config.data.random_view = True
  summary = demo.run(helpers.tiny_stage1_config(train__num_steps=2), stage2_config, workdir,
                     samples_per_class=1, views=("center", "flip"))
  meta = codes_lib.read_metadata(os.path.join(workdir, "codes"))
  assert meta.views == ("center", "flip") and meta.num_examples("train") > 0
  out = summary["outputs"]
  with np.load(out["samples_npz"]) as f:
    images, labels, codes = f["arr_0"], f["labels"], f["codes"]
  assert images.shape == (10, 16, 16, 3) and images.dtype == np.uint8  # RGB for FID evaluators
  np.testing.assert_array_equal(labels, np.arange(10))
  assert codes.shape == (10, 4, 4, 2) and codes.min() >= 0 and codes.max() < 16
  # The draft and its 2 revisions side by side: three panels as wide as the final grid.
  assert Image.open(out["phases_png"]).width >= 3 * Image.open(out["samples_png"]).width
  report = demo.format_summary(summary)
  for line in ("held-out PSNR", "codes used per depth", "held-out masked-code NLL", "stage 2", "samples_npz"):
    assert line in report, report

  stage2 = likelihood.evaluate_stage2(os.path.join(workdir, "stage2"), num_draws=1)
  assert np.isfinite(stage2["nll"]) and stage2["masked_codes"] > 0
  assert 0 < stage2["unigram_per_depth"] <= stage2["unigram_pooled"] + 1e-6 <= np.log(16) + 1e-6
  assert "NLL / per-depth unigram" in likelihood.format_stage2_results(stage2)

  fidelity = digits.evaluate_samples(os.path.join(workdir, "stage2"), samples_per_class=2, classifier_steps=5)
  assert fidelity["num_samples"] == 20
  phases = ["draft", "revision_1", "revision_2"]
  for key in ["classifier_test_accuracy", "classifier_reconstruction_accuracy"] + [f"{p}_accuracy" for p in phases]:
    assert 0.0 <= fidelity[key] <= 1.0, key
  report = digits.format_sample_results(fidelity)
  assert "reconstructions" in report and all(p.replace("_", " ") in report for p in phases)

  # Decoding in chunks (padded last chunk) equals one big call; preview grids are capped, the npz is whole.
  loaded = loader.Stage2Model(os.path.join(workdir, "stage2"), decode_batch_size=16)
  chunked = loader.Stage2Model(os.path.join(workdir, "stage2"), decode_batch_size=3)
  flat = codes.reshape(10, -1, 2)
  whole = loaded.images(flat)
  # (Other batch shapes compile to other convolution kernels: equal up to float rounding, uint8 up to one level.)
  np.testing.assert_allclose(chunked.images(flat), whole, atol=1e-5)
  near = lambda a, b: np.abs(a.astype(np.int32) - b.astype(np.int32)).max() <= 1  # noqa: E731
  assert near(chunked.images(flat, uint8=True)[..., 0], images[..., 0])
  history = np.stack([flat, flat])
  paths = runner.write_outputs(chunked, history, labels, str(tmp_path / "capped"), ncols=5, preview_per_class=1,
                               preview_classes=3)
  # One sample of each of 3 classes, one column: 3 tiles of 16 px + 2 px padding, enlarged 8x (128 // 16).
  assert Image.open(paths["samples_png"]).size == (8 * (18 + 2), 8 * (3 * 18 + 2))
  with np.load(paths["samples_npz"]) as f:
    assert f["arr_0"].shape == images.shape and near(f["arr_0"], images)  # all 10, although the grid shows 3
  assert not any(n.startswith(".samples") for n in os.listdir(tmp_path / "capped"))  # scratch file removed
  with pytest.raises(ValueError, match=r"codes must lie in \[0, 16\)"):
    loaded.images(flat + 16)
  with pytest.raises(ValueError, match="samples_per_class must be >= 1"):
    runner.sample_all_classes(os.path.join(workdir, "stage2"), str(tmp_path / "none"), samples_per_class=0)
