"""The plain Draft-and-Revise: a test oracle and the benchmark's baseline, never the product's sampler.

A Python loop over UPDATE steps, each a full spatial pass and D depth steps over all N positions, then the chosen
positions are kept. It consumes exactly the random numbers of `decoder.draft_and_revise` / `decoder.inpaint` (random
draft mode), so the two return identical codes: the tests assert it.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

from ctxrq_jax.sampling import decoder
from ctxrq_jax.sampling.logits import PhaseSettings
from ctxrq_jax.sampling.logits import Sampler
from ctxrq_jax.sampling.partitions import region_partitions

Array = jax.Array
PyTree = Any


@functools.partial(jax.jit, static_argnames=('model',))
def _reference_step(model: Any, variables: PyTree, codebook: Array, codes: Array, known: Array, cond: Array,
                    chosen: Array, step_key: Array, sampler: Sampler) -> tuple[Array, Array]:
  """Spatial pass and D depth steps over ALL N positions, then keep the chosen ones.

  The depth steps are `decoder.sample_depths`, the fast sampler's own (key/value-cached depth transformer, guidance
  on the depth features): this oracle checks partitions, gathers, scatters and randomness, not the depth arithmetic,
  which the model's tests compare with the uncached `depth` pass.
  """
  batch, n, _ = codes.shape
  mask = chosen | ~known
  if sampler.guided:
    h = model.apply(variables, jnp.concatenate([codes, codes]), jnp.concatenate([mask, mask]),
                    jnp.concatenate([cond, decoder.null_cond(model, cond)]), codebook, method=model.spatial)
  else:
    h = model.apply(variables, codes, mask, cond, codebook, method=model.spatial)
  positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))
  stacks, _ = decoder.sample_depths(model, variables, codebook, h, positions, step_key, sampler)
  return jnp.where(chosen[..., None], stacks, codes), known | chosen


def reference_draft_and_revise(model: Any, params: PyTree, codebook: Array, cond: Array, rng: Array, *,
                               t_draft: int, t_revise: int, num_revisions: int, draft: PhaseSettings,
                               revise: PhaseSettings, codes: Optional[Array] = None, region: Optional[Array] = None,
                               return_history: bool = False) -> Array | tuple[Array, Array]:
  """Plain Draft-and-Revise: a Python loop over UPDATE steps, each a full spatial + depth pass over all N positions.

  Consumes the same random numbers as `draft_and_revise` / `inpaint` (random draft mode) and returns the same codes.
  With `codes` and `region` given it is the reference of `inpaint`.
  """
  codebook, cond, codes, region, draft_s, revise_s, plan = decoder.prepare(
      model, codebook, cond, codes, region, t_draft=t_draft, t_revise=t_revise, num_revisions=num_revisions,
      draft=draft, revise=revise, draft_mode='random', confidence_noise=0.0, return_history=return_history)
  variables = decoder.as_variables(params)
  k_part, k_samp, _ = decoder.split_rng(rng)
  state = decoder.init_state(codes, region)
  codes, known = state.codes, state.known
  history = []
  for phase in range(plan.num_revisions + 1):
    num_steps, sampler = (plan.t_draft, draft_s) if phase == 0 else (plan.t_revise, revise_s)
    partition = region_partitions(jax.random.fold_in(k_part, phase), region, num_steps)
    pass_key = jax.random.fold_in(k_samp, phase)
    for t in range(num_steps):
      codes, known = _reference_step(model, variables, codebook, codes, known, cond, partition == t,
                                     jax.random.fold_in(pass_key, t), sampler)
    history.append(codes)
  return (codes, jnp.stack(history)) if return_history else codes
