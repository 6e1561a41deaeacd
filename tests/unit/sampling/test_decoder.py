"""Draft-and-Revise decoding (ctxrq_jax/sampling/decoder.py) on a tiny Contextual RQ-Transformer (N=16, D=3, K=8,
width 32, two depth layers: the `tiny_sampler` fixture of conftest.py). tests/unit/sampling/test_decoder_cache.py
compares the same model, with the shared settings below, to the plain reference sampler
(ctxrq_jax/sampling/reference.py) for full generation and inpainting: the programs that most tests here run (compiled
once: both modules are in one xdist group)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxrq_jax.sampling import decoder as decode
from ctxrq_jax.sampling import partitions
from ctxrq_jax.sampling.logits import PhaseSettings

N, D, K, CLASSES, B = 16, 3, 8, 3, 3  # the sizes of `tiny_sampler` (conftest.py)
PS = PhaseSettings
pytestmark = pytest.mark.xdist_group("sampler")  # with test_decoder_cache.py: one worker compiles the programs once


# Shared settings: most tests reuse one compiled program (same static plan) to keep the suite fast on a small CPU;
# test_decoder_cache.py uses them too, and compares that program with the reference sampler.
DRAFT = PS(temperature=1.0, top_k=5)
REVISE = PS(temperature=0.8, top_p=0.9, guidance_scale=1.5)
STEPS = {'t_draft': 4, 't_revise': 2, 'num_revisions': 2}


def _run(tiny_sampler, rng=0, cond=None, fn=decode.draft_and_revise, **kw):
  """Draft-and-Revise with the shared settings (returns (codes, history) unless overridden)."""
  model, params, codebook, cond0 = tiny_sampler
  kw = {**STEPS, 'draft': DRAFT, 'revise': REVISE, 'return_history': True, **kw}
  return fn(model, params, codebook, cond0 if cond is None else cond, jax.random.key(rng), **kw)


# UPDATE (Algorithm 1).


def test_update_pass_updates_every_position_once(tiny_sampler):
  model, params, codebook, cond = tiny_sampler
  state = decode.init_state(jnp.zeros((B, N, D), jnp.int32), jnp.ones((B, N), bool))
  sampler = PS().sampler()
  part = partitions.random_partitions(jax.random.key(7), B, N, 5)  # 5 does not divide 16: steps of 3 or 4
  # Step by step: exactly the positions of step t are written, and only they.
  s = state
  for t in range(5):
    s = decode.update_step(model, params, codebook, s, cond, part, jnp.int32(t), jax.random.key(t), sampler,
                           max_updates=4)
    np.testing.assert_array_equal(s.updates, (part <= t).astype(np.int32))
    np.testing.assert_array_equal(s.known, part <= t)
  drafted = decode.update_pass(model, params, codebook, state, cond, part, jax.random.key(8), sampler,
                               num_steps=5, max_updates=4)
  assert bool(drafted.known.all())  # no [MASK] remains after the draft
  np.testing.assert_array_equal(drafted.updates, np.ones((B, N)))
  assert int(drafted.codes.min()) >= 0 and int(drafted.codes.max()) < K
  revised = decode.update_pass(model, params, codebook, drafted, cond, partitions.random_partitions(
      jax.random.key(9), B, N, 5), jax.random.key(10), sampler, num_steps=5, max_updates=4)
  np.testing.assert_array_equal(revised.updates, 2 * np.ones((B, N)))
  assert not np.array_equal(revised.codes, drafted.codes)


# Draft-and-Revise (Algorithm 2).


def test_history_draft_equals_no_revision_result(tiny_sampler):
  _, hist = _run(tiny_sampler, rng=12)
  draft_only = _run(tiny_sampler, rng=12, num_revisions=0, return_history=False)
  np.testing.assert_array_equal(hist[0], draft_only)


def test_seeds(tiny_sampler):
  (a, _), (b, _), (c, _) = _run(tiny_sampler, rng=13), _run(tiny_sampler, rng=13), _run(tiny_sampler, rng=14)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_guidance(tiny_sampler):
  model, _, _, cond = tiny_sampler
  unguided = dataclasses.replace(REVISE, guidance_scale=0.0)
  base, _ = _run(tiny_sampler, rng=15, revise=unguided)
  # Scale 0 (uncond pass skipped) equals the batched cond+uncond pass with a negligible scale.
  tiny = dataclasses.replace(REVISE, guidance_scale=1e-30)
  np.testing.assert_array_equal(base, _run(tiny_sampler, rng=15, revise=tiny)[0])
  assert not np.array_equal(base, _run(tiny_sampler, rng=15, revise=dataclasses.replace(REVISE, guidance_scale=4.0))[0])
  # cond == uncond (the null id everywhere): guidance is a no-op.
  null = jnp.full_like(cond, model.num_classes)
  guided = dataclasses.replace(REVISE, guidance_scale=3.0)
  np.testing.assert_array_equal(_run(tiny_sampler, rng=15, cond=null, revise=unguided)[0],
                                _run(tiny_sampler, rng=15, cond=null, revise=guided)[0])


def test_temperature_zero_is_argmax(tiny_sampler):
  def greedy(t):
    return dataclasses.replace(DRAFT, temperature=t), dataclasses.replace(REVISE, temperature=t)
  a, _ = _run(tiny_sampler, rng=16, **dict(zip(('draft', 'revise'), greedy(0.0))))
  np.testing.assert_array_equal(a, _run(tiny_sampler, rng=16, **dict(zip(('draft', 'revise'), greedy(1e-6))))[0])
  assert not np.array_equal(a, _run(tiny_sampler, rng=16)[0])


def test_no_recompilation(tiny_sampler):
  _run(tiny_sampler, rng=17)
  before = decode._decode._cache_size()
  for seed, temp, scale in ((18, 0.7, 2.0), (19, 1.3, 0.5)):
    cond = jax.random.randint(jax.random.key(seed), (B, 1), 0, CLASSES + 1)
    _run(tiny_sampler, rng=seed, cond=cond, draft=dataclasses.replace(DRAFT, temperature=temp),
         revise=dataclasses.replace(REVISE, temperature=temp, guidance_scale=scale, top_p=0.5))
  assert decode._decode._cache_size() == before


def test_inpaint_keeps_context(tiny_sampler):
  """(Equality with the reference sampler on this region: tests/unit/sampling/test_decoder_cache.py.)"""
  model, params, codebook, cond = tiny_sampler
  codes = jax.random.randint(jax.random.key(20), (B, N, D), 0, K)
  region = np.zeros((B, N), bool)
  region[0, 3:9] = True
  region[1, [0, 5, 10, 12, 15]] = True
  region[2, :] = True  # largest region N: the same compiled program as full generation
  kw = {**STEPS, 'draft': DRAFT, 'revise': REVISE, 'return_history': True}
  out, hist = decode.inpaint(model, params, codebook, codes, region, cond, jax.random.key(21), **kw)
  for phase in hist:  # bit-identical context in the draft and every revision
    np.testing.assert_array_equal(np.asarray(phase)[~region], np.asarray(codes)[~region])
  np.testing.assert_array_equal(hist[-1], out)
  assert not np.array_equal(np.asarray(out)[region], np.asarray(codes)[region])
  # Instrumented pass over region partitions: writes each region stack once and nothing else.
  state = decode.init_state(codes, jnp.asarray(region))
  part = partitions.region_partitions(jax.random.key(22), jnp.asarray(region), 5)
  state = decode.update_pass(model, params, codebook, state, cond, part, jax.random.key(23), PS().sampler(),
                             num_steps=5, max_updates=4)
  np.testing.assert_array_equal(state.updates, region.astype(np.int32))
  np.testing.assert_array_equal(np.asarray(state.codes)[~region], np.asarray(codes)[~region])
  assert bool(state.known.all())


def test_confidence_draft(tiny_sampler):
  model, params, codebook, cond = tiny_sampler
  greedy = PS(temperature=0.0)
  a = decode.confidence_draft(model, params, codebook, cond, jax.random.key(24), t_draft=4, settings=greedy)
  b = decode.confidence_draft(model, params, codebook, cond, jax.random.key(25), t_draft=4, settings=greedy)
  np.testing.assert_array_equal(a, b)  # greedy and noise-free: nothing random is left
  assert int(a.min()) >= 0 and int(a.max()) < K
  # Exact cosine schedule of known stacks per step, every stack written once.
  state = decode.init_state(jnp.zeros((B, N, D), jnp.int32), jnp.ones((B, N), bool))
  step = jax.jit(decode._confidence_step, static_argnums=(0, 7, 11))
  known = []
  for t in range(4):
    state = step(model, {'params': params}, codebook, state, cond, jnp.ones((B, N), bool), jnp.int32(t), 4,
                 jax.random.key(t), jax.random.key(99), PS().sampler(), 1.0)
    known.append(np.asarray(state.known.sum(1)))
  want = [N - int(np.floor(N * np.cos(np.pi / 2 * (t + 1) / 4))) for t in range(3)] + [N]
  np.testing.assert_array_equal(np.stack(known), np.repeat(np.array(want)[:, None], B, 1))
  np.testing.assert_array_equal(state.updates, np.ones((B, N)))


def test_bad_inputs(tiny_sampler):
  model, params, codebook, cond = tiny_sampler
  with pytest.raises(ValueError, match='condition ids'):
    _run(tiny_sampler, cond=jnp.array([[0], [1], [CLASSES + 1]]))
  with pytest.raises(ValueError, match='t_draft=17 exceeds N=16'):
    _run(tiny_sampler, t_draft=N + 1)
  with pytest.raises(ValueError, match='t_revise'):
    _run(tiny_sampler, t_revise=0)
  with pytest.raises(ValueError, match='draft_mode'):
    _run(tiny_sampler, draft_mode='greedy')
  with pytest.raises(ValueError, match='temperature'):
    PS(temperature=-1.0)
  with pytest.raises(ValueError, match='top_p'):
    PS(top_p=0.0)
  with pytest.raises(ValueError, match='PhaseSettings'):
    _run(tiny_sampler, draft={'temperature': 1.0})
  with pytest.raises(ValueError, match="'params' collection"):
    decode.draft_and_revise(model, {'params': params}, codebook, cond, jax.random.key(0), **STEPS, draft=DRAFT,
                            revise=REVISE)
  codes = jnp.zeros((B, N, D), jnp.int32)
  kw = {'t_draft': 2, 't_revise': 2, 'num_revisions': 1, 'draft': PS(), 'revise': PS()}
  with pytest.raises(ValueError, match='region must be bool'):
    decode.inpaint(model, params, codebook, codes, np.ones((B, N + 1), bool), cond, jax.random.key(0), **kw)
  with pytest.raises(ValueError, match='region is empty'):
    decode.inpaint(model, params, codebook, codes, np.zeros((B, N), bool), cond, jax.random.key(0), **kw)
  small = np.zeros((B, N), bool)
  small[:, :3] = True
  with pytest.raises(ValueError, match='smallest region size'):
    decode.inpaint(model, params, codebook, codes, small, cond, jax.random.key(0), **{**kw, 't_draft': 4})


def test_sample_command_offers_every_draft_mode():
  from ctxrq_jax import sample as sample_command  # pylint: disable=g-import-not-at-top
  assert sample_command.DRAFT_MODES == decode.DRAFT_MODES


# One key per sample (large sample sets drawn piece by piece).


def test_per_sample_keys_make_each_sample_independent_of_its_batch(tiny_sampler):
  model, params, codebook, _ = tiny_sampler
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(5), i))(jnp.arange(4))
  cond = jnp.array([[0], [1], [2], [1]], jnp.int32)
  kw = {**STEPS, 'draft': DRAFT, 'revise': REVISE, 'return_history': True}
  # Batches of 3 throughout (one compiled program): samples 0, 1, 2; then 2 and 0 in other slots, next to sample 3.
  # (Other batch sizes give the same samples too: tests/unit/sampling/test_runner.py draws a set in batches of 5 and 2.)
  whole, hist = decode.draft_and_revise(model, params, codebook, cond[:3], keys[:3], **kw)
  idx = np.array([2, 0, 3])
  part, part_hist = decode.draft_and_revise(model, params, codebook, cond[idx], keys[idx], **kw)
  np.testing.assert_array_equal(part[:2], whole[idx[:2]])
  np.testing.assert_array_equal(part_hist[:, :2], hist[:, idx[:2]])
  assert hist.shape == (3, 3, N, D) and np.array_equal(hist[-1], whole)
  # Different keys give different samples (samples 1 and 3 share their class); a batch of keys must match the batch.
  assert not np.array_equal(whole[1], part[2])
  with pytest.raises(ValueError, match=r'one key per sample \[B=4\], got keys of shape \(3,\)'):
    decode.draft_and_revise(model, params, codebook, cond, keys[:3], **kw)
