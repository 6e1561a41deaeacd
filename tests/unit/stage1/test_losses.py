"""Stage-1 losses and the reconstruction metric (ctxrq_jax/stage1/losses.py) on hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxrq_jax.stage1 import losses


def test_adversarial_losses():
  real, fake = jnp.array([2.0, 0.5, -1.0]), jnp.array([-2.0, 0.0, 1.0])
  # 0.5 * (mean(0, 0.5, 2) + mean(0, 1, 2))
  assert float(losses.hinge_d_loss(real, fake)) == pytest.approx(0.5 * (2.5 / 3 + 3.0 / 3))
  assert float(losses.generator_loss(fake)) == pytest.approx(1.0 / 3)
  w = losses.adaptive_weight(jnp.array([3.0, 4.0]), jnp.array([0.0, 2.0]))
  assert float(w) == pytest.approx(5.0 / (2.0 + 1e-4))
  assert float(losses.adaptive_weight(jnp.ones(2), jnp.zeros(2), max_weight=100.0)) == 100.0
  g = jax.grad(lambda a: losses.adaptive_weight(a, jnp.ones(2)))(jnp.ones(2))
  assert float(jnp.abs(g).sum()) == 0.0
  assert float(losses.disc_factor(9, 10)) == 0.0 and float(losses.disc_factor(10, 10)) == 1.0


def test_psnr_known_values():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(-1, 0.7, (3, 4, 4, 2)).astype(np.float32))
  # Identical images: the MSE floor 1e-12 caps the PSNR at -10 log10(1e-12) = 120 dB.
  np.testing.assert_allclose(np.asarray(losses.psnr(x, x)), [120.0] * 3, rtol=1e-6)
  # A constant offset of 0.2 on [-1, 1] is 0.1 on [0, 1]: MSE 0.01, PSNR 20 dB, for every image.
  got = np.asarray(losses.psnr(x, x + 0.2))
  assert got.shape == (3,)
  np.testing.assert_allclose(got, [20.0] * 3, rtol=1e-5)
  # The reconstruction is clipped to the image range first: -1.5 where the image is -1 is no error at all, and 1.4
  # against 0.6 is an error of 0.4 (0.2 on [0, 1]), not 0.8.
  np.testing.assert_allclose(np.asarray(losses.psnr(-jnp.ones((1, 2, 2, 1)), jnp.full((1, 2, 2, 1), -1.5))), [120.0],
                             rtol=1e-6)
  np.testing.assert_allclose(np.asarray(losses.psnr(jnp.full((1, 2, 2, 1), 0.6), jnp.full((1, 2, 2, 1), 1.4))),
                             [-10 * np.log10(0.04)], rtol=1e-5)
  # Full range apart (-1 vs 1): MSE 1 on [0, 1], 0 dB. Per image, not pooled.
  both = jnp.stack([jnp.full((4, 4, 1), -1.0), jnp.full((4, 4, 1), 0.5)])
  np.testing.assert_allclose(np.asarray(losses.psnr(both, jnp.stack([jnp.ones((4, 4, 1)), jnp.full((4, 4, 1), 0.3)]))),
                             [0.0, 20.0], atol=1e-5)


def test_reconstruction_loss_known_values():
  x = jnp.zeros((1, 2, 2, 1))
  y = jnp.array([1.0, -1.0, 2.0, 0.0]).reshape(1, 2, 2, 1)
  assert float(losses.reconstruction_loss(x, y, "mse")) == pytest.approx((1 + 1 + 4 + 0) / 4)
  assert float(losses.reconstruction_loss(x, y, "l1")) == pytest.approx((1 + 1 + 2 + 0) / 4)
  with pytest.raises(ValueError, match="unknown reconstruction loss 'l2'"):
    losses.reconstruction_loss(x, y, "l2")
