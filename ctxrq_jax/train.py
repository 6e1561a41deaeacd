"""Stage 2: trains Contextual RQ-Transformer on a code dataset (masked code-stack NLL, §3.2.3 eq. 10-11).

  python -m ctxrq_jax.train --config=configs/imagenet.py:821m --workdir=DIR \
      --config.data.codes_dir=CODES --config.data.stage1_dir=RQVAE

Everything is validated before anything is compiled (config keys against configs/imagenet.py's defaults, the
dataset's code shape / K / n_z / classes against the config, the mesh against the devices, the batch against the
data-parallel size). Parameters are born sharded: `jax.eval_shape` of the init gives the logical partitioning,
`config.sharding_rules` turns it into NamedShardings, and the init is jitted with those `out_shardings`. The train
step is jitted once with the state donated.

One step:
  * rng_t = fold_in(base_key, t), so a resumed run replays exactly the masks, condition drops and dropout of an
    uninterrupted one;
  * masks m ~ q(m) (eq. 10) and condition dropout (classifier-free guidance, `train.cond_drop_rate`) are drawn for
    the whole global batch first;
  * gradient accumulation (`train.grad_accum_steps` = A) is an in-step `lax.scan` over A micro-batches of B / A:
    each micro-batch's gradient is weighted by its number of masked codes, so the accumulated gradient is that of
    eq. 11 over the whole batch (the same masks as A = 1; only the summation order differs). One optimizer update
    per step, so the schedule counts steps, not micro-batches;
  * AdamW (weight decay on kernels only: no biases, LayerNorms, embeddings, position tables) after global-norm
    clipping, linear warmup then cosine decay; optional EMA of the weights;
  * a non-finite loss or gradient norm never touches the state (the update is dropped on device). With
    `train.nonfinite='skip'` training continues (skipped steps are counted and logged); with 'stop' the loop raises
    FloatingPointError naming the step without saving, so the last good checkpoint stays the latest.

Checkpoints (ctxrq_jax/checkpoint.py) every `train.ckpt_every` steps and at the end hold the whole TrainState and the
data-iterator position; a run started in a workdir with checkpoints resumes. SIGTERM/SIGINT saves the current step
and returns cleanly (exit status 0); running the same command again continues.
"""

from __future__ import annotations

import copy
import functools
import itertools
import logging as py_logging
import os
import time
from typing import Any, Callable, Iterator, Optional

from absl import app
from absl import flags
from absl import logging
from clu import parameter_overview
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax

from ctxrq_jax import checkpoint
from ctxrq_jax import configlib
from ctxrq_jax import masking
from ctxrq_jax import runtime
from ctxrq_jax import sharding
from ctxrq_jax import transformer
from ctxrq_jax.configlib import ConfigError
from ctxrq_jax.data import codes as codes_lib

