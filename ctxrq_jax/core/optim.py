"""The one optimizer of both stages: AdamW after global-norm clipping, linear warmup then cosine (or constant).

Built from an `optim` config section (ctxrq_jax/configs/common.py names its keys). Weight decay applies to kernels
only: biases (including `*_bias` such as the fused attention's `qkv_bias`), norm scales, embeddings and position
tables are left out.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import optax

from ctxrq_jax.core.config import ConfigError
from ctxrq_jax.core.config import require

SCHEDULES = ("cosine", "constant")
# Parameter names never decayed (any path component equal to one of these, or ending in '_bias').
NO_DECAY = ("bias", "scale", "embedding", "mask_embed", "cond_pos", "spatial_pos", "depth_pos")
KEYS = ("learning_rate", "b1", "b2", "eps", "weight_decay", "warmup_steps", "schedule", "end_lr_ratio", "grad_clip")


def validate(optim_cfg: Mapping[str, Any], where: str = "optim") -> None:
  """Raises ConfigError naming the first bad value of an `optim` section."""
  missing = [k for k in KEYS if k not in optim_cfg]
  if missing:
    raise ConfigError(f"{where} is missing keys: {', '.join(missing)}")
  o = optim_cfg
  require(o["schedule"] in SCHEDULES, f"{where}.schedule must be one of {SCHEDULES}, got {o['schedule']!r}")
  require(float(o["learning_rate"]) > 0, f"{where}.learning_rate must be > 0, got {o['learning_rate']}")
  require(int(o["warmup_steps"]) >= 0, f"{where}.warmup_steps must be >= 0, got {o['warmup_steps']}")
  require(0.0 <= float(o["end_lr_ratio"]) <= 1.0, f"{where}.end_lr_ratio must be in [0, 1], got {o['end_lr_ratio']}")
  require(float(o["grad_clip"]) >= 0, f"{where}.grad_clip must be >= 0 (0 = off), got {o['grad_clip']}")
  require(float(o["weight_decay"]) >= 0, f"{where}.weight_decay must be >= 0, got {o['weight_decay']}")


def learning_rate_schedule(optim_cfg: Mapping[str, Any], num_steps: int,
                           learning_rate: Optional[float] = None) -> optax.Schedule:
  """Linear warmup from 0 to the peak over `warmup_steps` (at most num_steps - 1), then cosine decay to
  `end_lr_ratio` x peak at `num_steps`, or constant. `learning_rate` overrides the section's peak."""
  peak = float(optim_cfg["learning_rate"] if learning_rate is None else learning_rate)
  warmup = min(int(optim_cfg["warmup_steps"]), max(int(num_steps) - 1, 0))
  if optim_cfg["schedule"] == "constant":
    if not warmup:
      return optax.constant_schedule(peak)
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup])
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps=warmup, decay_steps=max(int(num_steps), warmup + 1),
                                            end_value=peak * float(optim_cfg["end_lr_ratio"]))


def keep_where(ok: jax.Array, new: Any, old: Any) -> Any:
  """`new` where the bool scalar `ok` holds, else `old`, leaf by leaf (two trees of one structure): an update that is
  applied only when its step was finite, or only once a loss term is in use."""
  return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def applied_updates(opt_state: Any) -> jax.Array:
  """int32 []: the updates the optimizer has applied, the step its learning-rate schedule is at (the count of
  optax's schedule state). A step skipped for a non-finite loss (`train.nonfinite='skip'`) keeps the optimizer
  state, so it advances neither this count nor the schedule."""
  count = optax.tree_utils.tree_get(
      opt_state, "count", filtering=lambda path, _: getattr(path[-1], "tuple_name", None) == "ScaleByScheduleState")
  if count is None:
    raise ValueError("the optimizer state has no learning-rate schedule count (not built by make_optimizer?)")
  return count


def decay_mask(params: Any) -> Any:
  """True for parameters that get weight decay: kernels, not biases, norms, embeddings or positions."""

  def decays(path, _):
    names = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
    return not any(n in NO_DECAY or n.endswith("_bias") for n in names)

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim_cfg: Mapping[str, Any], num_steps: int,
                   learning_rate: Optional[float] = None) -> optax.GradientTransformation:
  """clip_by_global_norm(grad_clip) (left out when 0: clipping to 0 would zero every gradient), then AdamW."""
  validate(optim_cfg)
  parts = [optax.clip_by_global_norm(float(optim_cfg["grad_clip"]))] if float(optim_cfg["grad_clip"]) > 0 else []
  parts.append(optax.adamw(learning_rate_schedule(optim_cfg, num_steps, learning_rate), b1=float(optim_cfg["b1"]),
                           b2=float(optim_cfg["b2"]), eps=float(optim_cfg["eps"]),
                           weight_decay=float(optim_cfg["weight_decay"]), mask=decay_mask))
  return optax.chain(*parts)
