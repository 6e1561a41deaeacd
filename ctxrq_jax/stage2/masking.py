"""Training masks and the masked code-stack objective of Contextual RQ-Transformer (§3.2.3, eq. 10-11).

A mask m ~ q(m) draws r ~ U[0, 1), sets |m| = ceil(gamma(r) * N) (clipped to [1, N]) and chooses which positions
uniformly among all masks with that count (eq. 10). Positions are chosen as the |m| smallest of N i.i.d. uniforms
(ranks from an argsort), which makes the count exact: no thresholding, so ties cannot add or drop a position.

Mask groups (`group` G > 1, training only). The loss reads only the masked positions, so the depth transformer, the
output head and the softmax need not see the others; but their number varies per example, and a compiled step
needs a static shape. Within each group of G consecutive examples the r's are drawn stratified: r_j = (pi_j + u_j) /
G with pi a uniformly random permutation of 0..G-1 and u_j ~ U[0, 1), so each example's r, and so its mask, is still
distributed exactly as eq. 10, while the group's total count is bounded: stratum i masks at most
ceil(gamma(i / G) N) positions (gamma decreases), `group_capacity` in all (70% of G * N for G = 8 and the cosine at
N = 64, 66% for G = 32, against 64% masked on average). `masked_first` lists each group's masked positions in that
many slots and `gather_groups` gathers them. The batch's total count then hardly varies, which also makes eq. 11's
per-batch normalisation (the masked-code count) nearly constant.
"""

from __future__ import annotations

from typing import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Schedule = Callable[[Array], Array]


def cosine_schedule(r: Array) -> Array:
  """gamma(r) = cos(pi r / 2): decreasing, gamma(0) = 1, gamma(1) = 0 (the paper's quarter-period cosine)."""
  return jnp.cos(0.5 * jnp.pi * r)


def sample_mask_counts(rng: Array, batch: int, num_positions: int,
                       schedule: Schedule = cosine_schedule) -> Array:
  """Number of masked positions per example: ceil(gamma(r) N), r ~ U[0, 1), clipped to [1, N] -> int32 [B]."""
  if batch < 1 or num_positions < 1:
    raise ValueError(f"batch and num_positions must be positive, got {batch} and {num_positions}")
  r = jax.random.uniform(rng, (batch,), jnp.float32)
  k = jnp.ceil(schedule(r) * num_positions).astype(jnp.int32)
  # gamma(r) * N can round to 0 near r = 1 (cos(pi/2) is -4e-8 in float32); the paper's portion lies in (0, 1].
  return jnp.clip(k, 1, num_positions)


def group_bounds(group: int, num_positions: int, schedule: Schedule = cosine_schedule) -> np.ndarray:
  """The most positions an example of stratum i = 0..G-1 can mask, clip(ceil(gamma(i / G) N), 1, N) -> int32 [G]
  (computed at trace time: a constant of the compiled step)."""
  if group < 1 or num_positions < 1:
    raise ValueError(f"group and num_positions must be positive, got {group} and {num_positions}")
  with jax.ensure_compile_time_eval():
    r = jnp.arange(group, dtype=jnp.float32) / group
    return np.asarray(jnp.clip(jnp.ceil(schedule(r) * num_positions), 1, num_positions), np.int32)


def group_capacity(group: int, num_positions: int, schedule: Schedule = cosine_schedule) -> int:
  """The most masked positions a group of `group` examples can hold under `sample_mask(..., group=group)`."""
  return int(group_bounds(group, num_positions, schedule).sum())


