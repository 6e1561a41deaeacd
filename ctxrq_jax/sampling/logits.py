"""Per-phase sampling settings and what they do to logits: guidance, temperature, top-k, top-p, Gumbel-max.

Classifier-free guidance convention: logits = cond + s * (cond - uncond), so s = 0 is the conditional model alone and
s corresponds to w in Ho & Salimans (2021); in the other common convention, logits = uncond + lambda * (cond - uncond),
lambda = 1 + s. Sampling at each depth: guided logits -> temperature -> top-k -> top-p -> categorical sampling;
temperature 0 is greedy (argmax, no noise).

The samplers draw each code by inverse-CDF sampling from ONE uniform number per (sample, position, depth)
(`sample_categorical` with `sampling_uniforms`), not by Gumbel-max, which needs K noise numbers per code: with
K = 16384, generating that noise with threefry cost several times the output head's matmul on a CPU. The CDF is
accumulated in two levels (blocks of ~sqrt(K) codes, then within the chosen block), so float32 round-off in the
cumulative sums stays ~sqrt(K) ulp instead of K. `sample_logits` / `gumbel_noise` (Gumbel-max) remain as a
reference for tests.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class PhaseSettings:
  """Host-side sampling settings of one phase (draft or revise); validated on construction.

  Attributes:
    temperature: >= 0; 0 means greedy (argmax).
    top_k: keep the k largest logits; 0 disables (static: a new value recompiles).
    top_p: nucleus filtering in (0, 1]; 1 disables (turning it on/off recompiles, changing the value does not).
    guidance_scale: s in logits = cond + s (cond - uncond); 0 disables guidance and skips the uncond pass
      (turning it on/off recompiles, changing the value does not).
  """
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  guidance_scale: float = 0.0

  def __post_init__(self):
    if not (isinstance(self.temperature, (int, float, np.number)) and math.isfinite(self.temperature)
            and self.temperature >= 0):
      raise ValueError(f'temperature must be a finite number >= 0, got {self.temperature!r}')
    if not isinstance(self.top_k, (int, np.integer)) or isinstance(self.top_k, bool) or self.top_k < 0:
      raise ValueError(f'top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}')
    if not (isinstance(self.top_p, (int, float, np.number)) and 0.0 < self.top_p <= 1.0):
      raise ValueError(f'top_p must lie in (0, 1] (1 disables it), got {self.top_p!r}')
    if not (isinstance(self.guidance_scale, (int, float, np.number)) and math.isfinite(self.guidance_scale)):
      raise ValueError(f'guidance_scale must be a finite number, got {self.guidance_scale!r}')

  @classmethod
  def from_config(cls, phase_cfg: Any) -> 'PhaseSettings':
    """From a `config.sample.draft` / `.revise` section (temperature, guidance, top_k, top_p)."""
    return cls(temperature=float(phase_cfg['temperature']), top_k=int(phase_cfg['top_k']),
               top_p=float(phase_cfg['top_p']), guidance_scale=float(phase_cfg['guidance']))

  def sampler(self) -> 'Sampler':
    """The traced form used inside jitted code."""
    return Sampler(temperature=jnp.float32(self.temperature), top_p=jnp.float32(self.top_p),
                   guidance_scale=jnp.float32(self.guidance_scale), top_k=int(self.top_k),
                   guided=self.guidance_scale != 0, nucleus=self.top_p < 1.0)


@flax.struct.dataclass
class Sampler:
  """Traced sampling settings (float32 scalars) plus the static switches that shape the computation."""
  temperature: Array
  top_p: Array
  guidance_scale: Array
  top_k: int = flax.struct.field(pytree_node=False, default=0)
  guided: bool = flax.struct.field(pytree_node=False, default=False)
  nucleus: bool = flax.struct.field(pytree_node=False, default=False)


def guide_logits(cond_logits: Array, uncond_logits: Array, scale: Array) -> Array:
  """Classifier-free guidance: cond + scale * (cond - uncond); scale 0 is the conditional model alone."""
  return cond_logits + scale * (cond_logits - uncond_logits)


def filter_top_k(logits: Array, k: int) -> Array:
  """Sets all but the k largest logits along the last axis to -inf (ties at the k-th value are kept); k static."""
  k = min(int(k), logits.shape[-1])
  if k < 1:
    raise ValueError(f'top_k must be >= 1 here, got {k}')
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits < kth, -jnp.inf, logits)


def filter_top_p(logits: Array, p: Array) -> Array:
  """Nucleus filtering: keeps the smallest prefix of the sorted codes whose probability mass reaches p (>= 1 code)."""
  sorted_logits = -jnp.sort(-logits, axis=-1)  # descending
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep = jnp.maximum(jnp.sum(mass_before < p, axis=-1, keepdims=True), 1)
  cutoff = jnp.take_along_axis(sorted_logits, keep - 1, axis=-1)
  return jnp.where(logits < cutoff, -jnp.inf, logits)


def sample_logits(logits: Array, noise: Array, sampler: Sampler) -> tuple[Array, Array]:
  """Temperature, top-k, top-p, then Gumbel-max sampling (argmax when the temperature is 0).

  Args:
    logits: float [..., K] (already guided).
    noise: float [..., K] standard Gumbel noise.
    sampler: the phase's `Sampler`.

  Returns:
    (codes int32 [...], log-probability float32 [...] of each code under the filtered, tempered distribution).
  """
  chex.assert_equal_shape([logits, noise])
  greedy = sampler.temperature <= 0
  scaled = logits.astype(jnp.float32) / jnp.where(greedy, 1.0, sampler.temperature)
  if sampler.top_k:
    scaled = filter_top_k(scaled, sampler.top_k)
  if sampler.nucleus:
    scaled = filter_top_p(scaled, sampler.top_p)
  codes = jnp.argmax(jnp.where(greedy, scaled, scaled + noise), axis=-1).astype(jnp.int32)
  logprob = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), codes[..., None], axis=-1)[..., 0]
  return codes, logprob


def sample_categorical(logits: Array, uniforms: Array, sampler: Sampler) -> tuple[Array, Array]:
  """Temperature, top-k, top-p, then inverse-CDF sampling with one uniform per row (argmax at temperature 0).

  Code i is drawn with probability softmax(filtered, tempered logits)_i (up to float32 round-off of the cumulative
  sums); a code with probability 0 (filtered out) is never drawn. The CDF is taken over blocks of ceil(sqrt(K)) codes
  first, then within the chosen block.

  Args:
    logits: float [..., K] (already guided).
    uniforms: float32 [...] in (0, 1], one per row (`sampling_uniforms`).
    sampler: the phase's `Sampler`.

  Returns:
    (codes int32 [...], log-probability float32 [...] of each code under the filtered, tempered distribution).
  """
  chex.assert_equal_shape([logits[..., 0], uniforms])
  greedy = sampler.temperature <= 0
  scaled = logits.astype(jnp.float32) / jnp.where(greedy, 1.0, sampler.temperature)
  if sampler.top_k:
    scaled = filter_top_k(scaled, sampler.top_k)
  if sampler.nucleus:
    scaled = filter_top_p(scaled, sampler.top_p)
  k = scaled.shape[-1]
  top = jnp.max(scaled, axis=-1, keepdims=True)
  probs = jnp.exp(scaled - top)  # unnormalised (the largest is 1); filtered codes are 0
  size = math.isqrt(k - 1) + 1  # ceil(sqrt(K)) codes per block
  blocks = -(-k // size)
  padded = jnp.pad(probs, [(0, 0)] * (probs.ndim - 1) + [(0, blocks * size - k)])
  padded = padded.reshape(probs.shape[:-1] + (blocks, size))  # [..., nb, bs]
  block_cdf = jnp.cumsum(padded.sum(axis=-1), axis=-1)  # [..., nb]
  total = block_cdf[..., -1]
  target = uniforms.astype(jnp.float32) * total  # in (0, total]
  # The first block whose cumulative mass reaches the target; it has positive mass.
  block = jnp.minimum(jnp.sum(block_cdf < target[..., None], axis=-1), blocks - 1)
  before = jnp.where(block > 0, jnp.take_along_axis(block_cdf, jnp.maximum(block - 1, 0)[..., None], -1)[..., 0], 0.0)
  inner = jnp.take_along_axis(padded, block[..., None, None], axis=-2)[..., 0, :]  # [..., bs]
  inner_cdf = jnp.cumsum(inner, axis=-1)
  rest = jnp.minimum(target - before, inner_cdf[..., -1])  # > 0
  sampled = block * size + jnp.sum(inner_cdf < rest[..., None], axis=-1)
  codes = jnp.where(greedy, jnp.argmax(scaled, axis=-1), sampled).astype(jnp.int32)
  picked = jnp.take_along_axis(scaled, codes[..., None], axis=-1)[..., 0]
  logprob = picked - top[..., 0] - jnp.log(total)
  return codes, logprob


def sampling_uniforms(step_key: Array, positions: Array, depth: int) -> Array:
  """The uniform number of sample b, position positions[b, u], depth d: float32 [B, U] in (0, 1].

  Keyed by (step_key, b, position, depth), never by the slot u, so a sampler that gathers a subset of positions and
  one that samples all N positions draw identical numbers (for the threefry keys the samplers derive).
  """
  chex.assert_rank(positions, 2)

  def one(sample_key: Array, position: Array) -> Array:
    key = jax.random.fold_in(jax.random.fold_in(sample_key, position), depth)
    return 1.0 - jax.random.uniform(key, (), jnp.float32)  # [0, 1) -> (0, 1]

  sample_keys = jax.vmap(lambda b: jax.random.fold_in(step_key, b))(jnp.arange(positions.shape[0]))
  return jax.vmap(jax.vmap(one, in_axes=(None, 0)))(sample_keys, positions)


def gumbel_noise(step_key: Array, positions: Array, depth: int, num_codes: int) -> Array:
  """Gumbel noise of sample b, position positions[b, u], depth d: float32 [B, U, K].

  The noise depends only on (step_key, b, position, depth), never on the slot u, so for a threefry `step_key` (the
  samplers derive one) a sampler that gathers a subset of positions and one that samples all N positions draw
  identical numbers.
  """
  chex.assert_rank(positions, 2)

  def one(sample_key: Array, position: Array) -> Array:
    key = jax.random.fold_in(jax.random.fold_in(sample_key, position), depth)
    return jax.random.gumbel(key, (num_codes,), jnp.float32)

  sample_keys = jax.vmap(lambda b: jax.random.fold_in(step_key, b))(jnp.arange(positions.shape[0]))
  return jax.vmap(jax.vmap(one, in_axes=(None, 0)))(sample_keys, positions)
