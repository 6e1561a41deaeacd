"""Held-out likelihood metrics (ctxrq_jax/evaluation/likelihood.py) on hand-computed values."""

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxrq_jax.evaluation import likelihood
from ctxrq_jax.models import transformer
from ctxrq_jax.stage2 import masking

K, D, N = 16, 3, 6


def test_unigram_cross_entropy_with_add_one_smoothing():
  # K = 4, D = 2. Training codes: depth 1 = 0, 0, 1; depth 2 = 2, 2, 2. Held-out stacks: (0, 2) and (3, 1).
  train = np.array([[0, 2], [0, 2], [1, 2]]).reshape(3, 1, 2)  # any middle shape: [M, ..., D]
  held_out = np.array([[0, 2], [3, 1]]).reshape(2, 1, 2)
  got = likelihood.unigram_cross_entropy(train, held_out, 4)
  # Pooled counts of codes 0..3 over both depths: 2, 1, 3, 0; + 1 each -> 3, 2, 4, 1 of 10.
  pooled = -(math.log(3 / 10) + math.log(4 / 10) + math.log(1 / 10) + math.log(2 / 10)) / 4
  # Depth 1: 2, 1, 0, 0 -> 3, 2, 1, 1 of 7, held-out codes 0 and 3. Depth 2: 0, 0, 3, 0 -> 1, 1, 4, 1 of 7, codes 2, 1.
  depth1 = -(math.log(3 / 7) + math.log(1 / 7)) / 2
  depth2 = -(math.log(4 / 7) + math.log(1 / 7)) / 2
  assert got["unigram_pooled"] == pytest.approx(pooled, rel=1e-12)
  assert got["unigram_per_depth"] == pytest.approx((depth1 + depth2) / 2, rel=1e-12)
  # An unseen code stays finite: the held-out code 3 was never used in training.
  assert np.isfinite(got["unigram_pooled"]) and np.isfinite(got["unigram_per_depth"])


@pytest.fixture(scope="module")
def uniform_model():
  """A tiny model whose output head is zero: every logit 0, every code probability 1/K."""
  model = transformer.ContextualRQTransformer(vocab_size=K, code_depth=D, num_positions=N, embed_dim=8, width=32,
                                              num_heads=4, spatial_layers=1, depth_layers=1, num_classes=5)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), *transformer.init_inputs(model))["params"])
  params = dict(params, head=jax.tree.map(jnp.zeros_like, params["head"]))
  codebook = jax.random.normal(jax.random.key(1), (K, 8))
  return model, params, codebook


def test_masked_code_nll_of_a_uniform_model_is_log_k(uniform_model):
  model, params, codebook = uniform_model
  rng = np.random.default_rng(0)
  m, batch_size, num_draws, seed = 5, 4, 2, 3  # the second batch is padded with 3 rows that must not count
  codes = rng.integers(0, K, (m, N, D))
  labels = rng.integers(0, 5, (m,))
  got = likelihood.masked_code_nll(model, params, codebook, codes, labels, num_draws=num_draws, seed=seed,
                                   batch_size=batch_size)
  assert got["nll"] == pytest.approx(math.log(K), rel=1e-6)
  for d in range(1, D + 1):
    assert got[f"nll_d{d}"] == pytest.approx(math.log(K), rel=1e-6)
  # The count is that of the masks q(m) gave the real rows (fixed per draw and batch), times D.
  draw_masks = jax.jit(lambda key: masking.sample_mask(key, batch_size, N))
  want = 0
  for draw in range(num_draws):
    for i in range(0, m, batch_size):
      mask = np.asarray(draw_masks(jax.random.fold_in(jax.random.key(seed), draw * 1_000_003 + i)))
      want += int(mask[:min(batch_size, m - i)].sum()) * D
  assert got["masked_codes"] == want


def test_format_stage2_results():
  r = {"nll": 1.5, "nll_d1": 1.0, "nll_d2": 2.0, "unigram_per_depth": 3.0, "unigram_pooled": 3.5,
       "nll_over_unigram": 0.5, "step": 7, "masked_codes": 100, "nll_null_condition": 1.75, "condition_gain": 0.25}
  lines = likelihood.format_stage2_results(r).splitlines()
  assert lines[0] == "stage-2 step 7, 100 held-out masked codes"
  assert lines[1].split() == ["held-out", "nats/code"] and set(lines[2]) == {"-", " "}
  rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in lines[3:])
  assert rows == {"masked-code NLL (all depths)": "1.500", "depth 1": "1.000", "depth 2": "2.000",
                  "unigram cross-entropy, per depth": "3.000", "unigram cross-entropy, pooled": "3.500",
                  "NLL / per-depth unigram": "50.0%", "masked-code NLL, null condition": "1.750",
                  "what the condition adds (null - conditioned)": "0.250"}, lines
