"""Random balanced partitions of the positions into update steps (eq. 12).

A partition is stored as one int32 per position: the step at which it is updated (-1: never, e.g. outside an
inpainting region). Every partition of a decode is drawn up front.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def region_partitions(rng: Array, region: Array, num_steps: int) -> Array:
  """Uniformly random balanced partitions of each sample's region into `num_steps` update steps.

  Region positions are put in a uniformly random order (a random permutation, then a stable sort that brings region
  positions first); the position of rank r among the R_b region positions of sample b goes to set floor(r * T / R_b),
  so set sizes differ by at most one and every set is non-empty when T <= R_b. When T does not divide R_b the sets
  are then given to the steps in a uniformly random order, so which steps update one position more is random too
  (uniform over all ordered balanced partitions); when it does, that relabelling would change nothing in
  distribution and is not applied (the same partitions as without it).

  Args:
    rng: PRNG key; sample b uses the b-th key of `jax.random.split(rng, B)`.
    region: bool [B, N], the positions to partition.
    num_steps: T >= 1.

  Returns:
    int32 [B, N]: the step in [0, T) at which each region position is updated, -1 outside the region.
  """
  chex.assert_rank(region, 2)
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f'number of update steps T must be a positive integer, got {num_steps!r}')
  region = jnp.asarray(region, jnp.bool_)
  if not isinstance(region, jax.core.Tracer):
    smallest = int(np.asarray(region).sum(axis=1).min()) if region.shape[0] else num_steps
    if num_steps > smallest:
      raise ValueError(f'number of update steps T={num_steps} exceeds the smallest region ({smallest} positions); '
                       'a partition into T non-empty sets needs T <= region size')
  batch, n = region.shape
  perm = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(rng, batch))  # [B, N]
  in_region = jnp.take_along_axis(region, perm, axis=1)
  order = jnp.take_along_axis(perm, jnp.argsort(~in_region, axis=1, stable=True), axis=1)  # region first
  rows = jnp.arange(batch)[:, None]
  rank = jnp.zeros((batch, n), jnp.int32).at[rows, order].set(jnp.arange(n, dtype=jnp.int32)[None])
  size = jnp.maximum(region.sum(axis=1, keepdims=True, dtype=jnp.int32), 1)
  step = jnp.minimum(rank * num_steps // size, num_steps - 1)  # (outside the region: clipped, replaced below)
  relabel = jax.vmap(lambda k: jax.random.permutation(k, num_steps))(
      jax.random.split(jax.random.fold_in(rng, 1), batch))  # [B, T]
  step = jnp.where(size % num_steps != 0, jnp.take_along_axis(relabel, step, axis=1), step)
  return jnp.where(region, step, -1).astype(jnp.int32)


def random_partitions(rng: Array, batch: int, num_positions: int, num_steps: int) -> Array:
  """Uniformly random balanced partitions of all N positions (eq. 12) -> int32 [B, N] update step in [0, T)."""
  for name, value in (('batch', batch), ('num_positions', num_positions), ('num_steps', num_steps)):
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f'{name} must be a positive integer, got {value!r}')
  if num_steps > num_positions:
    raise ValueError(f'number of update steps T={num_steps} exceeds the number of positions N={num_positions}')
  return region_partitions(rng, jnp.ones((batch, num_positions), jnp.bool_), num_steps)
