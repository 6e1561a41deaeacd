"""Known values of FID, Inception Score and precision/recall, and streaming statistics."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from ctxrq_jax.evaluation import frechet


def _random_spd(rng, d, scale=1.0):
  a = rng.normal(size=(d, d))
  return scale * (a @ a.T / d + 0.1 * np.eye(d))


# ------------------------------------------------------------------------------------------------ Fréchet distance


@pytest.mark.parametrize("method", ["svd", "sqrtm"])
def test_identical_sets_give_zero(method):
  x = np.random.default_rng(0).normal(size=(500, 32)) * 3 + 1
  s = frechet.FeatureStats.from_features(x)
  assert abs(frechet.frechet_distance(s.mu, s.sigma, s.mu, s.sigma, method=method)) < 1e-6
  assert abs(frechet.stats_distance(s, s, method=method)) < 1e-6


@pytest.mark.parametrize("method", ["svd", "sqrtm"])
def test_two_gaussians_closed_form(method):
  rng = np.random.default_rng(1)
  d = 24
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1 = _random_spd(rng, d)
  # S2 = c^2 S1: (S1 S2)^{1/2} = c S1, so FID = |dmu|^2 + (1 - c)^2 tr S1.
  c = 1.7
  want = np.sum((mu1 - mu2) ** 2) + (1 - c) ** 2 * np.trace(s1)
  assert frechet.frechet_distance(mu1, s1, mu2, c * c * s1, method=method) == pytest.approx(want, rel=1e-10)
  # Commuting (diagonal) covariances: FID = |dmu|^2 + sum (sd1 - sd2)^2.
  v1, v2 = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
  got = frechet.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2), method=method)
  assert got == pytest.approx(want, rel=1e-10)
  # One dimension: (m1 - m2)^2 + (s1 - s2)^2.
  assert frechet.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]], method=method) == pytest.approx(4.0 + 1.0)


def test_methods_agree_on_general_covariances():
  rng = np.random.default_rng(2)
  d = 40
  s1, s2 = _random_spd(rng, d), _random_spd(rng, d, 2.0)
  mu = rng.normal(size=d)
  a = frechet.frechet_distance(mu, s1, 0 * mu, s2, method="svd")
  b = frechet.frechet_distance(mu, s1, 0 * mu, s2, method="sqrtm")
  want = mu @ mu + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
  assert a == pytest.approx(want, rel=1e-9) and b == pytest.approx(want, rel=1e-9)


def test_singular_covariances_fewer_samples_than_dimensions():
  rng = np.random.default_rng(3)
  x, y = rng.normal(size=(20, 64)), rng.normal(size=(20, 64)) + 0.5
  sx, sy = frechet.FeatureStats.from_features(x), frechet.FeatureStats.from_features(y)
  a = frechet.stats_distance(sx, sy, method="svd")
  b = frechet.stats_distance(sx, sy, method="sqrtm")
  assert np.isfinite(a) and a == pytest.approx(b, rel=1e-6)
  assert abs(frechet.stats_distance(sx, sx)) < 1e-10 * np.trace(sx.sigma)
  # Distinct but rank-deficient: the singular-value route stays accurate where the eigenvalue one loses digits.
  y2 = np.concatenate([x[:10], rng.normal(size=(10, 64))])
  s2 = frechet.FeatureStats.from_features(y2)
  assert frechet.stats_distance(sx, s2) == pytest.approx(frechet.stats_distance(sx, s2, method="sqrtm"), rel=1e-6)


def test_frechet_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="means"):
    frechet.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match="covariances"):
    frechet.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))
  with pytest.raises(ValueError, match="method"):
    frechet.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3), method="eigenvalues")


# ------------------------------------------------------------------------------------------ streaming statistics


def test_streaming_statistics_equal_batch_statistics():
  rng = np.random.default_rng(4)
  # A large common offset: a naive sum-of-squares accumulator would lose the covariance to cancellation.
  x = (rng.normal(size=(1001, 16)) @ rng.normal(size=(16, 16)) + 1e4).astype(np.float32)
  stream = frechet.FeatureStats(16)
  for chunk in np.array_split(x, [1, 7, 300, 301, 1000]):
    stream.update(chunk)  # uneven batches, an empty one and single rows
  assert stream.count == 1001
  np.testing.assert_allclose(stream.mu, x.astype(np.float64).mean(0), rtol=1e-14)
  np.testing.assert_allclose(stream.sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-9)
  # Merging per-worker accumulators gives the same.
  a = frechet.FeatureStats.from_features(x[:400], batch_size=64)
  b = frechet.FeatureStats.from_features(x[400:], batch_size=1000)
  merged = a.merge(b)
  np.testing.assert_allclose(merged.sigma, stream.sigma, rtol=1e-9, atol=1e-9)
  np.testing.assert_allclose(merged.mu, stream.mu, rtol=1e-14)


def test_statistics_errors():
  s = frechet.FeatureStats(3)
  with pytest.raises(ValueError, match="no features"):
    _ = s.mu
  s.update(np.zeros((1, 3)))
  with pytest.raises(ValueError, match="at least 2"):
    _ = s.sigma
  with pytest.raises(ValueError, match=r"\[B, 3\]"):
    s.update(np.zeros((2, 4)))
  with pytest.raises(ValueError, match="NaN"):
    s.update(np.full((2, 3), np.nan))


# ------------------------------------------------------------------------------------------------ Inception Score


def test_inception_score_known_values():
  n, classes = 1000, 1008
  # Uniform predictions: p(y|x) = p(y), KL 0, score 1.
  assert frechet.inception_score(np.zeros((n, classes))) == pytest.approx(1.0, abs=1e-12)
  # Confident, distinct, balanced classes: KL = log K, score K (per split: each split holds all K classes).
  k = 10
  logits = np.full((n, classes), -50.0)
  logits[np.arange(n), np.arange(n) % k] = 50.0
  assert frechet.inception_score(logits) == pytest.approx(k, rel=1e-9)
  assert frechet.inception_score(logits, split_size=100) == pytest.approx(k, rel=1e-9)
  assert frechet.inception_score(logits, num_splits=10) == pytest.approx(k, rel=1e-9)
  # Splits that each see a single class score 1: the split size matters and is ADM's 5,000 by default.
  sorted_logits = logits[np.argsort(np.arange(n) % k, kind="stable")]
  scores = frechet.inception_score_splits(sorted_logits, split_size=100)
  np.testing.assert_allclose(scores, np.ones(10), atol=1e-9)
  assert len(frechet.inception_score_splits(np.zeros((50000, 4)))) == 10


def test_inception_score_of_class_sorted_samples_is_shuffled_before_splitting():
  # `sample` writes its npz sorted by class: consecutive splits of 100 would each see one of 10 classes and score 1
  # however good the samples; shuffled with a fixed seed first, as the evaluator does, every split sees all of them.
  n, classes, k = 1000, 1008, 10
  logits = np.full((n, classes), -50.0)
  logits[np.arange(n), np.arange(n) // (n // k)] = 50.0  # class-sorted: 100 of class 0, then 100 of class 1, ...
  assert frechet.inception_score(logits, split_size=100) == pytest.approx(1.0, abs=1e-9)
  shuffled = frechet.inception_score(logits, split_size=100, shuffle_seed=frechet.IS_SHUFFLE_SEED)
  assert 0.9 * k < shuffled < k  # a random split of 100 misses a little of the balance
  assert frechet.inception_score(logits[::-1], split_size=100, shuffle_seed=0) == pytest.approx(
      frechet.inception_score(logits, split_size=100, shuffle_seed=0), rel=0.02)  # the order no longer matters
  assert frechet.inception_score(logits, shuffle_seed=3) == pytest.approx(k, rel=1e-9)  # one split: no change


def test_inception_score_matches_the_direct_formula():
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(300, 20)) * 3
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  scores = []
  for part in np.split(p, 3):
    py = part.mean(0)
    scores.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(py)), axis=1))))
  assert frechet.inception_score(logits, split_size=100) == pytest.approx(np.mean(scores), rel=1e-12)


# ---------------------------------------------------------------------------------------- precision and recall


def _naive_precision_recall(ref, smp, k):
  def radii(x):
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    return np.sort(d, axis=1)[:, k]
  d = ((ref[:, None] - smp[None]) ** 2).sum(-1)
  return np.mean(np.any(d <= radii(ref)[:, None], axis=0)), np.mean(np.any(d <= radii(smp)[None], axis=1))


def test_precision_recall_identical_sets():
  x = np.random.default_rng(6).normal(size=(200, 8))
  assert frechet.precision_recall(x, x) == (1.0, 1.0)


def test_precision_recall_disjoint_far_clusters():
  rng = np.random.default_rng(7)
  a = rng.normal(size=(100, 8))
  b = rng.normal(size=(80, 8)) + 100.0
  assert frechet.precision_recall(a, b) == (0.0, 0.0)


def test_precision_recall_partial_overlap():
  """reference = A (30) + C (20), samples = A (the same 30 points) + B (10); A, B, C far apart.

  A sample in A lies on a reference point (distance 0 <= its radius); B is outside every reference ball (radii are
  within-cluster distances), so precision = 30 / 40. Likewise every reference in A lies on a sample and C is outside
  every sample ball, so recall = 30 / 50.
  """
  rng = np.random.default_rng(8)
  a = rng.normal(size=(30, 6))
  c = rng.normal(size=(20, 6)) + np.array([50.0, 0, 0, 0, 0, 0])
  b = rng.normal(size=(10, 6)) - np.array([50.0, 0, 0, 0, 0, 0])
  ref, smp = np.concatenate([a, c]), np.concatenate([a, b])
  pr = frechet.precision_recall(ref, smp, row_batch_size=7, col_batch_size=11)
  assert pr.precision == pytest.approx(0.75) and pr.recall == pytest.approx(0.6)


def test_precision_recall_on_a_line_with_known_radii():
  """References at 0, 1, ..., 99 on a line: with k = 3 an interior radius is 2 (neighbours at 1, 1, 2), an end
  point's 3 (1, 2, 3). Samples at 50.5, 51.5, ..., 149.5: those up to 101.5 (within 3 of 99) are inside, 52 of
  100. Samples are 1 apart too, so reference points from 50 on are inside a sample ball (50 is 0.5 from 50.5);
  the first sample, 50.5, has radius 3 and reaches down to 47.5, so references 48..99 are inside, 52 of 100."""
  ref = np.zeros((100, 4))
  ref[:, 0] = np.arange(100)
  smp = np.zeros((100, 4))
  smp[:, 0] = np.arange(100) + 50.5
  np.testing.assert_allclose(frechet.manifold_radii(ref)[[0, 1, 50, 98, 99]], [9, 4, 4, 4, 9])  # squared
  pr = frechet.precision_recall(ref, smp, row_batch_size=16, col_batch_size=33)
  assert pr == (0.52, 0.52)


@pytest.mark.parametrize("blocks", [(1, 1), (5, 3), (64, 7), (10000, 10000)])
def test_blocked_computation_equals_all_pairs(blocks):
  rng = np.random.default_rng(9)
  ref = rng.normal(size=(60, 5))
  smp = rng.normal(size=(45, 5)) * 1.3 + 0.4
  want = _naive_precision_recall(ref, smp, 3)
  got = frechet.precision_recall(ref, smp, row_batch_size=blocks[0], col_batch_size=blocks[1])
  assert got == pytest.approx(want)
  radii = frechet.manifold_radii(ref, row_batch_size=blocks[0], col_batch_size=blocks[1])
  d = ((ref[:, None] - ref[None]) ** 2).sum(-1)
  np.testing.assert_allclose(radii, np.sort(d, axis=1)[:, 3], rtol=1e-5)
  # Reusing the reference radii gives the same answer.
  assert frechet.precision_recall(ref, smp, reference_radii=radii) == pytest.approx(want)


def test_precision_recall_errors():
  with pytest.raises(ValueError, match="k must lie"):
    frechet.manifold_radii(np.zeros((3, 2)), k=3)
  with pytest.raises(ValueError, match="feature sizes"):
    frechet.precision_recall(np.zeros((5, 2)), np.zeros((5, 3)))


def test_equal_covariances_take_the_eigenvalue_path_with_the_svd_result():
  # trace sqrt(S S) for S == S is the sum of S's (clipped) eigenvalues; checked against sqrt_psd + SVD, rank-deficient.
  x = np.random.default_rng(0).normal(size=(20, 50))
  s = np.cov(x, rowvar=False)  # rank 19 of 50: round-off gives tiny negative eigenvalues
  a = frechet._sqrt_psd(s)
  want = float(np.sum(np.linalg.svd(a @ a, compute_uv=False)))
  assert frechet.trace_sqrt_product(s, s.copy()) == pytest.approx(want, rel=1e-9)
  assert frechet.trace_sqrt_product(s, s) == pytest.approx(want, rel=1e-9)
