"""Held-out reconstruction metrics (ctxrq_jax/stage1/reconstruction.py): LPIPS beside PSNR; coarse-to-fine
reconstructions from the first d codes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxrq_jax.models import lpips
from ctxrq_jax.models import lpips_weights
from ctxrq_jax.models import rq
from ctxrq_jax.models import rqvae
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
  # The same images and reconstructions scored directly (batches of 3, and the model and LPIPS jitted apart: the
  # programs already compiled above).
  from ctxrq_jax.data import images as image_data  # pylint: disable=g-import-not-at-top
  batches = helpers.take(image_data.make_image_iterator(data, split="test", batch_size=3, seed=0, train=False), 2)
  recon, dist = jax.jit(lambda v, x: model.apply(v, x)), jax.jit(lpips.lpips_distance)
  direct = np.concatenate([np.asarray(dist(lpips_variables, b["image"],
                                            jnp.clip(recon(variables, b["image"])["recon"], -1, 1)))
                           for b in batches])
  assert got["lpips"] == pytest.approx(float(direct.mean()), rel=1e-4) and got["lpips"] > 0
  assert f"{got['lpips']:.4f}" in reconstruction.format_rqvae_results(got)


def test_evaluate_rqvae_scores_the_reconstruction_clipped_to_the_image_range(tiny_rqvae):
  # A decoder whose output leaves [-1, 1] (its last bias shifted by +3): PSNR and MSE are those of the clipped
  # reconstruction, the image every grid and sample array shows, not of the raw output.
  model, variables, _ = tiny_rqvae
  shifted = jax.tree_util.tree_map_with_path(
      lambda path, v: v + 3.0 if "conv_out" in jax.tree_util.keystr(path) and "decoder" in jax.tree_util.keystr(path)
      and "bias" in jax.tree_util.keystr(path) else v, variables)
  data = helpers.tiny_stage1_config().data
  got = reconstruction.evaluate_rqvae(model, shifted, data, split="test", num_examples=6, batch_size=3)
  from ctxrq_jax.data import images as image_data  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.stage1 import losses  # pylint: disable=g-import-not-at-top
  batches = helpers.take(image_data.make_image_iterator(data, split="test", batch_size=3, seed=0, train=False), 2)
  x = np.concatenate([b["image"] for b in batches])
  raw = np.asarray(jax.jit(lambda v, x: model.apply(v, x))(shifted, jnp.asarray(x))["recon"])
  assert raw.max() > 1.5  # the shift does push the output out of range
  clipped = np.clip(raw, -1, 1)
  mse = ((x - clipped) ** 2).mean(axis=(1, 2, 3))
  assert got["mse"] == pytest.approx(float(mse.mean()), rel=1e-5)
  assert got["psnr"] == pytest.approx(float(np.mean(-10 * np.log10(mse / 4))), rel=1e-5)
  assert got["psnr"] > float(np.mean(-10 * np.log10(((x - raw) ** 2).mean(axis=(1, 2, 3)) / 4))) + 1.0
  np.testing.assert_allclose(np.asarray(losses.psnr(jnp.asarray(x), jnp.asarray(raw))),
                             -10 * np.log10(mse / 4), rtol=1e-5)


def test_coarse_to_fine_decodes_partial_sums_of_the_codes(tiny_rqvae):
  model, variables, x = tiny_rqvae
  recon, codes = reconstruction.coarse_to_fine(model, variables, x)
  depth = model.code_depth
  assert recon.shape == (depth, *x.shape) and codes.shape == (x.shape[0], *model.code_shape)
  codebook = variables["quantizer"]["codebook"]

  @jax.jit
  def reference(v, x, codes):  # the model's pass, and the decoder on the sum of the first d code embeddings
    decode = lambda d: model.apply(v, rq.embed_codes(codes[..., :d], codebook), method=rqvae.RQVAE.decode)
    return model.apply(v, x), [decode(d) for d in range(1, depth)]

  full, partial = reference(variables, x, jnp.asarray(codes))
  np.testing.assert_array_equal(codes, full["codes"])
  np.testing.assert_allclose(recon[-1], np.clip(full["recon"], -1, 1), atol=1e-5)  # all D codes: the model's own
  for d in range(1, depth):
    np.testing.assert_allclose(recon[d - 1], np.clip(partial[d - 1], -1, 1), atol=1e-5)
  assert not np.allclose(recon[0], recon[-1])
