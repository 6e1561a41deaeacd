"""The one optimizer of both stages (ctxrq_jax/core/optim.py): schedule values, the weight-decay mask, clipping."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ctxrq_jax.configs import common
from ctxrq_jax.core import optim
from ctxrq_jax.core.config import ConfigError
from ctxrq_jax.models import transformer
from tests import helpers

PEAK, END_RATIO, WARMUP, STEPS = 1e-3, 0.1, 10, 100


def _cfg(**overrides):
  kw = dict(learning_rate=PEAK, b1=0.9, b2=0.95, weight_decay=0.1, warmup_steps=WARMUP, end_lr_ratio=END_RATIO,
            grad_clip=1.0)
  kw.update(overrides)
  return common.optim(**kw)


def _lr(schedule, step):
  return float(schedule(step))


def test_cosine_schedule_values():
  s = optim.learning_rate_schedule(_cfg(), STEPS)
  assert _lr(s, 0) == 0.0  # linear warmup from 0 ...
  assert _lr(s, WARMUP // 2) == pytest.approx(PEAK / 2, rel=1e-6)
  assert _lr(s, WARMUP) == pytest.approx(PEAK, rel=1e-6)  # ... to the peak at the end of the warmup
  # Half way through the cosine part: half way between the peak and the end value.
  mid = WARMUP + (STEPS - WARMUP) // 2
  assert _lr(s, mid) == pytest.approx(END_RATIO * PEAK + 0.5 * (1 - END_RATIO) * PEAK, rel=1e-5)
  # The last update (optimizer count num_steps - 1) is just above the end value, reached at num_steps.
  last = END_RATIO * PEAK + 0.5 * (1 - END_RATIO) * PEAK * (1 + math.cos(math.pi * (STEPS - 1 - WARMUP)
                                                                          / (STEPS - WARMUP)))
  assert _lr(s, STEPS - 1) == pytest.approx(last, rel=1e-5) and _lr(s, STEPS - 1) > END_RATIO * PEAK
  assert _lr(s, STEPS) == pytest.approx(END_RATIO * PEAK, rel=1e-6)
  # An explicit learning rate (stage 1's discriminator) replaces the section's peak.
  assert _lr(optim.learning_rate_schedule(_cfg(), STEPS, learning_rate=4e-3), WARMUP) == pytest.approx(4e-3, rel=1e-6)


def test_constant_schedule_and_warmup_clamp():
  s = optim.learning_rate_schedule(_cfg(schedule="constant"), STEPS)
  assert _lr(s, 0) == 0.0
  assert _lr(s, WARMUP // 2) == pytest.approx(PEAK / 2, rel=1e-6)
  assert _lr(s, WARMUP) == pytest.approx(PEAK, rel=1e-6) and _lr(s, STEPS) == pytest.approx(PEAK, rel=1e-6)
  s = optim.learning_rate_schedule(_cfg(schedule="constant", warmup_steps=0), STEPS)
  assert _lr(s, 0) == pytest.approx(PEAK, rel=1e-6) and _lr(s, STEPS) == pytest.approx(PEAK, rel=1e-6)
  # A warmup longer than the run ends at the last update (num_steps - 1), so every run reaches its peak.
  s = optim.learning_rate_schedule(_cfg(warmup_steps=50), 10)
  assert _lr(s, 9) == pytest.approx(PEAK, rel=1e-6) and _lr(s, 8) == pytest.approx(PEAK * 8 / 9, rel=1e-6)


def test_decay_mask_leaves_biases_norms_and_embeddings_out():
  tree = {"dense": {"kernel": 1, "bias": 1}, "norm": {"scale": 1}, "cond_embed": {"embedding": 1},
          "attn": {"qkv_kernel": 1, "qkv_bias": 1, "out_bias": 1}, "mask_embed": 1, "cond_pos": 1, "spatial_pos": 1,
          "depth_pos": 1}
  mask = optim.decay_mask(tree)
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
  assert {k for k, v in flat.items() if v} == {"['dense']['kernel']", "['attn']['qkv_kernel']"}, flat


def test_weight_decay_only_on_kernels_of_the_transformer():
  config = helpers.tiny_stage2_config("unused")
  model = transformer.from_run_config(config)
  params = nn.meta.unbox(transformer.abstract_variables(model)["params"])
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): decays
          for path, decays in jax.tree_util.tree_leaves_with_path(optim.decay_mask(params))}
  decayed = {k for k, v in flat.items() if v}
  assert decayed and all(k.endswith("kernel") for k in decayed), sorted(decayed)
  assert any(k.endswith("qkv_bias") for k in flat) and not any(k.endswith("_bias") for k in decayed)
  assert any(k.endswith("fc_in/kernel") for k in decayed) and any(k.endswith("qkv_kernel") for k in decayed)
  for name in ("embedding", "scale", "cond_pos", "spatial_pos", "depth_pos", "mask_embed"):
    assert not any(name in k for k in decayed), name


def _updates(tx, params, grads):
  """The first update of `tx`, jitted (one program instead of dozens of op-by-op compilations)."""
  return jax.jit(lambda p, g: tx.update(g, tx.init(p), p)[0])(params, grads)


def test_adamw_decays_kernels_only():
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}, "norm": {"scale": jnp.ones((2,))}}
  tx = optim.make_optimizer(_cfg(warmup_steps=0, schedule="constant"), STEPS)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates = _updates(tx, params, zeros)  # no gradient: only weight decay moves anything
  np.testing.assert_allclose(updates["dense"]["kernel"], -PEAK * 0.1 * np.ones((2, 2)), rtol=1e-6)
  assert not np.any(updates["dense"]["bias"]) and not np.any(updates["norm"]["scale"])


def test_grad_clip_zero_leaves_clipping_out():
  params = {"kernel": jnp.arange(6.0).reshape(2, 3), "bias": jnp.ones((3,))}
  grads = {"kernel": jnp.full((2, 3), 100.0), "bias": jnp.full((3,), -50.0)}  # global norm far above 1
  cfg = _cfg(grad_clip=0.0, warmup_steps=0, schedule="constant")
  tx = optim.make_optimizer(cfg, STEPS)
  assert len(tx.init(params)) == 1  # AdamW alone: no clipping state in the chain
  adamw = optax.adamw(optim.learning_rate_schedule(cfg, STEPS), b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
                      mask=optim.decay_mask)
  helpers.assert_trees_equal(_updates(tx, params, grads), _updates(adamw, params, grads))
  assert np.all(np.asarray(_updates(tx, params, grads)["kernel"]) < 0)  # clip_by_global_norm(0) would zero it
  # grad_clip > 0: clipping to that global norm first, then the same AdamW.
  clipped_cfg = _cfg(grad_clip=0.5, warmup_steps=0, schedule="constant")
  clipped = optim.make_optimizer(clipped_cfg, STEPS)
  assert len(clipped.init(params)) == 2
  want = optax.chain(optax.clip_by_global_norm(0.5), adamw)
  helpers.assert_trees_equal(_updates(clipped, params, grads), _updates(want, params, grads))


@pytest.mark.parametrize("key, value, message", [
    ("schedule", "linear", r"optim.schedule must be one of \('cosine', 'constant'\), got 'linear'"),
    ("learning_rate", 0.0, "optim.learning_rate must be > 0"),
    ("warmup_steps", -1, "optim.warmup_steps must be >= 0"),
    ("end_lr_ratio", 1.5, r"optim.end_lr_ratio must be in \[0, 1\]"),
    ("grad_clip", -1.0, r"optim.grad_clip must be >= 0 \(0 = off\)"),
    ("weight_decay", -0.1, "optim.weight_decay must be >= 0"),
])
def test_validate_names_the_bad_value(key, value, message):
  with pytest.raises(ConfigError, match=message):
    optim.make_optimizer(_cfg(**{key: value}), STEPS)


def test_validate_names_missing_keys():
  cfg = dict(_cfg())
  del cfg["eps"], cfg["schedule"]
  with pytest.raises(ConfigError, match="stage1.optim is missing keys: eps, schedule"):
    optim.validate(cfg, where="stage1.optim")
  assert sorted(optim.KEYS) == sorted(_cfg())  # the section ctxrq_jax/configs/common.py builds has every key