def sample_stratified_counts(rng: Array, batch: int, num_positions: int, group: int,
                             schedule: Schedule = cosine_schedule) -> Array:
  """Masked positions per example with the r's of each group of `group` consecutive examples stratified (see the
  module doc): each count is distributed as in `sample_mask_counts`, a group's sum is at most
  `group_capacity(group, num_positions)` -> int32 [B]."""
  if batch < 1 or num_positions < 1 or group < 1 or batch % group:
    raise ValueError(f"batch {batch} must be a positive multiple of the mask group {group}, and num_positions "
                     f"positive (got {num_positions})")
  rng_u, rng_perm = jax.random.split(rng)
  u = jax.random.uniform(rng_u, (batch // group, group), jnp.float32)
  stratum = jnp.argsort(jax.random.uniform(rng_perm, (batch // group, group)), axis=-1)  # a permutation per group
  r = (stratum + u) / group
  k = jnp.clip(jnp.ceil(schedule(r) * num_positions).astype(jnp.int32), 1, num_positions)
  # r >= stratum / G exactly; the bound also holds for a float round-off of (stratum + u) / G below it.
  k = jnp.minimum(k, jnp.asarray(group_bounds(group, num_positions, schedule))[stratum])
  return k.reshape(batch)


def mask_with_counts(rng: Array, counts: Array, num_positions: int) -> Array:
  """Uniformly random masks with exactly counts[b] True entries: int [B] -> bool [B, N]."""
  chex.assert_rank(counts, 1)
  noise = jax.random.uniform(rng, (counts.shape[0], num_positions))
  ranks = jnp.argsort(jnp.argsort(noise, axis=-1), axis=-1)  # a permutation of 0..N-1 per row
  return ranks < counts[:, None]


def sample_mask(rng: Array, batch: int, num_positions: int, schedule: Schedule = cosine_schedule,
                group: int = 1) -> Array:
  """Draws m ~ q(m) of eq. 10 for every example -> bool [B, N] (True = masked).

  The key is split into (counts, positions) keys, in that order; `sample_mask_counts` (or, with `group` > 1,
  `sample_stratified_counts` over groups of `group` consecutive rows) and `mask_with_counts` expose the two halves.
  """
  rng_count, rng_pos = jax.random.split(rng)
  if group == 1:
    counts = sample_mask_counts(rng_count, batch, num_positions, schedule)
  else:
    counts = sample_stratified_counts(rng_count, batch, num_positions, group, schedule)
  return mask_with_counts(rng_pos, counts, num_positions)


def masked_first(mask: Array, group: int, capacity: int) -> tuple[Array, Array]:
  """Each group's masked positions first, in `capacity` slots.

  Args:
    mask: bool [B, N], B a multiple of `group`.
    group: examples per group G.
    capacity: slots per group C (<= G * N); every group must have at most C masked positions (`group_capacity` for
      masks of `sample_mask(..., group=G)`), otherwise the extra ones are silently left out.

  Returns:
    (index int32 [B / G, C] into the group's flattened positions [G * N], masked ones first in order, then unmasked
     ones filling the remaining slots; valid bool [B / G, C], True at the masked ones).
  """
  b, n = mask.shape
  if b % group or not 1 <= capacity <= group * n:
    raise ValueError(f"mask batch {b} must be a multiple of the group {group}, and the capacity {capacity} in "
                     f"[1, {group * n}]")
  flat = mask.reshape(b // group, group * n)
  index = jnp.argsort(jnp.logical_not(flat), axis=-1, stable=True)[:, :capacity].astype(jnp.int32)
  return index, jnp.take_along_axis(flat, index, axis=1)


def gather_groups(x: Array, index: Array, group: int) -> Array:
  """Rows of x [B, N, ...] at `masked_first`'s index [B / G, C] of each group -> [B / G, C, ...]."""
  b, n = x.shape[:2]
  flat = x.reshape(b // group, group * n, *x.shape[2:])
  return jnp.take_along_axis(flat, index.reshape(*index.shape, *([1] * (x.ndim - 2))), axis=1)


def masked_nll(logits: Array, codes: Array, mask: Array,
               label_smoothing: float = 0.0) -> tuple[Array, dict[str, Array]]:
  """Eq. 11: negative log-likelihood of all D codes at the masked positions only.

  Normalisation: the loss is the mean per masked code over the whole batch,
    loss = sum_{b, n: m_bn = 1} sum_d CE(b, n, d) / (sum_{b, n} m_bn * D),
  i.e. eq. 11's sum divided by the number of masked codes, so examples with many masked positions weigh more, as
  they do in eq. 11's expectation. Unmasked targets and logits are never read (selected away, not multiplied by
  zero). With label_smoothing > 0 the target is (1 - eps) one-hot + eps / K uniform; the metrics are always the plain
  NLL. For gradient accumulation, weight each micro-batch's loss by its 'num_masked_codes'.

  Args:
    logits: float [B, N, D, K].
    codes: int [B, N, D] targets.
    mask: bool [B, N].
    label_smoothing: eps in [0, 1).

  Returns:
    (loss, metrics): float32 scalar loss and float32 scalars 'loss', 'nll', 'accuracy', 'mask_fraction',
    'num_masked_codes' (the denominator, for weighting across micro-batches), and per depth d = 1..D
    'nll_depth{d}' and 'accuracy_depth{d}'.
  """
  b, n, d, k = logits.shape
  chex.assert_shape(codes, (b, n, d))
  chex.assert_shape(mask, (b, n))
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
  logits = logits.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  # Unmasked targets are replaced before the gather so they cannot matter even through NaN * 0.
  targets = jnp.where(mask[..., None], codes, 0)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, N, D]
  if label_smoothing > 0.0:
    ce = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(axis=-1)
  else:
    ce = nll
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)

  m = mask[..., None]  # [B, N, 1]
  num_pos = jnp.sum(mask.astype(jnp.float32))
  denom_depth = jnp.maximum(num_pos, 1.0)  # a batch always has >= 1 masked position from sample_mask
  per_depth = lambda x: jnp.sum(jnp.where(m, x, 0.0), axis=(0, 1)) / denom_depth  # noqa: E731  [D]
  loss = jnp.sum(jnp.where(m, ce, 0.0)) / (denom_depth * d)
  nll_d, acc_d = per_depth(nll), per_depth(correct)
  metrics = {
      "loss": loss,
      "nll": nll_d.mean(),
      "accuracy": acc_d.mean(),
      "mask_fraction": num_pos / (b * n),
      "num_masked_codes": num_pos * d,
  }
  for i in range(d):
    metrics[f"nll_depth{i + 1}"] = nll_d[i]
    metrics[f"accuracy_depth{i + 1}"] = acc_d[i]
  return loss, metrics


def drop_condition(rng: Array, cond: Array, rate: float, null_id: int) -> Array:
  """Replaces the whole condition of each example by `null_id` with probability `rate` (classifier-free guidance).

  Args:
    rng: PRNG key.
    cond: int [B, L] condition tokens.
    rate: drop probability in [0, 1].
    null_id: the "no condition" id (num_classes for class conditioning; [PAD] = 0, the empty caption, for text).

  Returns:
    int [B, L], rows either unchanged or all `null_id`.
  """
  chex.assert_rank(cond, 2)
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"condition drop rate must be in [0, 1], got {rate}")
  drop = jax.random.bernoulli(rng, rate, (cond.shape[0], 1))
  return jnp.where(drop, jnp.asarray(null_id, cond.dtype), cond)


__all__ = ["cosine_schedule", "drop_condition", "gather_groups", "group_bounds", "group_capacity", "mask_with_counts",
           "masked_first", "masked_nll", "sample_mask", "sample_mask_counts", "sample_stratified_counts"]
