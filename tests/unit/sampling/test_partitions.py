"""Random balanced partitions of the positions into update steps (eq. 12; ctxrq_jax/sampling/partitions.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxrq_jax.sampling import partitions

N = 16


@pytest.mark.parametrize('t', [1, 3, 5, 16])
def test_random_partitions_balanced(t):
  part = np.asarray(partitions.random_partitions(jax.random.key(3), 4, N, t))
  assert part.shape == (4, N) and part.dtype == np.int32
  for row in part:
    counts = np.bincount(row, minlength=t)
    assert len(counts) == t and counts.min() >= N // t and counts.max() <= -(-N // t)
  if t > 1:
    assert len({tuple(r) for r in part}) > 1  # per-sample partitions differ


def test_region_partitions_cover_region_only():
  region = np.zeros((2, N), bool)
  region[0, [1, 4, 5, 9, 15]] = True
  region[1, :11] = True
  part = np.asarray(partitions.region_partitions(jax.random.key(2), jnp.asarray(region), 3))
  assert (part[~region] == -1).all()
  for b in range(2):
    counts = np.bincount(part[b][region[b]], minlength=3)
    assert len(counts) == 3 and counts.max() - counts.min() <= 1 and counts.min() >= 1
  with pytest.raises(ValueError, match='smallest region'):
    partitions.region_partitions(jax.random.key(2), jnp.asarray(region), 6)


@pytest.mark.parametrize('t', [0, N + 1])
def test_random_partitions_bad_steps(t):
  with pytest.raises(ValueError, match='num_steps|T=17 exceeds'):
    partitions.random_partitions(jax.random.key(0), 2, N, t)


def test_partitions_are_uniform_over_ordered_balanced_partitions():
  # 10 positions in 3 steps: sizes (4, 3, 3) in some order. Uniform over ordered balanced partitions, each step is
  # the larger one a third of the time, and each position is in each step a third of the time (it was always the
  # first step, and positions' chances 4/10, 3/10, 3/10).
  b, n, t = 3000, 10, 3
  part = np.asarray(partitions.random_partitions(jax.random.key(5), b, n, t))
  counts = np.stack([np.bincount(row, minlength=t) for row in part])
  assert sorted(set(map(tuple, np.sort(counts, axis=1)))) == [(3, 3, 4)]
  larger = np.bincount(counts.argmax(axis=1), minlength=t) / b
  np.testing.assert_allclose(larger, 1 / 3, atol=0.04)  # 4.6 standard deviations
  per_position = np.stack([(part == s).mean(axis=0) for s in range(t)])  # [T, N]
  np.testing.assert_allclose(per_position, 1 / 3, atol=0.04)
  # T dividing N: no relabelling draw, the partitions of a given key are those of the plain construction.
  even = np.asarray(partitions.random_partitions(jax.random.key(5), 4, 12, 3))
  perm = np.asarray(jax.vmap(lambda k: jax.random.permutation(k, 12))(jax.random.split(jax.random.key(5), 4)))
  rank = np.argsort(perm, axis=1)  # position p's place in the random order
  np.testing.assert_array_equal(even, rank * 3 // 12)
