"""Stage-1 losses and the reconstruction metric: reconstruction, PSNR, and the VQGAN-style adversarial terms.

Pure functions of arrays. Images are float [B, H, W, C] in [-1, 1].
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def reconstruction_loss(x: jax.Array, recon: jax.Array, kind: str) -> jax.Array:
  """Mean 'mse' or 'l1' reconstruction loss between images [B, H, W, C]. Scalar float32."""
  chex.assert_equal_shape([x, recon])
  diff = recon.astype(jnp.float32) - x.astype(jnp.float32)
  if kind == "mse":
    return jnp.mean(diff**2)
  if kind == "l1":
    return jnp.mean(jnp.abs(diff))
  raise ValueError(f"unknown reconstruction loss {kind!r}; expected 'mse' or 'l1'")


def psnr(x: jax.Array, y: jax.Array) -> jax.Array:
  """Per-image PSNR in dB of reconstructions `y` against images `x`, both [B, H, W, C] on [-1, 1] (peak 1 on the
  [0, 1] scale). Returns [B].

  `y` is clipped to [-1, 1] first: the decoder's output can leave the image range, and every image made from it
  (saved grids, samples, uint8 arrays) is clipped, so the PSNR is that of the image a user sees.
  """
  y = jnp.clip(y.astype(jnp.float32), -1.0, 1.0)
  mse01 = jnp.mean(((x.astype(jnp.float32) - y) / 2.0) ** 2, axis=(1, 2, 3))
  return -10.0 * jnp.log10(jnp.maximum(mse01, 1e-12))


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """Discriminator hinge loss 0.5 (mean relu(1 - real) + mean relu(1 + fake)). Any shapes; scalar float32."""
  real = jnp.mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)))
  fake = jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32)))
  return 0.5 * (real + fake)


def generator_loss(logits_fake: jax.Array) -> jax.Array:
  """Generator adversarial loss -mean(logits on reconstructions). Scalar float32."""
  return -jnp.mean(logits_fake.astype(jnp.float32))


def adaptive_weight(nll_grad_last: jax.Array, g_grad_last: jax.Array, max_weight: float = 1e4) -> jax.Array:
  """VQGAN adaptive weight ||grad nll|| / (||grad g|| + 1e-4), clipped to [0, max_weight], no gradient.

  Both gradients are taken w.r.t. the same last decoder layer (the decoder's `conv_out` kernel); the caller scales
  the result by the configured disc_weight.

  Args:
    nll_grad_last: gradient of the reconstruction (+ perceptual) loss w.r.t. the last layer's weights.
    g_grad_last: gradient of `generator_loss` w.r.t. the same weights.
    max_weight: upper clip.

  Returns:
    scalar float32.
  """
  chex.assert_equal_shape([nll_grad_last, g_grad_last])
  nll_norm = jnp.linalg.norm(nll_grad_last.astype(jnp.float32).reshape(-1))
  g_norm = jnp.linalg.norm(g_grad_last.astype(jnp.float32).reshape(-1))
  return jax.lax.stop_gradient(jnp.clip(nll_norm / (g_norm + 1e-4), 0.0, max_weight))


def disc_factor(step: jax.Array, disc_start: int) -> jax.Array:
  """1.0 once `step` >= disc_start (the GAN terms are switched on), else 0.0. Scalar float32."""
  return jnp.where(jnp.asarray(step) >= disc_start, 1.0, 0.0).astype(jnp.float32)
