"""`bench stage1` on a tiny RQ-VAE: the recipe's loss terms one row each, and what the GAN term costs."""

import os
import subprocess
import sys

import pytest

from ctxrq_jax.benchmarks import stage1_step
from tests import helpers


@pytest.mark.slow
def test_rows_add_one_term_each_and_the_gan_term_does_not_run_the_decoder_again():
  config = helpers.tiny_stage1_config()
  with config.unlocked():
    config.model.ch_mult = (1, 2)
    config.loss.gan = True  # LPIPS off (as in the demo): the GAN term's cost against the step without it
    config.loss.disc_start = 10  # the bench switches the GAN term on from the first step
    config.loss.disc_ndf = 8
    config.loss.disc_layers = 1
  assert [name for name, _ in stage1_step.recipe_variants(config)] == ["recon", "+ GAN"]
  rows = stage1_step.bench_stage1(config, batch=2, repeats=1, seed=0)
  recon, gan = (r["flops"] for r in rows)
  assert all(r["step_s"] > 0 and r["batch"] == 2 for r in rows)
  # The adaptive weight's last-layer gradients come from the step's own backward: the GAN term adds the small
  # discriminator (forward and backward for both players; +6% here), not another decoder pass (+29% with the
  # previous trainer's re-decode; with LPIPS on, that pass also ran LPIPS forward and backward again).
  assert recon < gan < 1.15 * recon, (recon, gan)
  table = stage1_step.format_table(rows)
  assert "+ GAN" in table and "full recipe / recon only" in table
  full = config.copy_and_resolve_references()
  with full.unlocked():
    full.loss.perceptual = True
  assert [name for name, _ in stage1_step.recipe_variants(full)] == ["recon", "+ LPIPS", "+ GAN"]


@pytest.mark.parametrize("args, message", [
    (["stage1", "--config=configs/imagenet.py:tiny"], "stage1 needs --config=<a stage-1 config>"),
    # Checked as `train_rqvae` checks it, before anything is compiled.
    (["stage1", "--config=configs/rqvae_mnist.py", "--config.train.nonfinite=ignore"],
     "error: train.nonfinite must be 'stop' or 'skip', got 'ignore'"),
    # Numbers the bench cannot time are refused before any work (as absl refuses --repeats=0).
    (["sample", "--config=configs/imagenet.py:tiny", "--t_draft=8,0"], "--t_draft must be integers >= 1"),
])
def test_bad_input_is_a_one_line_usage_error(args, message):
  out = subprocess.run([sys.executable, "-m", "ctxrq_jax.bench", *args], capture_output=True, text=True, timeout=120,
                       check=False, cwd=helpers.REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
