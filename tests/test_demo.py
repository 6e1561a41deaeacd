"""The demo pipeline end to end on tiny configs: stage 1 -> codes -> stage 2 -> samples -> evaluation."""

import os

import numpy as np
from PIL import Image

from ctxrq_jax import configlib
from ctxrq_jax import demo
from ctxrq_jax import evaluate
from tests.test_train_rqvae import tiny_config


def tiny_stage2_config():
  c = configlib.load_config_file("demo")
  with c.unlocked():
    c.model.width = 32
    c.model.num_heads = 2
    c.model.spatial_layers = 1
    c.model.depth_layers = 1
    c.data.code_shape = (4, 4, 2)
    c.data.vocab_size = 16
    c.data.embed_dim = 8
    c.train.batch_size = 8
    c.train.num_steps = 2
    c.train.log_every = 1
    c.train.eval_every = 2
    c.train.ckpt_every = 2
    c.sample.T_draft = 4
    c.sample.batch_size = 8
  return c


def test_demo_pipeline_writes_samples_and_evaluates(tmp_path):
  workdir = str(tmp_path / "demo")
  summary = demo.run(tiny_config(num_steps=2), tiny_stage2_config(), workdir, samples_per_class=1)
  out = summary["outputs"]
  with np.load(out["samples_npz"]) as f:
    images, labels, codes = f["arr_0"], f["labels"], f["codes"]
  assert images.shape == (10, 16, 16, 3) and images.dtype == np.uint8  # RGB for FID evaluators
  np.testing.assert_array_equal(labels, np.arange(10))
  assert codes.shape == (10, 4, 4, 2) and codes.min() >= 0 and codes.max() < 16
  # The draft and its 2 revisions side by side: three panels as wide as the final grid.
  assert Image.open(out["phases_png"]).width >= 3 * Image.open(out["samples_png"]).width

  stage2 = evaluate.evaluate_stage2(os.path.join(workdir, "stage2"), num_draws=1)
  assert np.isfinite(stage2["nll"]) and stage2["masked_codes"] > 0
  assert 0 < stage2["unigram_per_depth"] <= stage2["unigram_pooled"] + 1e-6 <= np.log(16) + 1e-6
  assert "NLL / per-depth unigram entropy" in evaluate.format_stage2_results(stage2)

  fidelity = evaluate.evaluate_samples(os.path.join(workdir, "stage2"), samples_per_class=2, classifier_steps=5)
  assert fidelity["num_samples"] == 20
  phases = ["draft", "revision_1", "revision_2"]
  for key in ["classifier_test_accuracy", "classifier_reconstruction_accuracy"] + [f"{p}_accuracy" for p in phases]:
    assert 0.0 <= fidelity[key] <= 1.0, key
  report = evaluate.format_sample_results(fidelity)
  assert "reconstructions" in report and all(p in report for p in phases)
