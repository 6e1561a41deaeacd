"""Held-out likelihood metrics (ctxrq_jax/evaluation/likelihood.py) on hand-computed values."""

import functools
import math
import re
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ctxrq_jax.evaluation import likelihood
from ctxrq_jax.models import transformer
from ctxrq_jax.sampling import loader
from ctxrq_jax.stage2 import masking
from tests import helpers

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
def tiny_model():
  """A tiny model (K 16, D 3, N 6, 5 classes) with its random parameters scaled 8x: logits far from uniform that
  depend on the code, the position, the condition and what the model sees (the N(0, 0.02) init is near-uniform)."""
  model = transformer.ContextualRQTransformer(vocab_size=K, code_depth=D, num_positions=N, embed_dim=8, width=32,
                                              num_heads=4, spatial_layers=1, depth_layers=1, num_classes=5)
  init = lambda key: jax.tree.map(lambda x: 8.0 * x, nn.meta.unbox(  # noqa: E731  (scaled in the init's program)
      model.init(key, *transformer.init_inputs(model))["params"]))
  codebook = jax.random.normal(jax.random.key(1), (K, 8))
  return model, jax.jit(init)(jax.random.key(0)), codebook


@functools.cache
def _draw_masks(batch_size):
  return jax.jit(lambda key: masking.sample_mask(key, batch_size, N))


def _masks(seed, num_draws, m, batch_size):
  """The masks q(m) gives the real rows in `masked_code_nll`: fixed per draw and batch (its first row), drawn for
  the whole padded batch -> [(rows, bool mask [len(rows), N])]."""
  out = []
  for draw in range(num_draws):
    for i in range(0, m, batch_size):
      mask = np.asarray(_draw_masks(batch_size)(jax.random.fold_in(jax.random.key(seed), draw * 1_000_003 + i)))
      rows = np.arange(i, min(i + batch_size, m))
      out.append((rows, mask[:len(rows)]))
  return out


def test_masked_code_nll_of_a_uniform_model_is_log_k(tiny_model):
  model, params, codebook = tiny_model
  params = dict(params, head=jax.tree.map(jnp.zeros_like, params["head"]))  # every logit 0: probability 1/K
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
  want = sum(int(mask.sum()) for _, mask in _masks(seed, num_draws, m, batch_size)) * D
  assert got["masked_codes"] == want


def _log_softmax(logits):
  z = np.asarray(logits, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_masked_code_nll_scores_the_masked_codes_unseen(tiny_model):
  """A sharp model (the uniform one above scores -log K whatever code is read and whatever the model sees): the
  NLL is -log p(target) over exactly the masked positions of the real rows, the model given the mask (its spatial
  transformer sees [MASK] there); computed here row by row, in float64, from the model's logits."""
  model, params, codebook = tiny_model
  rng = np.random.default_rng(1)
  m, batch_size, seed = 5, 4, 3  # the second batch is padded with 3 rows that must not count
  codes = rng.integers(0, K, (m, N, D))
  labels = rng.integers(0, 5, (m,))
  got = likelihood.masked_code_nll(model, params, codebook, codes, labels, num_draws=1, seed=seed,
                                   batch_size=batch_size)

  apply = jax.jit(lambda c, mask, y: model.apply({"params": params}, c, mask, y, codebook))
  total, count = np.zeros(D), np.zeros(D)
  leaked, code0 = np.zeros(D), np.zeros(D)  # what a leaking evaluation, or one scoring code 0, would give
  for rows, masks in _masks(seed, 1, m, batch_size):
    for r, mask in zip(rows, masks):
      logp = _log_softmax(apply(codes[r][None], mask[None], labels[r][None, None]))[0]  # [N, D, K]
      total -= np.take_along_axis(logp, codes[r][..., None], axis=-1)[..., 0][mask].sum(0)
      code0 -= logp[..., 0][mask].sum(0)
      seen = _log_softmax(apply(codes[r][None], np.zeros((1, N), bool), labels[r][None, None]))[0]  # no mask
      leaked -= np.take_along_axis(seen, codes[r][..., None], axis=-1)[..., 0][mask].sum(0)
      count += mask.sum()
  assert got["masked_codes"] == int(count.sum())
  assert got["nll"] == pytest.approx(total.sum() / count.sum(), rel=1e-5)
  for d in range(D):
    assert got[f"nll_d{d + 1}"] == pytest.approx(total[d] / count[d], rel=1e-5)
  # The agreement above rules out a leak and another target: the model shown the masked stacks, and code 0 in place
  # of the target, score far from it (and far from uniform) at every depth.
  for other in (leaked, code0, np.full(D, math.log(K)) * count):
    assert np.all(np.abs(other - total) / count > 0.1), (other / count, total / count)


def test_evaluate_stage2_scores_the_null_condition(tiny_model, tmp_path, monkeypatch):
  """`evaluate_stage2` scores the held-out codes twice on the same masks (seed and draws): with their labels, and
  with every label replaced by the null condition (class id num_classes = 5); `condition_gain` is the difference.
  The run is faked (the tiny model; nothing is computed: `masked_code_nll`, tested above, is replaced by a
  recorder); the code dataset is real."""
  model, _, _ = tiny_model
  codes_dir = str(tmp_path / "codes")
  _, data = helpers.write_code_dataset(codes_dir, code_shape=(2, 3, D), codebook_size=K, embed_dim=8,
                                       num_classes=5, sizes={"train": 6, "validation": 5})
  config = ml_collections.ConfigDict({"data": {"codes_dir": codes_dir, "train_split": "train",
                                               "eval_split": "validation", "vocab_size": K}})
  run = types.SimpleNamespace(model=model, params="params", codebook="codebook", config=config, step=7)
  monkeypatch.setattr(loader, "Stage2Model", lambda workdir: run if workdir == "run" else None)
  calls = []

  def recorder(*args, **kwargs):  # an NLL that depends on the labels it is given
    calls.append((args, kwargs))
    return {"nll": 2.0 + 0.1 * float(np.mean(args[4])), "nll_d1": 2.5, "masked_codes": 11}

  monkeypatch.setattr(likelihood, "masked_code_nll", recorder)
  got = likelihood.evaluate_stage2("run", num_draws=3, seed=2)
  assert len(calls) == 2
  (args, kwargs), (null_args, null_kwargs) = calls
  eval_codes, eval_labels = data["validation"]
  for a in (args, null_args):  # the same model and codes
    assert a[:3] == (model, "params", "codebook")
    np.testing.assert_array_equal(a[3], eval_codes.reshape(5, N, D))
  assert kwargs == null_kwargs == {"num_draws": 3, "seed": 2}  # the same masks
  np.testing.assert_array_equal(args[4], eval_labels)
  np.testing.assert_array_equal(null_args[4], np.full(5, 5))
  nll, null = 2.0 + 0.1 * np.mean(eval_labels), 2.5
  assert got["nll"] == pytest.approx(nll) and got["nll_d1"] == 2.5 and got["masked_codes"] == 11
  assert got["nll_null_condition"] == pytest.approx(null)
  assert got["condition_gain"] == pytest.approx(null - nll)
  assert got["step"] == 7 and got["nll_over_unigram"] == pytest.approx(nll / got["unigram_per_depth"])


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
