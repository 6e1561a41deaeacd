"""The depth transformer's key/value cache: D cached steps give the logits of the plain causal pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxrq_jax.models import transformer

K, D, NZ = 16, 4, 8


def _model(**kw):
  return transformer.ContextualRQTransformer(vocab_size=K, code_depth=D, num_positions=8, embed_dim=NZ, width=32,
                                             num_heads=4, spatial_layers=1, depth_layers=2, num_classes=3, **kw)


def test_cached_depth_steps_equal_the_causal_pass():
  model = _model()
  codebook = jax.random.normal(jax.random.key(1), (K, NZ))
  variables = jax.jit(model.init)(jax.random.key(0), *transformer.init_inputs(model, 1)[:3], codebook)
  # Sharper weights than the N(0, 0.02) init, so that a wrong cache would show.
  variables = jax.tree.map(lambda x: x * 8.0, variables)
  h = jax.random.normal(jax.random.key(2), (2, 5, 32))
  codes = jax.random.randint(jax.random.key(3), (2, 5, D), 0, K)
  depth = jax.jit(lambda v, h, c, e, at: model.apply(v, h, c, e, at=at, method=model.depth), static_argnums=4)
  step = jax.jit(lambda v, h, c, e, cache, at: model.apply(v, h, c, e, cache, at=at, method=model.depth_step),
                 static_argnums=5)
  head = jax.jit(lambda v, z: model.apply(v, z, method=model.logits))
  full = depth(variables, h, codes, codebook, None)  # [B, M, D, K]
  tol = {"rtol": 1e-4, "atol": 1e-4 * float(jnp.abs(full).max())}
  cache = None
  for d in range(D):
    # Codes at depths >= d are never read: placeholders there change nothing.
    placeholder = codes.at[:, :, d:].set(-1)
    z, cache = step(variables, h, placeholder, codebook, cache, d)
    assert z.shape == (2, 5, 32)
    assert len(cache) == 2 and cache[0][0].shape == (10, d + 1, 4, 8)
    logits = head(variables, z)
    np.testing.assert_allclose(logits, full[:, :, d], **tol)
    if d in (0, D - 1):  # `at=d` computes depth d alone (the first and the last: no earlier or later depth read)
      np.testing.assert_allclose(logits, depth(variables, h, codes, codebook, d), **tol)
  # Rematerialisation (training memory) changes no value: the same parameters give the same causal pass and step.
  remat = _model(remat=True)
  np.testing.assert_allclose(
      jax.jit(lambda v: remat.apply(v, h, codes, codebook, method=remat.depth))(variables), full, **tol)
  z0, _ = jax.jit(lambda v: remat.apply(v, h, codes, codebook, None, at=0, method=remat.depth_step))(variables)
  np.testing.assert_allclose(head(variables, z0), full[:, :, 0], **tol)


def test_guidance_on_features_equals_guidance_on_logits():
  model = _model()
  codebook = jax.random.normal(jax.random.key(1), (K, NZ))
  variables = jax.jit(model.init)(jax.random.key(0), *transformer.init_inputs(model, 1)[:3], codebook)
  zc, zu = jax.random.normal(jax.random.key(4), (2, 3, 32))
  s = 1.8
  head = lambda z: model.apply(variables, z, method=model.logits)  # noqa: E731
  want = head(zc) + s * (head(zc) - head(zu))
  np.testing.assert_allclose(head((1 + s) * zc - s * zu), want, rtol=1e-5, atol=1e-5)


def test_depth_step_checks_its_cache():
  model = _model()
  codebook = jnp.zeros((K, NZ))
  variables = jax.jit(model.init)(jax.random.key(0), *transformer.init_inputs(model, 1)[:3], codebook)
  h, codes = jnp.zeros((1, 2, 32)), jnp.zeros((1, 2, D), jnp.int32)
  with pytest.raises(ValueError, match="needs the cache"):
    model.apply(variables, h, codes, codebook, None, at=1, method=model.depth_step)
  with pytest.raises(ValueError, match="depth index"):
    model.apply(variables, h, codes, codebook, None, at=D, method=model.depth_step)
