"""The fast sampler (fori_loop, gathered positions, cached depth steps) returns exactly the reference's codes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxrq_jax.sampling import decoder
from ctxrq_jax.sampling import reference
from ctxrq_jax.sampling.logits import PhaseSettings

N, D, K, B = 16, 3, 8, 3  # the sizes of `tiny_sampler` (conftest.py), the model of test_decoder.py too
pytestmark = pytest.mark.xdist_group("sampler")  # with test_decoder.py: one worker compiles the programs once
DRAFT = PhaseSettings(temperature=1.0, top_k=5)
REVISE = PhaseSettings(temperature=0.8, top_p=0.9, guidance_scale=1.5)
STEPS = {"t_draft": 4, "t_revise": 2, "num_revisions": 2}


@pytest.mark.parametrize("guided", ["revise", "both", "none"])
def test_fast_sampler_equals_reference(tiny_sampler, guided):
  model, params, codebook, cond = tiny_sampler
  draft = dataclasses.replace(DRAFT, guidance_scale=1.2) if guided == "both" else DRAFT
  revise = REVISE if guided != "none" else dataclasses.replace(REVISE, guidance_scale=0.0)
  kw = {**STEPS, "draft": draft, "revise": revise, "return_history": True}
  codes, hist = decoder.draft_and_revise(model, params, codebook, cond, jax.random.key(11), **kw)
  ref, ref_hist = reference.reference_draft_and_revise(model, params, codebook, cond, jax.random.key(11), **kw)
  np.testing.assert_array_equal(codes, ref)
  np.testing.assert_array_equal(hist, ref_hist)
  assert hist.shape == (3, B, N, D) and codes.dtype == jnp.int32
  np.testing.assert_array_equal(hist[-1], codes)  # the history ends with the returned codes
  assert not np.array_equal(hist[0], hist[1])  # revisions do change the draft
  assert int(codes.min()) >= 0 and int(codes.max()) < K


def test_inpaint_equals_reference(tiny_sampler):
  model, params, codebook, cond = tiny_sampler
  codes = jax.random.randint(jax.random.key(20), (B, N, D), 0, K)
  region = np.zeros((B, N), bool)
  region[0, 3:9] = True
  region[1, [0, 5, 10, 12, 15]] = True
  region[2, :] = True
  # With the history: the program of test_fast_sampler_equals_reference[revise] (region 2 is all N positions).
  kw = {**STEPS, "draft": DRAFT, "revise": REVISE, "return_history": True}
  out, hist = decoder.inpaint(model, params, codebook, codes, region, cond, jax.random.key(21), **kw)
  ref, ref_hist = reference.reference_draft_and_revise(model, params, codebook, cond, jax.random.key(21), codes=codes,
                                                       region=region, **kw)
  np.testing.assert_array_equal(np.asarray(out)[~region], np.asarray(codes)[~region])
  np.testing.assert_array_equal(out, ref)
  np.testing.assert_array_equal(hist, ref_hist)
  assert not np.array_equal(np.asarray(out)[region], np.asarray(codes)[region])


def test_guidance_scale_zero_equals_tiny_scale(tiny_sampler):
  """Scale 0 skips the uncond branch; a negligible scale runs it and guides the features: same codes.
  (The programs of test_fast_sampler_equals_reference[none] and [revise]: nothing new to compile.)"""
  model, params, codebook, cond = tiny_sampler
  kw = {**STEPS, "draft": DRAFT, "return_history": True}
  a, _ = decoder.draft_and_revise(model, params, codebook, cond, jax.random.key(5),
                                  revise=dataclasses.replace(REVISE, guidance_scale=0.0), **kw)
  b, _ = decoder.draft_and_revise(model, params, codebook, cond, jax.random.key(5),
                                  revise=dataclasses.replace(REVISE, guidance_scale=1e-30), **kw)
  np.testing.assert_array_equal(a, b)
