"""The sampler's output distribution against the exact one that Algorithms 1-2 define, on a map small enough to
enumerate (N = 2 positions, D = 2 codes per stack, K = 3: 81 joint outcomes).

The exact probabilities come from the model's plain teacher-forced forward pass (`model.apply`: every depth's
logits given the true codes below it), guided and tempered by hand, and summed over both orders of the random
partition. Nothing of the sampler is reused (not its partitions, its key/value cache, its guidance on depth
features or its inverse-CDF draws), so this is an oracle independent of `sampling/reference.py`.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxrq_jax.sampling import decoder as decode
from ctxrq_jax.sampling.logits import PhaseSettings
from tests import helpers

N, D, K, LABEL, SAMPLES = 2, 2, 3, 1, 20_000
DRAFT = PhaseSettings(temperature=1.0)
REVISE = PhaseSettings(temperature=0.7, guidance_scale=1.2)
STACKS = list(itertools.product(range(K), repeat=D))  # the K^D values of one stack


@pytest.fixture(scope='module')
def model_and_params():
  model, params, codebook = helpers.tiny_sampling_model(code_depth=D, num_positions=N, vocab_size=K)
  # The helper's 8x-scaled parameters make some stacks almost certain; 4x keeps every outcome's probability in view.
  return model, jax.tree.map(lambda x: 0.5 * x, params), codebook


def teacher_forced_logits(model, params, codebook):
  """{context: (cond, uncond) float64 [N * K^D, N, D, K]}: the plain forward pass's logits (eq. 8, every depth given
  the true codes below it) with row a * K^D + s holding stack s at position a, [MASK]ed, and the other position
  holding stack `context` (None: [MASK]); every context in one batched call per condition."""
  contexts = [None, *range(len(STACKS))]
  codes = np.zeros((len(contexts), N, len(STACKS), N, D), np.int32)
  mask = np.ones((len(contexts), N, len(STACKS), N), bool)
  for (c, context), a, s in itertools.product(enumerate(contexts), range(N), range(len(STACKS))):
    codes[c, a, s, a] = STACKS[s]
    if context is not None:
      codes[c, a, s, 1 - a] = STACKS[context]
      mask[c, a, s, 1 - a] = False
  codes, mask = jnp.asarray(codes.reshape(-1, N, D)), jnp.asarray(mask.reshape(-1, N))
  apply = jax.jit(lambda label: model.apply({'params': params}, codes, mask, jnp.full((len(codes), 1), label),
                                            codebook))
  both = [np.asarray(apply(label), np.float64).reshape(len(contexts), N * len(STACKS), N, D, K)
          for label in (LABEL, model.null_cond_id)]
  return {context: (both[0][c], both[1][c]) for c, context in enumerate(contexts)}


def stack_probabilities(logits, settings: PhaseSettings):
  """p[a, s]: the probability that UPDATE draws stack s (an index into STACKS) at position a, guided and tempered
  as the paper's sampler defines it, from one context's teacher-forced (cond, uncond) logits."""
  cond_l, uncond_l = logits
  guided = (cond_l + settings.guidance_scale * (cond_l - uncond_l)) / settings.temperature
  logp = guided - np.log(np.sum(np.exp(guided), axis=-1, keepdims=True))
  out = np.zeros((N, len(STACKS)))
  for r, (a, s) in enumerate(itertools.product(range(N), range(len(STACKS)))):
    out[a, s] = np.exp(sum(logp[r, a, d, STACKS[s][d]] for d in range(D)))
  return out


def joint_after_update(logits, settings, start, stale=False):
  """Exact joint law [S0, S1] after one UPDATE pass with T = N = 2 (each position once, in a uniformly random
  order) from the joint law `start` (None: the empty map). `stale` conditions the second position on the first
  position's value before the pass (a wrong reading of Algorithm 1, to show the test can tell)."""
  given = {c: stack_probabilities(l, settings) for c, l in logits.items()}
  out = np.zeros((len(STACKS),) * N)
  starts = [((None, None), 1.0)] if start is None else [((i, j), start[i, j]) for i in range(len(STACKS))
                                                        for j in range(len(STACKS)) if start[i, j] > 0]
  for (old, weight), a in itertools.product(starts, range(N)):
    b = 1 - a
    first = given[old[b]][a]  # position a given b's current stack (or [MASK])
    for x in range(len(STACKS)):
      second = given[old[a] if stale else x][b]
      for y in range(len(STACKS)):
        cell = [0, 0]
        cell[a], cell[b] = x, y
        out[tuple(cell)] += weight * 0.5 * first[x] * second[y]
  return out


def empirical(history_phase: np.ndarray) -> np.ndarray:
  index = history_phase @ (K ** np.arange(D - 1, -1, -1))  # [SAMPLES, N] stack indices
  counts = np.zeros((len(STACKS),) * N)
  np.add.at(counts, (index[:, 0], index[:, 1]), 1)
  return counts / len(history_phase)


def worst_z(observed: np.ndarray, expected: np.ndarray) -> float:
  """The largest |observed - expected| over cells in binomial standard errors (floor: one count in SAMPLES)."""
  se = np.sqrt(np.maximum(expected * (1 - expected), 1.0 / SAMPLES) / SAMPLES)
  return float(np.max(np.abs(observed - expected) / se))


def test_draft_and_revision_follow_the_exact_distribution(model_and_params):
  model, params, codebook = model_and_params
  logits = teacher_forced_logits(model, params, codebook)
  draft = joint_after_update(logits, DRAFT, None)
  revised = joint_after_update(logits, REVISE, draft)
  np.testing.assert_allclose([draft.sum(), revised.sum()], 1.0, atol=1e-9)
  assert np.sum(draft > 1e-3) >= 20 and np.sum(revised > 1e-3) >= 10  # the outcomes are spread, not one certain cell

  cond = jnp.full((SAMPLES, 1), LABEL, jnp.int32)
  _, history = decode.draft_and_revise(model, params, codebook, cond, jax.random.key(0), t_draft=2, t_revise=2,
                                       num_revisions=1, draft=DRAFT, revise=REVISE, return_history=True)
  history = np.asarray(history)
  # 81 cells per phase: within 5 standard errors each (a false alarm about once in 10^4 seeds; 2.9 and 3.1 here, the
  # misreadings below 19 to 1100).
  assert worst_z(empirical(history[0]), draft) < 5.0
  assert worst_z(empirical(history[1]), revised) < 5.0

  # The bound can fail: the same samples reject plausible misreadings of the algorithm.
  unguided = joint_after_update(logits, PhaseSettings(temperature=0.7), draft)
  redrafted = joint_after_update(logits, REVISE, None)  # a revision that ignores the draft
  stale = joint_after_update(logits, REVISE, draft, stale=True)
  untempered = joint_after_update(logits, PhaseSettings(guidance_scale=1.2), draft)
  for wrong in (unguided, redrafted, stale, untempered):
    assert worst_z(empirical(history[1]), wrong) > 8.0
  parallel = joint_after_update(logits, DRAFT, None, stale=True)  # a draft that samples both positions at once
  assert worst_z(empirical(history[0]), parallel) > 8.0
