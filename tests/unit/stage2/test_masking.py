"""The training mask distribution q(m) (eq. 10), the masked NLL (eq. 11) and condition dropout
(ctxrq_jax/stage2/masking.py)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxrq_jax.stage2 import masking


def test_cosine_schedule_endpoints_and_monotone():
  r = jnp.linspace(0.0, 1.0, 101)
  g = masking.cosine_schedule(r)
  assert float(g[0]) == 1.0 and abs(float(g[-1])) < 1e-6
  assert np.all(np.diff(np.asarray(g)) < 0)


def test_mask_counts_are_exact_for_every_n():
  @functools.partial(jax.jit, static_argnums=(1, 2))
  def draw(rng, batch, n):
    return masking.sample_mask(rng, batch, n), masking.sample_mask_counts(jax.random.split(rng)[0], batch, n)

  for n in [1, 2, 3, 5, 8, 64, 65, 256]:
    for seed in range(3):
      mask, counts = (np.asarray(x) for x in draw(jax.random.key(seed), 300, n))
      assert mask.shape == (300, n) and mask.dtype == np.bool_
      np.testing.assert_array_equal(mask.sum(-1), counts)
      assert counts.min() >= 1 and counts.max() <= n


def test_mask_with_counts_exact_including_ties():
  counts = jnp.arange(0, 9)
  mask = masking.mask_with_counts(jax.random.key(0), counts, 8)
  np.testing.assert_array_equal(np.asarray(mask).sum(-1), np.arange(0, 9))


def _exact_count_cdf(n: int) -> np.ndarray:
  """P(|m| <= j) for j = 0..N under r ~ U[0,1), |m| = ceil(cos(pi r / 2) N) clipped to [1, N]."""
  j = np.arange(n + 1)
  cdf = 1.0 - (2.0 / np.pi) * np.arccos(np.clip(j / n, 0.0, 1.0))  # P(cos(pi r/2) <= j/N)
  cdf[0] = 0.0  # count 0 is clipped up to 1 (a measure-zero event anyway)
  return cdf


def test_mask_fraction_follows_the_cosine_schedule():
  n, draws = 64, 4000
  counts = np.asarray(masking.sample_mask(jax.random.key(42), draws, n).sum(-1))
  cdf = _exact_count_cdf(n)
  expected_mean = float(np.sum(np.arange(1, n + 1) * np.diff(cdf))) / n  # E[ceil(cos(pi r/2) N) / N]
  # Continuous limit: E[cos(pi r / 2)] = 2 / pi, plus < 1/N from the ceiling.
  assert 2 / np.pi < expected_mean < 2 / np.pi + 1 / n
  se = np.std(counts / n) / math.sqrt(draws)
  assert abs(np.mean(counts / n) - expected_mean) < 4 * se
  # Kolmogorov-Smirnov distance of the count distribution (critical value at alpha = 0.001 is 1.95 / sqrt(n)).
  empirical = np.searchsorted(np.sort(counts), np.arange(n + 1), side="right") / draws
  assert np.max(np.abs(empirical - cdf)) < 1.95 / math.sqrt(draws)
  # Quartiles: the mask ratio's quantile q is cos(pi (1 - q) / 2).
  for q in (0.25, 0.5, 0.75):
    assert abs(np.quantile(counts / n, q) - math.cos(math.pi * (1 - q) / 2)) < 0.04
  # A fully masked map (the draft phase's start) is part of the training distribution.
  assert np.any(counts == n)


def test_group_capacity_known_values():
  # clip(ceil(cos(pi i / (2 G)) N), 1, N) summed over the G strata.
  assert [masking.group_capacity(g, 64) for g in (1, 2, 4, 8, 32)] == [64, 110, 195, 361, 1352]
  np.testing.assert_array_equal(masking.group_bounds(4, 64), [64, 60, 46, 25])
  assert masking.group_capacity(3, 1) == 3  # every example masks its one position


def test_stratified_counts_keep_eq10_per_example_and_bound_each_group():
  n, group, groups = 64, 8, 1000
  counts = np.asarray(masking.sample_mask(jax.random.key(5), group * groups, n, group=group).sum(-1))
  per_group = counts.reshape(groups, group)
  assert per_group.sum(-1).max() <= masking.group_capacity(group, n)
  # Each example's count, wherever it sits in its group, is distributed as under eq. 10 (KS at alpha = 0.001).
  cdf = _exact_count_cdf(n)
  for slot in (0, 5):
    x = per_group[:, slot]
    empirical = np.searchsorted(np.sort(x), np.arange(n + 1), side="right") / groups
    assert np.max(np.abs(empirical - cdf)) < 1.95 / math.sqrt(groups)
  # One example per stratum: sorted within a group, the i-th largest count lies in stratum i's range.
  ranked = -np.sort(-per_group, axis=-1)
  r = np.arange(group + 1) / group
  hi = np.clip(np.ceil(np.cos(np.pi * r[:-1] / 2) * n), 1, n)
  lo = np.clip(np.ceil(np.cos(np.pi * r[1:] / 2) * n), 1, n)
  assert np.all((ranked <= hi) & (ranked >= lo))
  # The group total varies far less than a sum of 8 independent counts would (its sd is ~8x smaller).
  independent = np.asarray(masking.sample_mask(jax.random.key(6), group * groups, n).sum(-1)).reshape(groups, group)
  assert per_group.sum(-1).std() * 4 < independent.sum(-1).std()
  with pytest.raises(ValueError, match="multiple of the mask group 8"):
    masking.sample_stratified_counts(jax.random.key(0), 12, n, 8)


def test_masked_first_and_gather_groups():
  mask = jnp.array([[0, 1, 0], [1, 0, 1], [0, 0, 0], [1, 1, 0]], bool)  # groups of 2: 3 and 2 masked
  index, valid = masking.masked_first(mask, 2, 4)
  np.testing.assert_array_equal(index, [[1, 3, 5, 0], [3, 4, 0, 1]])
  np.testing.assert_array_equal(valid, [[1, 1, 1, 0], [1, 1, 0, 0]])
  x = jnp.arange(4 * 3 * 2).reshape(4, 3, 2)
  np.testing.assert_array_equal(masking.gather_groups(x, index, 2), np.asarray(x).reshape(2, 6, 2)[[[0], [1]], index])
  with pytest.raises(ValueError, match="capacity 7"):
    masking.masked_first(mask, 2, 7)


def test_mask_positions_are_uniform():
  n, k, draws = 8, 3, 8000
  mask = np.asarray(masking.mask_with_counts(jax.random.key(7), jnp.full((draws,), k), n))
  freq = mask.mean(0)
  se = math.sqrt(k / n * (1 - k / n) / draws)
  assert np.all(np.abs(freq - k / n) < 5 * se)


def _random_batch(b=3, n=5, d=2, k=7, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  logits = jax.random.normal(k1, (b, n, d, k)) * 2.0
  codes = jax.random.randint(k2, (b, n, d), 0, k)
  mask = jnp.array([[1, 0, 0, 1, 0], [0, 0, 0, 0, 1], [1, 1, 1, 1, 1]], bool)[:b]
  return logits, codes, mask


def test_masked_nll_matches_eq11_normalised_per_masked_code():
  logits, codes, mask = _random_batch()
  loss, metrics = masking.masked_nll(logits, codes, mask)
  logp = np.asarray(jax.nn.log_softmax(logits, -1))
  b, n, d, _ = logits.shape
  terms = [-logp[i, j, t, int(codes[i, j, t])] for i in range(b) for j in range(n) for t in range(d) if mask[i, j]]
  np.testing.assert_allclose(loss, np.sum(terms) / (int(mask.sum()) * d), rtol=1e-5)
  np.testing.assert_allclose(metrics["nll"], loss, rtol=1e-6)
  assert float(metrics["num_masked_codes"]) == int(mask.sum()) * d
  np.testing.assert_allclose(metrics["mask_fraction"], mask.mean())
  for t in range(d):
    depth_terms = [-logp[i, j, t, int(codes[i, j, t])] for i in range(b) for j in range(n) if mask[i, j]]
    np.testing.assert_allclose(metrics[f"nll_depth{t + 1}"], np.mean(depth_terms), rtol=1e-5)
    hits = [np.argmax(logp[i, j, t]) == int(codes[i, j, t]) for i in range(b) for j in range(n) if mask[i, j]]
    np.testing.assert_allclose(metrics[f"accuracy_depth{t + 1}"], np.mean(hits), rtol=1e-6)


def test_masked_nll_ignores_unmasked_targets_and_logits():
  logits, codes, mask = _random_batch()
  loss, _ = masking.masked_nll(logits, codes, mask)
  other_codes = jnp.where(mask[..., None], codes, (codes + 3) % 7)
  other_logits = jnp.where(mask[..., None, None], logits, -logits + 1.0)
  np.testing.assert_array_equal(loss, masking.masked_nll(logits, other_codes, mask)[0])
  np.testing.assert_array_equal(loss, masking.masked_nll(other_logits, codes, mask)[0])
  grads = jax.grad(lambda x: masking.masked_nll(x, codes, mask)[0])(logits)
  assert np.all(np.asarray(grads)[~np.asarray(mask)] == 0)
  # Changing a masked target does change the loss.
  assert masking.masked_nll(logits, codes.at[0, 0, 0].add(1) % 7, mask)[0] != loss


def test_masked_nll_of_uniform_logits_is_log_k():
  # Uniform logits give every code probability 1/K: the NLL of each masked code is log K exactly, whatever the
  # targets and the mask, and the accuracy is that of argmax over ties (code 0).
  b, n, d, k = 3, 5, 2, 7
  _, codes, mask = _random_batch(b, n, d, k)
  loss, metrics = masking.masked_nll(jnp.zeros((b, n, d, k)), codes, mask)
  np.testing.assert_allclose(float(loss), math.log(k), rtol=1e-6)
  for t in range(d):
    np.testing.assert_allclose(float(metrics[f"nll_depth{t + 1}"]), math.log(k), rtol=1e-6)
    hits = np.asarray(codes)[..., t][np.asarray(mask)] == 0
    np.testing.assert_allclose(float(metrics[f"accuracy_depth{t + 1}"]), hits.mean(), rtol=1e-6)
  assert float(metrics["num_masked_codes"]) == int(mask.sum()) * d
  # Any constant shift of the logits is still uniform.
  np.testing.assert_allclose(float(masking.masked_nll(jnp.full((b, n, d, k), 3.5), codes, mask)[0]), math.log(k),
                             rtol=1e-6)


def test_label_smoothing():
  logits, codes, mask = _random_batch()
  eps = 0.1
  loss, metrics = masking.masked_nll(logits, codes, mask, label_smoothing=eps)
  logp = jax.nn.log_softmax(logits, -1)
  target = (1 - eps) * jax.nn.one_hot(codes, 7) + eps / 7
  ce = -(target * logp).sum(-1)
  np.testing.assert_allclose(loss, (ce * mask[..., None]).sum() / (mask.sum() * 2), rtol=1e-5)
  np.testing.assert_allclose(metrics["nll"], masking.masked_nll(logits, codes, mask)[0], rtol=1e-6)
  with pytest.raises(ValueError, match="label_smoothing"):
    masking.masked_nll(logits, codes, mask, label_smoothing=1.0)


def test_drop_condition():
  cond = jnp.tile(jnp.arange(4, dtype=jnp.int32)[None], (1000, 1))  # [B, L = 4]
  np.testing.assert_array_equal(masking.drop_condition(jax.random.key(0), cond, 0.0, 10), cond)
  assert np.all(np.asarray(masking.drop_condition(jax.random.key(0), cond, 1.0, 10)) == 10)
  out = np.asarray(masking.drop_condition(jax.random.key(1), cond, 0.1, 10))
  dropped = np.all(out == 10, axis=1)
  kept = np.all(out == np.arange(4), axis=1)
  assert np.all(dropped | kept)  # whole condition rows, never single tokens
  assert abs(dropped.mean() - 0.1) < 0.04
  assert out.dtype == np.int32
  with pytest.raises(ValueError, match="drop rate"):
    masking.drop_condition(jax.random.key(0), cond, 1.5, 10)
