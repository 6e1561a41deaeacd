"""Per-phase sampling settings and what they do to logits (ctxrq_jax/sampling/logits.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ctxrq_jax.core import config as configlib
from ctxrq_jax.sampling import logits as logits_lib

N, K = 16, 8
PS = logits_lib.PhaseSettings


def test_sampling_helpers():
  logits = jax.random.normal(jax.random.key(4), (5, K)) * 3
  noise = jax.random.gumbel(jax.random.key(5), (5, K))
  argmax = jnp.argmax(logits, -1)
  greedy, lp = logits_lib.sample_logits(logits, noise, PS(temperature=0.0).sampler())
  np.testing.assert_array_equal(greedy, argmax)
  np.testing.assert_allclose(lp, jnp.max(jax.nn.log_softmax(logits), -1), rtol=1e-6)
  np.testing.assert_array_equal(logits_lib.sample_logits(logits, noise, PS(temperature=1e-6).sampler())[0], argmax)
  np.testing.assert_array_equal(logits_lib.sample_logits(logits, noise, PS(top_k=1).sampler())[0], argmax)
  np.testing.assert_array_equal(logits_lib.sample_logits(logits, noise, PS(top_p=1e-6).sampler())[0], argmax)
  sampled = logits_lib.sample_logits(logits, noise, PS().sampler())[0]
  np.testing.assert_array_equal(sampled, jnp.argmax(logits + noise, -1))
  assert (logits_lib.filter_top_k(logits, 3) > -jnp.inf).sum(-1).tolist() == [3] * 5
  kept = logits_lib.filter_top_p(logits, jnp.float32(0.9)) > -jnp.inf
  probs = jax.nn.softmax(logits)
  assert (jnp.where(kept, probs, 0).sum(-1) >= 0.9 - 1e-6).all()
  cond, uncond = logits[:2], logits[2:4]
  np.testing.assert_array_equal(logits_lib.guide_logits(cond, uncond, 0.0), cond)
  np.testing.assert_allclose(logits_lib.guide_logits(cond, uncond, 1.5), 2.5 * cond - 1.5 * uncond, rtol=1e-5, atol=1e-5)


def test_gumbel_noise_depends_on_position_not_slot():
  key = jax.random.key(6, impl='threefry2x32')  # the samplers always derive threefry keys
  full = logits_lib.gumbel_noise(key, jnp.broadcast_to(jnp.arange(N), (2, N)), 1, K)
  pos = jnp.array([[7, 2], [0, 15]])
  np.testing.assert_array_equal(logits_lib.gumbel_noise(key, pos, 1, K), jnp.take_along_axis(full, pos[..., None], 1))


def test_phase_settings_from_config():
  revise = configlib.load_config_file("imagenet", "tiny").sample.revise
  assert PS.from_config(revise) == PS(temperature=0.8, top_k=0, top_p=1.0, guidance_scale=1.8)
  section = ml_collections.ConfigDict(dict(temperature=0.0, guidance=0.0, top_k=3, top_p=0.5))
  settings = PS.from_config(section)
  assert settings == PS(temperature=0.0, top_k=3, top_p=0.5, guidance_scale=0.0)
  sampler = settings.sampler()
  assert (sampler.top_k, sampler.guided, sampler.nucleus) == (3, False, True)
  with pytest.raises(ValueError, match="top_k must be an integer >= 0"):
    PS.from_config(dict(section, top_k=-1))
