"""Tests for ctxrq_jax/models/rq.py (residual quantization, the EMA codebook and codebook statistics)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxrq_jax.models import rq


def _brute_force_codes(z: np.ndarray, codebook: np.ndarray) -> np.ndarray:
  d = ((z[..., None, :] - codebook) ** 2).sum(-1)
  return d.argmin(-1)


def test_nearest_code_chunked_matches_brute_force_large_k():
  rng = np.random.default_rng(0)
  codebook = rng.normal(size=(5000, 6)).astype(np.float32)
  z = rng.normal(size=(3, 11, 6)).astype(np.float32)  # 33 vectors: not a multiple of the chunk
  got = rq.nearest_code(jnp.asarray(z), jnp.asarray(codebook), chunk_size=7)
  assert got.shape == (3, 11) and got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), _brute_force_codes(z, codebook))
  # One chunk holding everything gives the same answer.
  np.testing.assert_array_equal(np.asarray(rq.nearest_code(z, codebook, chunk_size=10_000)), np.asarray(got))


def test_nearest_code_ties_go_to_lowest_index():
  codebook = jnp.array([[5.0, 5.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
  z = jnp.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])  # exact copies of rows 1/2; equidistant to 1, 2, 3; row 3
  np.testing.assert_array_equal(np.asarray(rq.nearest_code(z, codebook, chunk_size=2)), [1, 1, 3])


def test_nearest_code_rejects_mismatched_sizes():
  with pytest.raises(ValueError, match="embedding size"):
    rq.nearest_code(jnp.zeros((4, 3)), jnp.zeros((8, 5)))
  with pytest.raises(ValueError, match="chunk_size"):
    rq.nearest_code(jnp.zeros((4, 3)), jnp.zeros((8, 3)), chunk_size=0)


def test_depth_one_rq_is_vq():
  rng = np.random.default_rng(1)
  codebook = rng.normal(size=(32, 4)).astype(np.float32)
  z = rng.normal(size=(2, 5, 5, 4)).astype(np.float32)
  codes, sums = rq.rq_quantize(jnp.asarray(z), jnp.asarray(codebook), depth=1)
  assert codes.shape == (2, 5, 5, 1) and sums.shape == (2, 5, 5, 1, 4)
  vq = _brute_force_codes(z, codebook)
  np.testing.assert_array_equal(np.asarray(codes[..., 0]), vq)
  np.testing.assert_allclose(np.asarray(sums[..., 0, :]), codebook[vq], rtol=0, atol=0)


def test_residual_norm_non_increasing_and_exact_on_codebook_data():
  rng = np.random.default_rng(2)
  # With the zero vector in the codebook, the nearest code never does worse than subtracting nothing.
  codebook = np.concatenate([np.zeros((1, 8)), rng.normal(size=(63, 8))]).astype(np.float32)
  z = rng.normal(size=(200, 8)).astype(np.float32)
  codes, sums = rq.rq_quantize(jnp.asarray(z), jnp.asarray(codebook), depth=4)
  norms = np.linalg.norm(np.asarray(rq.residuals(z, sums)), axis=-1)  # [M, D]: ||r_0|| .. ||r_{D-1}||
  last = np.linalg.norm(z - np.asarray(sums[:, -1]), axis=-1)
  norms = np.concatenate([norms, last[:, None]], axis=1)
  assert np.all(np.diff(norms, axis=1) <= 1e-5)
  assert np.mean(last) < np.mean(norms[:, 0])  # and RQ actually helps
  # Data made of sums of two codes (far apart scales) is reconstructed exactly by depth 2.
  big = codebook[1:9] * 10.0
  fit_codebook = np.concatenate([big, codebook[9:]]).astype(np.float32)
  data = big[rng.integers(0, 8, 50)] + codebook[9:][rng.integers(0, 55, 50)]
  codes, sums = rq.rq_quantize(jnp.asarray(data), jnp.asarray(fit_codebook), depth=3)
  np.testing.assert_allclose(np.asarray(sums[:, 1]), data, atol=1e-5)


def test_embed_codes_round_trip_and_commitment_loss():
  rng = np.random.default_rng(3)
  codebook = jnp.asarray(rng.normal(size=(16, 4)).astype(np.float32))
  z = jnp.asarray(rng.normal(size=(2, 3, 3, 4)).astype(np.float32))
  codes, sums = rq.rq_quantize(z, codebook, depth=3)
  np.testing.assert_allclose(np.asarray(rq.embed_codes(codes, codebook)), np.asarray(sums[..., -1, :]), atol=1e-6)
  want = np.mean([np.mean((np.asarray(z) - np.asarray(sums[..., d, :])) ** 2) for d in range(3)])
  np.testing.assert_allclose(float(rq.commitment_loss(z, sums)), want, rtol=1e-6)
  # The commitment gradient reaches z only; straight-through passes the identity gradient.
  g_sums = jax.grad(lambda s: rq.commitment_loss(z, s))(sums)
  assert float(jnp.abs(g_sums).max()) == 0.0
  g_z = jax.grad(lambda x: jnp.sum(rq.straight_through(x, sums[..., -1, :]) * 3.0))(z)
  np.testing.assert_allclose(np.asarray(g_z), 3.0)
  np.testing.assert_allclose(np.asarray(rq.straight_through(z, sums[..., -1, :])), np.asarray(sums[..., -1, :]),
                             atol=1e-6)


def test_residuals_are_what_each_depth_quantized():
  codebook = jnp.array([[0.0, 0.0], [4.0, 0.0], [1.0, 1.0]])
  z = jnp.array([[5.0, 1.0]])
  codes, sums = rq.rq_quantize(z, codebook, depth=2)
  np.testing.assert_array_equal(np.asarray(codes), [[1, 2]])
  np.testing.assert_allclose(np.asarray(rq.residuals(z, sums)), [[[5.0, 1.0], [1.0, 1.0]]])


def test_ema_update_matches_closed_form():
  k, decay, eps = 3, 0.9, 1e-3
  state = rq.CodebookState(
      codebook=jnp.zeros((k, 2)), cluster_size_ema=jnp.array([2.0, 1.0, 0.5]),
      embed_ema=jnp.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
  vectors = jnp.array([[1.0, 1.0], [3.0, -1.0], [0.0, 2.0]])
  codes = jnp.array([0, 0, 1])
  new = jax.jit(rq.ema_update, static_argnums=(3, 4))(state, vectors, codes, decay, eps)
  c = np.array([0.9 * 2.0 + 0.1 * 2, 0.9 * 1.0 + 0.1 * 1, 0.9 * 0.5])
  s = np.array([[0.9 * 2 + 0.1 * 4, 0.1 * 0], [0.1 * 0, 0.9 + 0.1 * 2], [0.9, 0.9]])
  n = c.sum()
  smoothed = n * (c + eps) / (n + k * eps)
  np.testing.assert_allclose(np.asarray(new.cluster_size_ema), c, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(new.embed_ema), s, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(new.codebook), s / smoothed[:, None], rtol=1e-6, atol=1e-7)


def test_create_state_is_a_fixed_point_of_smoothing():
  codebook = jnp.asarray(np.random.default_rng(4).normal(size=(10, 3)).astype(np.float32))
  state = rq.CodebookState.create(codebook)
  np.testing.assert_allclose(
      np.asarray(rq.smoothed_codebook(state.cluster_size_ema, state.embed_ema, 1e-5)), np.asarray(codebook),
      rtol=1e-6)


@pytest.mark.parametrize("num_vectors", [3, 50])  # fewer than K (tiled with noise) and more than K
def test_restart_replaces_exactly_the_dead_codes(num_vectors):
  k, eps = 6, 1e-5
  rng = np.random.default_rng(5)
  sizes = np.array([5.0, 0.5, 2.0, 0.0, 1.0, 0.99], np.float32)
  embed = rng.normal(size=(k, 4)).astype(np.float32)
  state = rq.CodebookState(codebook=jnp.zeros((k, 4)), cluster_size_ema=jnp.asarray(sizes),
                           embed_ema=jnp.asarray(embed))
  vectors = rng.normal(size=(num_vectors, 4)).astype(np.float32) + 10.0  # far from every current embedding
  new = jax.jit(rq.restart_dead_codes)(state, jnp.asarray(vectors), jax.random.key(0))
  dead = sizes < 1.0
  new_sizes, new_embed = np.asarray(new.cluster_size_ema), np.asarray(new.embed_ema)
  np.testing.assert_array_equal(new_sizes[~dead], sizes[~dead])
  np.testing.assert_array_equal(new_embed[~dead], embed[~dead])
  np.testing.assert_array_equal(new_sizes[dead], 1.0)
  # Each restarted code sits on (or, when tiled, within noise of) a batch vector.
  dist = np.abs(new_embed[dead][:, None, :] - vectors[None]).max(-1).min(-1)
  assert np.all(dist < 0.05)
  if num_vectors >= k:  # drawn without replacement
    assert len({tuple(v) for v in new_embed[dead]}) == dead.sum()
  np.testing.assert_allclose(np.asarray(new.codebook),
                             np.asarray(rq.smoothed_codebook(new.cluster_size_ema, new.embed_ema, eps)), rtol=1e-6)


def test_zero_initial_counts_reseed_every_code_below_the_decay_threshold():
  # The reference's start (counts 0): after one update a code keeps its EMA statistics only if it drew at least
  # 1 / (1 - decay) = 100 vectors; every other code restarts at a batch vector with count 1.
  k, decay, eps = 4, 0.99, 1e-5
  rng = np.random.default_rng(6)
  codebook = jnp.asarray(rng.normal(size=(k, 3)).astype(np.float32))
  state = rq.CodebookState.create(codebook, cluster_size=0.0)
  np.testing.assert_array_equal(np.asarray(state.cluster_size_ema), 0.0)
  np.testing.assert_array_equal(np.asarray(state.embed_ema), np.asarray(codebook))
  codes = jnp.asarray(np.array([0] * 150 + [1] * 99 + [2] * 1, np.int32))  # code 3 draws nothing
  vectors = jnp.asarray(rng.normal(size=(250, 3)).astype(np.float32))
  new = rq.restart_dead_codes(rq.ema_update(state, vectors, codes, decay, eps), vectors, jax.random.key(0), eps)
  np.testing.assert_allclose(np.asarray(new.cluster_size_ema), [1.5, 1.0, 1.0, 1.0], rtol=1e-6)
  expected_sum0 = decay * np.asarray(codebook[0]) + (1 - decay) * np.asarray(vectors[:150]).sum(0)
  np.testing.assert_allclose(np.asarray(new.embed_ema[0]), expected_sum0, rtol=1e-5)
  v = np.asarray(vectors)
  for i in (1, 2, 3):  # re-seeded: a batch vector
    assert np.min(np.abs(v - np.asarray(new.embed_ema[i])).sum(-1)) < 1e-6
  with pytest.raises(ValueError, match="initial cluster size must be >= 0"):
    rq.CodebookState.create(codebook, cluster_size=-1.0)


def test_ema_update_rejects_wrong_vector_size():
  state = rq.CodebookState.create(jnp.zeros((4, 3)))
  with pytest.raises(ValueError, match="vectors have size"):
    rq.ema_update(state, jnp.zeros((5, 2)), jnp.zeros((5,), jnp.int32), 0.99, 1e-5)


def test_codebook_usage():
  # One depth holding the codes 0, 1, 1, 3: three of the 8 codes are used.
  stats = rq.codebook_stats(jnp.array([[0, 1], [1, 3]]).reshape(-1, 1), 8)
  assert float(stats["usage_d1"]) == pytest.approx(3 / 8)


def test_codebook_stats_known_values():
  # Depth 1 uniform over 4 of K = 8 codes: usage 0.5, perplexity exp(log 4) = 4. Depth 2 always code 5: usage 1/8,
  # perplexity 1. Depth 3 uses codes 0 and 1 with probabilities 3/4 and 1/4: perplexity exp(H) = 4 / 3^(3/4).
  d1 = np.array([0, 2, 4, 6] * 4)
  d2 = np.full(16, 5)
  d3 = np.array([0, 0, 0, 1] * 4)
  codes = jnp.asarray(np.stack([d1, d2, d3], -1).reshape(2, 2, 4, 3))  # any leading shape, depth last
  stats = {k: float(v) for k, v in rq.codebook_stats(codes, 8, prefix="eval/").items()}
  assert sorted(stats) == sorted(f"eval/{m}_d{d}" for m in ("usage", "perplexity") for d in (1, 2, 3))
  assert stats["eval/usage_d1"] == pytest.approx(0.5)
  assert stats["eval/perplexity_d1"] == pytest.approx(4.0, rel=1e-6)
  assert stats["eval/usage_d2"] == pytest.approx(1 / 8)
  assert stats["eval/perplexity_d2"] == pytest.approx(1.0, rel=1e-6)
  assert stats["eval/usage_d3"] == pytest.approx(2 / 8)
  assert stats["eval/perplexity_d3"] == pytest.approx(4 / 3 ** 0.75, rel=1e-6)


def _reference_order(z, codebook, counts, sums, depth, decay, eps, restart_key=None):
  """The PyTorch reference's training quantizer in float64 numpy, one depth at a time: find the codes, add the
  depth's (residual, code) pairs to the EMA statistics, restart the codes whose count fell below 1 at this depth's
  residuals (drawn by `rq._candidate_vectors` with the key of the depth), look the embeddings up, then renormalize."""
  k = codebook.shape[0]
  r, codes, partial = z.astype(np.float64), [], np.zeros_like(z, np.float64)
  for d in range(depth):
    nearest = ((r[:, None, :] - codebook[None]) ** 2).sum(-1).argmin(-1)
    onehot = np.eye(k)[nearest]
    counts = decay * counts + (1 - decay) * onehot.sum(0)
    sums = decay * sums + (1 - decay) * onehot.T @ r
    if restart_key is not None:
      drawn = np.asarray(rq._candidate_vectors(jnp.asarray(r, jnp.float32), k, jax.random.fold_in(restart_key, d)))
      dead = counts < 1.0
      sums = np.where(dead[:, None], drawn, sums)
      counts = np.where(dead, 1.0, counts)
    e = codebook[nearest]
    n = counts.sum()
    codebook = sums / (n * (counts + eps) / (n + k * eps))[:, None]
    r, partial = r - e, partial + e
    codes.append(nearest)
  return np.stack(codes, -1), partial, codebook, counts, sums


@pytest.mark.parametrize("restart", [False, True])
def test_updating_quantizer_follows_the_reference_order_depth_by_depth(restart):
  # decay 0.5 moves the codebook enough within one call that depths 2-3 pick other codes than a fixed codebook would;
  # it also halves the counts of the codes a depth leaves unused, so each depth restarts some.
  k, n_z, depth, decay, eps = 8, 3, 3, 0.5, 1e-3
  rng = np.random.default_rng(7)
  z = rng.normal(size=(40, n_z))
  codebook, counts = rng.normal(size=(k, n_z)), rng.uniform(0.5, 2.0, size=k)
  sums = codebook * counts[:, None]
  state = rq.CodebookState(codebook=jnp.asarray(codebook, jnp.float32),
                           cluster_size_ema=jnp.asarray(counts, jnp.float32), embed_ema=jnp.asarray(sums, jnp.float32))
  key = jax.random.key(9) if restart else None
  codes, partial, new = jax.jit(rq.rq_quantize_updating, static_argnums=(2, 3, 4))(
      jnp.asarray(z, jnp.float32), state, depth, decay, eps, key)
  want_codes, want_partial, want_codebook, want_counts, want_sums = _reference_order(
      z, codebook, counts, sums, depth, decay, eps, key)
  np.testing.assert_array_equal(np.asarray(codes), want_codes)
  np.testing.assert_allclose(np.asarray(partial[:, -1]), want_partial, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(new.cluster_size_ema), want_counts, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(new.embed_ema), want_sums, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(new.codebook), want_codebook, rtol=1e-4, atol=1e-5)
  if restart:  # the last depth restarted some codes (count exactly 1)
    assert np.any(np.asarray(new.cluster_size_ema) == 1.0)
  fixed_codes, _ = rq.rq_quantize(jnp.asarray(z, jnp.float32), state.codebook, depth)
  np.testing.assert_array_equal(np.asarray(fixed_codes[:, 0]), want_codes[:, 0])  # depth 1: the same codebook
  assert np.any(np.asarray(fixed_codes) != want_codes)  # later depths saw the moved codebook


def test_updating_quantizer_at_depth_one_is_the_pooled_update_with_restarts():
  # With one depth the two orders coincide: the codes of the fixed codebook, one `ema_update`, one restart.
  k, n_z, decay, eps = 16, 4, 0.9, 1e-5
  rng = np.random.default_rng(8)
  z = jnp.asarray(rng.normal(size=(2, 5, n_z)).astype(np.float32))
  state = rq.CodebookState.create(jnp.asarray(rng.normal(size=(k, n_z)).astype(np.float32)), cluster_size=0.0)
  key = jax.random.key(3)
  codes, partial, new = rq.rq_quantize_updating(z, state, 1, decay, eps, key)
  want_codes, want_partial = rq.rq_quantize(z, state.codebook, 1)
  flat = z.reshape(-1, n_z)
  want = rq.restart_dead_codes(rq.ema_update(state, flat, want_codes.reshape(-1), decay, eps), flat,
                               jax.random.fold_in(key, 0), eps)
  np.testing.assert_array_equal(np.asarray(codes), np.asarray(want_codes))
  np.testing.assert_array_equal(np.asarray(partial), np.asarray(want_partial))
  for got, expected in zip(jax.tree.leaves(new), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-6, atol=1e-7)
  assert float(jnp.min(new.cluster_size_ema)) >= 1.0  # every zero count restarted