Array = jax.Array
_NO_DECAY = ("bias", "scale", "embedding", "mask_embed", "cond_pos", "spatial_pos", "depth_pos")


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data-iterator position.

  step: int32 [] number of completed steps.
  params / opt_state: model parameters and optax state (sharded like the parameters).
  ema_params: EMA of the parameters, or None when `train.ema_decay` is 0.
  rng: uint32 [2]-like raw key data of the base key; the key of step t is fold_in(base, t).
  """
  step: Array
  params: Any
  opt_state: Any
  ema_params: Any
  rng: Array


# ------------------------------------------------------------------------------------------- validation
def reference_config() -> ml_collections.ConfigDict:
  """The defaults every stage-2 config must match key for key (configs/imagenet.py)."""
  return configlib.load_config_file("imagenet", "tiny")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the config's keys and values that would otherwise fail inside a compiled step (ConfigError)."""
  configlib.check_keys(config, reference_config())
  req = configlib.require
  t, o = config.train, config.optim
  req(int(t.batch_size) >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
  req(int(t.num_steps) >= 1, f"train.num_steps must be >= 1, got {t.num_steps}")
  req(int(t.grad_accum_steps) >= 1, f"train.grad_accum_steps must be >= 1, got {t.grad_accum_steps}")
  req(int(t.batch_size) % int(t.grad_accum_steps) == 0,
      f"train.batch_size {t.batch_size} is not divisible by train.grad_accum_steps {t.grad_accum_steps}")
  req(0.0 <= float(t.cond_drop_rate) <= 1.0, f"train.cond_drop_rate must be in [0, 1], got {t.cond_drop_rate}")
  req(0.0 <= float(t.label_smoothing) < 1.0, f"train.label_smoothing must be in [0, 1), got {t.label_smoothing}")
  req(0.0 <= float(t.ema_decay) < 1.0, f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
  req(t.nonfinite in ("stop", "skip"), f"train.nonfinite must be 'stop' or 'skip', got {t.nonfinite!r}")
  for key in ("log_every", "eval_every", "ckpt_every", "keep_checkpoints"):
    req(int(t[key]) >= 1, f"train.{key} must be >= 1, got {t[key]}")
  req(o.schedule in ("cosine", "constant"), f"optim.schedule must be 'cosine' or 'constant', got {o.schedule!r}")
  req(float(o.learning_rate) > 0, f"optim.learning_rate must be > 0, got {o.learning_rate}")
  req(int(o.warmup_steps) >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
  req(0.0 <= float(o.end_lr_ratio) <= 1.0, f"optim.end_lr_ratio must be in [0, 1], got {o.end_lr_ratio}")
  req(float(o.grad_clip) >= 0, f"optim.grad_clip must be >= 0 (0 = off), got {o.grad_clip}")
  req(int(config.model.cond_length) == 1,
      f"model.cond_length must be 1 for class-conditional code datasets, got {config.model.cond_length}")
  req(bool(config.data.codes_dir), "config.data.codes_dir is empty: pass --config.data.codes_dir=DIR, a code dataset "
      "written by `python -m ctxrq_jax.encode encode`")
  code_shape = tuple(config.data.code_shape)
  req(len(code_shape) == 3 and all(int(v) >= 1 for v in code_shape),
      f"data.code_shape must be (h, w, D), got {code_shape}")
  sharding.logical_rules(config)


def check_dataset(config: ml_collections.ConfigDict, meta: codes_lib.CodeMetadata) -> None:
  """Raises ConfigError when the code dataset does not match what the model config was built for."""
  d = config.data
  where = f"code dataset {d.codes_dir}"
  configlib.require(tuple(meta.code_shape) == tuple(d.code_shape),
                    f"{where} has code shape (h, w, D) = {tuple(meta.code_shape)}, but config.data.code_shape is "
                    f"{tuple(d.code_shape)}")
  configlib.require(int(meta.codebook_size) == int(d.vocab_size),
                    f"{where} has codebook size K = {meta.codebook_size}, but config.data.vocab_size is "
                    f"{d.vocab_size}")
  configlib.require(int(meta.embed_dim) == int(d.embed_dim),
                    f"{where} has code embedding width n_z = {meta.embed_dim}, but config.data.embed_dim is "
                    f"{d.embed_dim}")
  configlib.require(int(meta.num_classes) == int(config.model.num_classes),
                    f"{where} has {meta.num_classes} classes, but config.model.num_classes is "
                    f"{config.model.num_classes}")
  for split in (d.train_split, d.eval_split):
    if split not in meta.splits:
      raise ConfigError(f"{where} has no split {split!r} (config.data); it has {sorted(meta.splits)}")


# Keys that fix the shapes of the saved state: a resumed run must keep them.
_SHAPE_KEYS = tuple(f"model.{k}" for k in ("width", "num_heads", "spatial_layers", "depth_layers", "mlp_ratio",
                                           "num_classes", "cond_length", "cond_vocab_size")) + tuple(
                                               f"data.{k}" for k in ("code_shape", "vocab_size", "embed_dim"))


def check_resume_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises ConfigError when `workdir`'s saved config.json describes a different model or code shape."""
  if not os.path.isfile(os.path.join(workdir, "config.json")):
    return
  saved = runtime.load_config(workdir)
  diffs = configlib.changed_keys(saved, config, _SHAPE_KEYS)
  if diffs:
    raise ConfigError(f"{workdir} holds a stage-2 run of another shape ({'; '.join(diffs)}); resume it with its own "
                      f"config ({os.path.join(workdir, 'config.json')}) or train in a new --workdir")


def _absolute_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy whose data directories are absolute, so the saved config works from any directory."""
  config = copy.deepcopy(config)
  for key in ("codes_dir", "stage1_dir"):
    path = config.data[key]
    if path and "://" not in path:
      config.data[key] = os.path.abspath(path)
  return config


# ------------------------------------------------------------------------------------------- building blocks
def build_model(config: ml_collections.ConfigDict) -> transformer.ContextualRQTransformer:
  h, w, depth = (int(v) for v in config.data.code_shape)
  return transformer.model_from_config(config.model, vocab_size=int(config.data.vocab_size), code_depth=depth,
                                       num_positions=h * w, embed_dim=int(config.data.embed_dim))


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  o = config.optim
  peak, warmup, steps = float(o.learning_rate), int(o.warmup_steps), int(config.train.num_steps)
  if o.schedule == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak)],
                                [max(warmup, 1)]) if warmup else optax.constant_schedule(peak)
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps=warmup, decay_steps=max(steps, warmup + 1),
                                            end_value=peak * float(o.end_lr_ratio))


def _decay_mask(params: Any) -> Any:
  """True for parameters that get weight decay: kernels, not biases, LayerNorms, embeddings or positions."""
  def decays(path, _):
    names = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
    return not any(n in _NO_DECAY or n.endswith("_bias") for n in names)  # qkv_bias, out_bias are biases too
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  o = config.optim
  parts = [optax.clip_by_global_norm(float(o.grad_clip))] if float(o.grad_clip) > 0 else []
  parts.append(optax.adamw(learning_rate_schedule(config), b1=float(o.b1), b2=float(o.b2), eps=float(o.eps),
                           weight_decay=float(o.weight_decay), mask=_decay_mask))
  return optax.chain(*parts)


def _init_fn(model: transformer.ContextualRQTransformer, tx: optax.GradientTransformation, seed: int,
             use_ema: bool) -> Callable[[], TrainState]:
  """A no-argument init (the seed is static) returning a TrainState with logically boxed leaves."""

  def init() -> TrainState:
    key = jax.random.key(seed)
    init_key, base_key = jax.random.split(key)
    variables = model.init(init_key, *transformer.init_inputs(model))
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=params if use_ema else None, rng=jax.random.key_data(base_key))

  return init


def create_train_state(model, tx, config, mesh, rules) -> tuple[TrainState, Any]:
  """Initialises the state directly into its shardings; returns (state, state_shardings)."""
  init = _init_fn(model, tx, int(config.seed), float(config.train.ema_decay) > 0)
  # No mesh context here: out_shardings place the outputs, and flax's init-time constraints on reshaped kernels
  # (DenseGeneral) would be applied to the wrong rank.
  abstract = jax.eval_shape(init)
  shardings = sharding.logical_to_shardings(abstract, mesh, rules)
  state = jax.jit(lambda: nn.meta.unbox(init()), out_shardings=shardings)()
  return state, shardings


def abstract_train_state(model, tx, config, mesh, rules) -> tuple[TrainState, Any]:
  """(ShapeDtypeStruct state with shardings, state_shardings) without allocating anything."""
  init = _init_fn(model, tx, int(config.seed), float(config.train.ema_decay) > 0)
  abstract = jax.eval_shape(init)
  shardings = sharding.logical_to_shardings(abstract, mesh, rules)
  shapes = nn.meta.unbox(abstract)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings), shardings


def _weighted_loss(model, params, codes, mask, cond, codebook, label_smoothing, dropout_rng, train):
  logits = model.apply({"params": params}, codes, mask, cond, codebook, train=train,
                       rngs={"dropout": dropout_rng} if train else None)
  loss, metrics = masking.masked_nll(logits, codes, mask, label_smoothing)
  # Weighted by the masked-code count so micro-batch sums give the whole-batch eq. 11 mean.
  return loss * metrics["num_masked_codes"], metrics


def make_train_step(model: transformer.ContextualRQTransformer, tx: optax.GradientTransformation,
                    config: ml_collections.ConfigDict) -> Callable[[TrainState, Any, Array], tuple[TrainState, Any]]:
  """`step(state, batch {'codes' [B,h,w,D], 'label' [B]}, codebook [K,n_z]) -> (state, metrics)` (unjitted)."""
  t = config.train
  accum = int(t.grad_accum_steps)
  drop_rate, smoothing = float(t.cond_drop_rate), float(t.label_smoothing)
  ema_decay = float(t.ema_decay)
  null_id = model.null_cond_id

  def step_fn(state: TrainState, batch: Any, codebook: Array) -> tuple[TrainState, Any]:
    codes = batch["codes"]
    b = codes.shape[0]
    codes = codes.reshape(b, -1, codes.shape[-1]).astype(jnp.int32)  # [B, N, D]
    n = codes.shape[1]
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    mask_key, cond_key, dropout_key = jax.random.split(key, 3)
    mask = masking.sample_mask(mask_key, b, n)
    cond = masking.drop_condition(cond_key, batch["label"].astype(jnp.int32)[:, None], drop_rate, null_id)

    grad_fn = jax.value_and_grad(
        functools.partial(_weighted_loss, model, label_smoothing=smoothing, train=True), has_aux=True)

    def micro(carry, xs):
      grads_acc, sums = carry
      i, c, m, y = xs
      (wloss, metrics), grads = grad_fn(state.params, c, m, y, codebook, dropout_rng=jax.random.fold_in(dropout_key, i))
      grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
      w = metrics["num_masked_codes"]
      sums = {k: sums[k] + (v if k == "num_masked_codes" else v * w) for k, v in metrics.items()}
      return (grads_acc, sums), None

    # Strided micro-batches (rows i, i + A, ...): each one keeps rows from every device's block of the batch, so
    # the scan needs no resharding.
    split = lambda x: x.reshape(b // accum, accum, *x.shape[1:]).swapaxes(0, 1)  # noqa: E731
    zeros_g = jax.tree.map(jnp.zeros_like, state.params)
    zeros_m = jax.eval_shape(lambda: masking.masked_nll(
        jnp.zeros((1, n, codes.shape[-1], model.vocab_size)), codes[:1], mask[:1])[1])
    zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros_m)
    (grads, sums), _ = jax.lax.scan(micro, (zeros_g, zeros_m),
                                    (jnp.arange(accum), split(codes), split(mask), split(cond)))
    total = jnp.maximum(sums["num_masked_codes"], 1.0)
    grads = jax.tree.map(lambda g: g / total, grads)
    metrics = {k: v if k == "num_masked_codes" else v / total for k, v in sums.items()}
    metrics["mask_fraction"] = sums["num_masked_codes"] / (b * n * codes.shape[-1])

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
      ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, c: jnp.where(finite, a, c), new, old)  # noqa: E731
    new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                           opt_state=keep(opt_state, state.opt_state),
                           ema_params=None if ema is None else keep(ema, state.ema_params), rng=state.rng)
    metrics.update(grad_norm=grad_norm, param_norm=optax.global_norm(new_state.params),
                   learning_rate=learning_rate_schedule(config)(state.step), finite=finite.astype(jnp.float32))
    return new_state, metrics

  return step_fn


def make_eval_step(model: transformer.ContextualRQTransformer) -> Callable[..., Any]:
  """`eval(params, batch, codebook, key) -> metrics sums` with fixed masks drawn from `key` (no dropout)."""

  def eval_fn(params: Any, batch: Any, codebook: Array, key: Array) -> Any:
    codes = batch["codes"]
    b = codes.shape[0]
    codes = codes.reshape(b, -1, codes.shape[-1]).astype(jnp.int32)
    mask = masking.sample_mask(key, b, codes.shape[1])
    cond = batch["label"].astype(jnp.int32)[:, None]
    wloss, metrics = _weighted_loss(model, params, codes, mask, cond, codebook, 0.0, None, False)
    w = metrics["num_masked_codes"]
    return {k: (v if k == "num_masked_codes" else v * w) for k, v in metrics.items()}

  return eval_fn


def _eval_key(seed: int, index: int) -> Array:
  """Fixed per-batch eval masks: the same key for batch i at every evaluation."""
  return jax.random.key_data(jax.random.fold_in(jax.random.key(seed ^ 0x5EED), index))


# ------------------------------------------------------------------------------------------- loop
def _code_iterator(config, split: str, batch_size: int, train: bool) -> Iterator[Any]:
  return codes_lib.make_code_iterator(
      config.data.codes_dir, split=split, batch_size=batch_size, seed=int(config.seed), train=train,
      shard_index=jax.process_index(), shard_count=jax.process_count(), drop_remainder=True)


def evaluate(config, eval_fn, params, codebook, mesh, meta: codes_lib.CodeMetadata) -> dict[str, float]:
  """Masked NLL over the eval split (whole global batches; fixed masks per batch index)."""
  batch_size = int(config.train.batch_size)
  it = _code_iterator(config, config.data.eval_split, batch_size // jax.process_count(), train=False)
  # Every host runs the same number of (collective) eval steps, although strided host shards differ by one example.
  num_batches = meta.num_examples(config.data.eval_split) // batch_size
  totals: dict[str, float] = {}
  for i, host_batch in enumerate(itertools.islice(it, num_batches)):
    batch = sharding.host_local_batch_to_global(host_batch, mesh)
    sums = jax.device_get(eval_fn(params, batch, codebook, _eval_key(int(config.seed), i)))
    for k, v in sums.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  if not totals:
    logging.warning("eval split %r has fewer than one global batch (%d); eval skipped", config.data.eval_split,
                    batch_size)
    return {}
  total = max(totals["num_masked_codes"], 1.0)
  return {f"eval/{k}": (v if k == "num_masked_codes" else v / total) for k, v in totals.items()
          if k != "mask_fraction"}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after_steps: Optional[int] = None) -> dict[str, Any]:
  """Trains (or resumes) stage 2 in `workdir`.

  Args:
    config: a stage-2 config (configs/imagenet.py or configs/demo.py).
    workdir: checkpoints, TensorBoard logs and config.json go here; an existing checkpoint is resumed.
    stop_after_steps: behave as if preempted once this many steps are done in *this* call (save, return);
      for time-boxed jobs and tests.

  Returns:
    {'state': TrainState, 'step': last step, 'stopped': whether stopped before num_steps, 'train': last logged
     train metrics, 'eval': last eval metrics, 'history': [(step, loss)] at log steps, 'skipped_steps': int}.

  Raises:
    ConfigError: bad config / dataset mismatch / mesh or batch not fitting the devices (before compiling).
    FloatingPointError: non-finite loss with train.nonfinite='stop'.
  """
  # ---- validate everything before compiling
  validate_config(config)
  config = _absolute_paths(config)
  meta = codes_lib.read_metadata(config.data.codes_dir)
  check_dataset(config, meta)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config)
  global_batch = int(config.train.batch_size)
  sharding.check_batch_size(global_batch, mesh)
  sharding.check_batch_size(global_batch // int(config.train.grad_accum_steps), mesh,
                            "config.train.batch_size / grad_accum_steps")
  model = build_model(config)
  tx = make_optimizer(config)
  num_steps = int(config.train.num_steps)
  t = config.train

  os.makedirs(workdir, exist_ok=True)

  codebook = jax.device_put(codes_lib.load_codebook(config.data.codes_dir, meta).astype(np.float32),
                            sharding.replicated(mesh))
  train_iter = _code_iterator(config, config.data.train_split, global_batch // jax.process_count(), train=True)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=int(t.keep_checkpoints),
                                 save_interval_steps=int(t.ckpt_every))
  if ckpt.latest_step() is not None:
    check_resume_config(config, workdir)  # Before config.json is overwritten.
  runtime.save_config(config, workdir)
  writer, progress = runtime.writer_and_progress(workdir, num_steps)

  # ---- state: restored into its shardings, or initialised sharded
  abstract, state_shardings = abstract_train_state(model, tx, config, mesh, rules)
  state, restored_step = ckpt.restore(abstract, data_iterator=train_iter)
  if state is None:
    state, state_shardings = create_train_state(model, tx, config, mesh, rules)
    logging.info("Initialised a new stage-2 model in %s", workdir)
  else:
    logging.info("Resumed stage 2 from step %d in %s", restored_step, workdir)
  logging.info("Contextual RQ-Transformer: %s parameters; %.1f%% of them replicated on mesh %s",
               f"{transformer.count_params(state.params):,}",
               100 * sharding.fraction_replicated(state_shardings.params, state.params), dict(mesh.shape))
  if jax.process_index() == 0:
    parameter_overview.log_parameter_overview(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                           state.params), include_stats=False, max_lines=60)

  data_sharding = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)
  train_step = jax.jit(make_train_step(model, tx, config), donate_argnums=(0,),
                       in_shardings=(state_shardings, data_sharding, replicated),
                       out_shardings=(state_shardings, replicated))
  eval_step = jax.jit(make_eval_step(model), in_shardings=(state_shardings.params, data_sharding, replicated,
                                                           replicated), out_shardings=replicated)

  start_step = int(jax.device_get(state.step))
  result: dict[str, Any] = {"train": {}, "eval": {}, "history": [], "skipped_steps": 0, "stopped": False}
  pending: Optional[tuple[int, Any]] = None  # (step, finite flag) checked one step late to keep dispatch async.

  def check_finite(step: int, flag: Any) -> None:
    if bool(jax.device_get(flag)):
      return
    if t.nonfinite == "stop":
      ckpt.close()
      raise FloatingPointError(
          f"non-finite loss or gradient at step {step}; the update was not applied and training stopped "
          f"(train.nonfinite='stop'). Latest checkpoint: step {ckpt.latest_step()} in {ckpt.directory}.")
    result["skipped_steps"] += 1
    logging.warning("non-finite loss or gradient at step %d: update skipped (%d so far)", step,
                    result["skipped_steps"])

  step = start_step
  # Only the rules, not the mesh, are made ambient: under `jax.set_mesh` flax re-traces DenseGeneral's kernel init
  # during apply (its shape check) and constrains the flat kernel with the full-rank spec, which fails. Sharding of
  # activations then follows from the parameter and batch shardings (XLA propagation).
  with nn.logical_axis_rules(rules), checkpoint.PreemptionGuard() as guard:
    for step in range(start_step + 1, num_steps + 1):
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = sharding.host_local_batch_to_global(next(train_iter), mesh)
        state, metrics = train_step(state, batch, codebook)
      if pending is not None:
        check_finite(*pending)
      pending = (step, metrics["finite"])
      progress(step)
      if step % int(t.log_every) == 0 or step == num_steps:
        check_finite(*pending)
        pending = None
        scalars = {f"train/{k}": float(v) for k, v in jax.device_get(metrics).items()}
        writer.write_scalars(step, scalars)
        result["train"] = scalars
        result["history"].append((step, scalars["train/loss"]))
      if step % int(t.eval_every) == 0 or step == num_steps:
        params = state.ema_params if state.ema_params is not None else state.params
        with progress.timed("eval"):
          result["eval"] = evaluate(config, eval_step, params, codebook, mesh, meta)
        if result["eval"]:
          writer.write_scalars(step, result["eval"])
          logging.info("step %d eval: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in result["eval"].items()))
      stop = guard.stop_requested(step) or (stop_after_steps is not None and step - start_step >= stop_after_steps)
      if stop:
        if pending is not None:
          check_finite(*pending)
          pending = None
        ckpt.save(step, state, data_iterator=train_iter, force=True)
        logging.warning("Stopped at step %d (signal or stop_after_steps); checkpoint saved. Re-run the same "
                        "command to resume.", step)
        result["stopped"] = step < num_steps
        break
      if ckpt.should_save(step) or step == num_steps:
        if pending is not None:
          check_finite(*pending)  # Never checkpoint past an unchecked step.
          pending = None
        ckpt.save(step, state, data_iterator=train_iter, force=step == num_steps)
    if pending is not None:
      check_finite(*pending)
  ckpt.close()
  writer.flush()
  result.update(state=state, step=int(jax.device_get(state.step)))
  return result


# ------------------------------------------------------------------------------------------- main
FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags, defined only when run as a program (so modules import together)."""
  config_flags.DEFINE_config_file("config", None, "Stage-2 config file, e.g. configs/imagenet.py:821m.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs and config.json.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  runtime.setup_host()
  py_logging.getLogger("absl").setLevel(py_logging.INFO)
  start = time.time()
  result = train_and_evaluate(FLAGS.config, FLAGS.workdir)
  logging.info("Stage 2 %s at step %d after %.0f s.", "stopped" if result["stopped"] else "finished",
               result["step"], time.time() - start)


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
