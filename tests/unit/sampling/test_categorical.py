"""Inverse-CDF sampling with one uniform per code (`sample_categorical`) draws from the softmax it should."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxrq_jax.sampling import logits as logits_lib

PS = logits_lib.PhaseSettings


# k = 7: blocks of 3 codes, the last one padded; k = 64: 8 full blocks of 8.
@pytest.mark.parametrize("k", [7, 64])
def test_frequencies_match_softmax(k):
  rows = 40_000
  logits = jax.random.normal(jax.random.key(0), (k,)) * 2.0
  u = 1.0 - jax.random.uniform(jax.random.key(1), (rows,))
  codes, lp = jax.jit(lambda l, u: logits_lib.sample_categorical(jnp.broadcast_to(l, (rows, k)), u, PS().sampler()))(
      logits, u)
  probs = np.asarray(jax.nn.softmax(logits))
  freq = np.bincount(np.asarray(codes), minlength=k) / rows
  # Total variation within sampling error (~sqrt(k / rows)).
  assert 0.5 * np.abs(freq - probs).sum() < 1.5 * np.sqrt(k / rows) + 0.01
  np.testing.assert_allclose(lp, np.log(probs)[np.asarray(codes)], rtol=1e-4, atol=1e-5)


def test_filtered_codes_are_never_drawn_and_extremes_of_u():
  k = 50
  logits = jax.random.normal(jax.random.key(2), (3, k))
  u = jnp.array([1.0, 1e-30, 0.5])  # both ends of (0, 1]
  # (settings, the logits it leaves drawable, or None): a drawn code is always one of them, whatever u.
  cases = ((PS(top_k=3), logits_lib.filter_top_k(logits, 3)), (PS(top_p=0.3), logits_lib.filter_top_p(logits, 0.3)),
           (PS(temperature=1e-6), None), (PS(top_k=1), None))
  for settings, filtered in cases:
    codes, _ = logits_lib.sample_categorical(logits, u, settings.sampler())
    if filtered is not None:
      kept = np.asarray(filtered > -jnp.inf)
      assert 1 < kept.sum(-1).min() and kept.sum(-1).max() < k  # a real choice, and some codes filtered out
      assert kept[np.arange(3), np.asarray(codes)].all()
    if settings.top_k == 1 or settings.temperature < 1e-3:
      np.testing.assert_array_equal(codes, jnp.argmax(logits, -1))
  greedy, lp = logits_lib.sample_categorical(logits, u, PS(temperature=0.0).sampler())
  np.testing.assert_array_equal(greedy, jnp.argmax(logits, -1))
  np.testing.assert_allclose(lp, jnp.max(jax.nn.log_softmax(logits), -1), rtol=1e-5)


def test_uniforms_depend_on_position_not_slot():
  key = jax.random.key(6, impl="threefry2x32")
  full = logits_lib.sampling_uniforms(key, jnp.broadcast_to(jnp.arange(16), (2, 16)), 1)
  pos = jnp.array([[7, 2], [0, 15]])
  np.testing.assert_array_equal(logits_lib.sampling_uniforms(key, pos, 1), jnp.take_along_axis(full, pos, 1))
  assert float(full.min()) > 0 and float(full.max()) <= 1
