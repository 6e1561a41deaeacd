"""Held-out reconstruction metrics (ctxrq_jax/stage1/reconstruction.py): LPIPS beside PSNR."""

import jax
import numpy as np
import pytest

from ctxrq_jax.models import lpips
from ctxrq_jax.models import lpips_weights
from ctxrq_jax.stage1 import reconstruction
from tests import helpers


def test_evaluate_rqvae_reports_lpips_beside_psnr(tiny_rqvae):
  try:
    lpips_variables = lpips_weights.load_variables()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  model, variables, _ = tiny_rqvae
  data = helpers.tiny_stage1_config().data  # 16x16 embedded digits, as the tiny model takes
  plain = reconstruction.evaluate_rqvae(model, variables, data, split="test", num_examples=6, batch_size=3)
  assert "lpips" not in plain and "LPIPS" not in reconstruction.format_rqvae_results(plain)
  got = reconstruction.evaluate_rqvae(model, variables, data, split="test", num_examples=6, batch_size=3,
                                      lpips_variables=lpips_variables)
  assert got["psnr"] == plain["psnr"] and got["num_examples"] == 6
  # The same images and reconstructions scored directly (batches of 3: the shapes already compiled above).
  from ctxrq_jax.data import images as image_data  # pylint: disable=g-import-not-at-top
  batches = helpers.take(image_data.make_image_iterator(data, split="test", batch_size=3, seed=0, train=False), 2)
  dist = jax.jit(lpips.lpips_distance)
  direct = np.concatenate([np.asarray(dist(lpips_variables, b["image"], model.apply(variables, b["image"])["recon"]))
                           for b in batches])
  assert got["lpips"] == pytest.approx(float(direct.mean()), rel=1e-4) and got["lpips"] > 0
  assert f"{got['lpips']:.4f}" in reconstruction.format_rqvae_results(got)
