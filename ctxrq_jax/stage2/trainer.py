"""Stage 2: trains Contextual RQ-Transformer on a code dataset (masked code-stack NLL, §3.2.3 eq. 10-11).

`train_and_evaluate(config, workdir)`; the command is ctxrq_jax/train.py:

  python -m ctxrq_jax.train --config=configs/imagenet.py:821m --workdir=DIR \
      --config.data.codes_dir=CODES --config.data.stage1_dir=RQVAE

Everything is validated before anything is compiled (config keys against ctxrq_jax/configs/imagenet.py, the
dataset's code shape / K / n_z / classes against the config, the mesh against the devices, the batch against the
data-parallel size). Parameters are born sharded: `jax.eval_shape` of the init gives the logical partitioning,
`config.sharding_rules` turns it into NamedShardings, and the init is jitted with those `out_shardings`. The train
step is jitted once with the state donated; a process keeps the jitted programs of its last few configs, so running
the same config again (a resumed time-boxed run) neither traces nor compiles.

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
    `train.nonfinite='skip'` training continues (skipped steps are counted and logged; as with optax's
    `apply_if_finite`, a skipped step does not advance the learning-rate schedule, and the logged rate is the one the
    update used); with 'stop' the loop raises
    FloatingPointError naming the step without saving, so the last good checkpoint stays the latest.

The loop is the shared one (ctxrq_jax/core/loop.py): checkpoints every `train.ckpt_every` steps and at the end hold
the whole TrainState and the data-iterator position; a run started in a workdir with checkpoints resumes.
SIGTERM/SIGINT saves the current step and returns cleanly; running the same command again continues.
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
import logging
from typing import Any, Callable, Iterator, NamedTuple, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ctxrq_jax.core import checkpoint
from ctxrq_jax.core import config as configlib
from ctxrq_jax.core import host
from ctxrq_jax.core import loop
from ctxrq_jax.core import optim
from ctxrq_jax.core import paths
from ctxrq_jax.core import reporting
from ctxrq_jax.core import sharding
from ctxrq_jax.core.config import ConfigError
from ctxrq_jax.data import code_captions
from ctxrq_jax.data import codes as codes_lib
from ctxrq_jax.data import tokenizer as tokenizer_lib
from ctxrq_jax.models import common
from ctxrq_jax.models import transformer
from ctxrq_jax.stage2 import masking

log = logging.getLogger(__name__)

Array = jax.Array


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
def is_text_config(config: ml_collections.ConfigDict) -> bool:
  """True for a text-to-image config (model.num_classes 0: the condition is a caption)."""
  return int(config.model.num_classes) == 0


def reference_config(config: Optional[ml_collections.ConfigDict] = None) -> ml_collections.ConfigDict:
  """The defaults a stage-2 config must match key for key: ctxrq_jax/configs/imagenet.py for class labels,
  ctxrq_jax/configs/cc3m.py (the same keys plus data.tokenizer_dir) when `config` conditions on captions."""
  if config is not None and "model" in config and "num_classes" in config.model and is_text_config(config):
    return configlib.load_config_file("cc3m", "tiny")
  return configlib.load_config_file("imagenet", "tiny")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the config's keys and values that would otherwise fail inside a compiled step (ConfigError)."""
  configlib.check_keys(config, reference_config(config))
  req = configlib.require
  t, o = config.train, config.optim
  req(int(t.batch_size) >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
  req(int(t.num_steps) >= 1, f"train.num_steps must be >= 1, got {t.num_steps}")
  req(int(t.grad_accum_steps) >= 1, f"train.grad_accum_steps must be >= 1, got {t.grad_accum_steps}")
  req(int(t.batch_size) % int(t.grad_accum_steps) == 0,
      f"train.batch_size {t.batch_size} is not divisible by train.grad_accum_steps {t.grad_accum_steps}")
  micro_batch = int(t.batch_size) // int(t.grad_accum_steps)
  req(int(t.mask_group) >= 1 and micro_batch % int(t.mask_group) == 0,
      f"train.mask_group must be >= 1 and divide train.batch_size / grad_accum_steps ({micro_batch}), "
      f"got {t.mask_group}")
  req(0.0 <= float(t.cond_drop_rate) <= 1.0, f"train.cond_drop_rate must be in [0, 1], got {t.cond_drop_rate}")
  req(0.0 <= float(t.label_smoothing) < 1.0, f"train.label_smoothing must be in [0, 1), got {t.label_smoothing}")
  req(0.0 <= float(t.ema_decay) < 1.0, f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
  req(t.nonfinite in ("stop", "skip"), f"train.nonfinite must be 'stop' or 'skip', got {t.nonfinite!r}")
  for key in ("steps_per_call", "log_every", "eval_every", "ckpt_every", "keep_checkpoints"):
    req(int(t[key]) >= 1, f"train.{key} must be >= 1, got {t[key]}")
  optim.validate(o)
  req(int(config.model.num_classes) >= 0, f"model.num_classes must be >= 0 (0 for captions), got "
      f"{config.model.num_classes}")
  if is_text_config(config):
    req(config.model.cond_vocab_size is not None and int(config.model.cond_vocab_size) >= 2,
        f"captions need model.cond_vocab_size (the tokenizer's vocabulary), got {config.model.cond_vocab_size}")
  else:
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
  if meta.is_text != is_text_config(config):
    raise ConfigError(f"{where} is conditioned on {'captions' if meta.is_text else 'class labels'}, but the config "
                      f"(model.num_classes {config.model.num_classes}) on "
                      f"{'captions' if is_text_config(config) else 'class labels'}")
  configlib.require(int(meta.num_classes) == int(config.model.num_classes),
                    f"{where} has {meta.num_classes} classes, but config.model.num_classes is "
                    f"{config.model.num_classes}")
  if meta.is_text:
    configlib.require(int(meta.cond_length) == int(config.model.cond_length),
                      f"{where} has captions of {meta.cond_length} tokens, but config.model.cond_length is "
                      f"{config.model.cond_length}")
    configlib.require(int(meta.cond_range) <= int(config.model.cond_vocab_size),
                      f"{where} has caption tokens in [0, {meta.cond_range}), more than config.model.cond_vocab_size "
                      f"{config.model.cond_vocab_size}")
  for split in (d.train_split, d.eval_split):
    if split not in meta.splits:
      raise ConfigError(f"{where} has no split {split!r} (config.data); it has {sorted(meta.splits)}")


# Keys that fix the shapes of the saved state: a resumed run must keep them.
_SHAPE_KEYS = tuple(f"model.{k}" for k in ("width", "num_heads", "spatial_layers", "depth_layers", "mlp_ratio",
                                           "num_classes", "cond_length", "cond_vocab_size")) + tuple(
                                               f"data.{k}" for k in ("code_shape", "vocab_size", "embed_dim"))


def check_resume_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises ConfigError when `workdir`'s saved config.json describes a different model or code shape."""
  if not (paths.path(workdir) / configlib.SNAPSHOT).exists():
    return
  saved = configlib.load_snapshot(workdir)
  diffs = configlib.changed_keys(saved, config, _SHAPE_KEYS)
  if diffs:
    raise ConfigError(f"{workdir} holds a stage-2 run of another shape ({'; '.join(diffs)}); resume it with its own "
                      f"config ({paths.path(workdir) / configlib.SNAPSHOT}) or train in a new --workdir")


def build_model(config: ml_collections.ConfigDict) -> transformer.ContextualRQTransformer:
  return transformer.from_run_config(config)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  return optim.make_optimizer(config.optim, int(config.train.num_steps))


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
  return _create_state(init, lambda: nn.meta.unbox(init()), mesh, rules)


def abstract_train_state(model, tx, config, mesh, rules) -> tuple[TrainState, Any]:
  """(ShapeDtypeStruct state with shardings, state_shardings) without allocating anything."""
  return _abstract_state(_init_fn(model, tx, int(config.seed), float(config.train.ema_decay) > 0), mesh, rules)


def _create_state(init: Callable[[], TrainState], init_unboxed: Callable[[], TrainState], mesh, rules,
                  shardings: Any = None) -> tuple[TrainState, Any]:
  """`init` (boxed) gives the shardings (unless given: `_abstract_state`'s), `init_unboxed` (the same state, unboxed)
  is jitted into them."""
  # No mesh context here: out_shardings place the outputs, and flax's init-time constraints on reshaped kernels
  # (DenseGeneral) would be applied to the wrong rank.
  if shardings is None:
    shardings = sharding.logical_to_shardings(jax.eval_shape(init), mesh, rules)
  state = jax.jit(init_unboxed, out_shardings=shardings)()
  return state, shardings


def _abstract_state(init: Callable[[], TrainState], mesh, rules) -> tuple[TrainState, Any]:
  abstract = jax.eval_shape(init)
  shardings = sharding.logical_to_shardings(abstract, mesh, rules)
  shapes = nn.meta.unbox(abstract)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings), shardings


def training_logits(model, params, codes, mask, cond, codebook, *, train=False, dropout_rng=None,
                    group=1) -> tuple[Array, Array, Array]:
  """The forward pass of eq. 11: (logits float32 [B', M, D, K], their targets int [B', M, D], scored bool [B', M]).

  `group` 1: every position, [B, N] (the loss reads the masked ones). `group` G > 1, for masks of
  `masking.sample_mask(..., group=G)`: the depth transformer and head run on each group's
  `masking.group_capacity(G, N)` masked-first slots (`masking.masked_first`), [B / G, C], with the same loss and
  gradients.
  """
  rngs = {"dropout": dropout_rng} if train else None
  if group == 1:
    return model.apply({"params": params}, codes, mask, cond, codebook, train=train, rngs=rngs), codes, mask
  index, scored = masking.masked_first(mask, group, masking.group_capacity(group, mask.shape[1]))  # [B / G, C]
  targets = masking.gather_groups(codes, index, group)  # [B / G, C, D]

  def forward(module, codes, mask, cond, codebook):
    h = module.spatial(codes, mask, cond, codebook, train=train)
    return module.depth(masking.gather_groups(h, index, group), targets, codebook, train=train)

  logits = model.apply({"params": params}, codes, mask, cond, codebook, method=forward, rngs=rngs)
  return logits, targets, scored


def _weighted_loss(model, params, codes, mask, cond, codebook, label_smoothing, dropout_rng, train, group=1):
  """Eq. 11 over `mask` (see `training_logits`), times the masked-code count."""
  logits, targets, scored = training_logits(model, params, codes, mask, cond, codebook, train=train,
                                            dropout_rng=dropout_rng, group=group)
  loss, metrics = masking.masked_nll(logits, targets, scored, label_smoothing)
  # Weighted by the masked-code count so micro-batch sums give the whole-batch eq. 11 mean.
  return loss * metrics["num_masked_codes"], metrics


def batch_condition(batch: Any) -> Array:
  """The condition tokens int32 [B, L] of a code batch: 'cond' [B, L] (captions), or 'label' [B] as [B, 1]."""
  if "cond" in batch:
    return batch["cond"].astype(jnp.int32)
  return batch["label"].astype(jnp.int32)[:, None]


def draw_mask(key: Array, batch: int, num_positions: int, group: int, accum: int) -> Array:
  """The training masks bool [B, N] of one step: `masking.sample_mask` with mask groups of `group` consecutive rows
  of each micro-batch (micro-batch a of `accum` is rows a, a + accum, ..., as the step splits the batch)."""
  mask = masking.sample_mask(key, batch, num_positions, group=group)
  if group == 1:  # independent rows: kept in the order drawn (the previous releases' masks, row for row)
    return mask
  return mask.reshape(accum, batch // accum, num_positions).swapaxes(0, 1).reshape(batch, num_positions)


def make_train_step(model: transformer.ContextualRQTransformer, tx: optax.GradientTransformation,
                    config: ml_collections.ConfigDict) -> Callable[[TrainState, Any, Array], tuple[TrainState, Any]]:
  """`step(state, batch, codebook [K,n_z]) -> (state, metrics)` (unjitted); batch {'codes' [B,h,w,D], and 'label' [B]
  (class labels) or 'cond' [B, L] (caption tokens)}. Condition dropout replaces a whole condition by the null one
  (the extra class id, or the empty caption)."""
  t = config.train
  accum = int(t.grad_accum_steps)
  drop_rate, smoothing = float(t.cond_drop_rate), float(t.label_smoothing)
  ema_decay = float(t.ema_decay)
  group = int(t.mask_group)
  null_id = model.null_cond_id

  def step_fn(state: TrainState, batch: Any, codebook: Array) -> tuple[TrainState, Any]:
    codes = batch["codes"]
    b = codes.shape[0]
    codes = codes.reshape(b, -1, codes.shape[-1]).astype(jnp.int32)  # [B, N, D]
    n = codes.shape[1]
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    mask_key, cond_key, dropout_key = jax.random.split(key, 3)
    mask = draw_mask(mask_key, b, n, group, accum)
    cond = masking.drop_condition(cond_key, batch_condition(batch), drop_rate, null_id)

    grad_fn = jax.value_and_grad(
        functools.partial(_weighted_loss, model, label_smoothing=smoothing, train=True, group=group), has_aux=True)

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
    keep = functools.partial(optim.keep_where, finite)
    new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                           opt_state=keep(opt_state, state.opt_state),
                           ema_params=None if ema is None else keep(ema, state.ema_params), rng=state.rng)
    metrics.update(grad_norm=grad_norm, param_norm=optax.global_norm(new_state.params),
                   # The rate this step's update used: skipped steps do not advance the optimizer's schedule.
                   learning_rate=optim.learning_rate_schedule(config.optim, int(config.train.num_steps))(
                       optim.applied_updates(state.opt_state)), finite=finite.astype(jnp.float32))
    return new_state, metrics

  return step_fn


def make_eval_step(model: transformer.ContextualRQTransformer) -> Callable[..., Any]:
  """`eval(params, batch, codebook, key) -> metrics sums` with fixed masks drawn from `key` (no dropout)."""

  def eval_fn(params: Any, batch: Any, codebook: Array, key: Array) -> Any:
    codes = batch["codes"]
    b = codes.shape[0]
    codes = codes.reshape(b, -1, codes.shape[-1]).astype(jnp.int32)
    mask = masking.sample_mask(key, b, codes.shape[1])
    cond = batch_condition(batch)
    wloss, metrics = _weighted_loss(model, params, codes, mask, cond, codebook, 0.0, None, False)
    w = metrics["num_masked_codes"]
    return {k: (v if k == "num_masked_codes" else v * w) for k, v in metrics.items()}

  return eval_fn


def _eval_key(seed: int, index: int) -> Array:
  """Fixed per-batch eval masks: the same key for batch i at every evaluation."""
  return jax.random.key_data(jax.random.fold_in(jax.random.key(seed ^ 0x5EED), index))


class _Programs(NamedTuple):
  """A config's model and optimizer, and the Python functions `train_and_evaluate` jits."""
  model: transformer.ContextualRQTransformer
  tx: optax.GradientTransformation
  init: Callable[[], TrainState]  # the state with logically boxed leaves (for its shardings)
  init_unboxed: Callable[[], TrainState]
  train_step: Callable[..., tuple[TrainState, Any]]
  train_steps: Callable[..., tuple[TrainState, Any]]  # `loop.scan_steps(train_step)`: stacked batches, one call
  eval_step: Callable[..., Any]


_PROGRAMS_KEPT = 4
_programs_cache: "collections.OrderedDict[tuple[str, str], _Programs]" = collections.OrderedDict()
# Config keys that only the loop and the data pipeline read: runs differing in them share their programs.
_LOOP_ONLY_KEYS = (("data", "codes_dir"), ("data", "stage1_dir"), ("train", "log_every"), ("train", "eval_every"),
                   ("train", "ckpt_every"), ("train", "keep_checkpoints"), ("train", "nonfinite"),
                   ("train", "steps_per_call"))


def _programs(config: ml_collections.ConfigDict) -> _Programs:
  """The `_Programs` of `config`, built once per process (those of the last `_PROGRAMS_KEPT` configs are kept).

  JAX caches traces, lowerings and executables per Python function: given the same functions, a second
  `train_and_evaluate` of a config in one process (a time-boxed run resumed in a loop or a notebook, a test's
  uninterrupted twin) dispatches the compiled programs at once instead of tracing, lowering and loading them again.
  Keyed by the config without `_LOOP_ONLY_KEYS`, and by the default PRNG implementation: the init and the step draw
  keys with it, and JAX's trace cache does not tell implementations apart. Neither does it see flax's logical axis
  rules: trace the steps under the config's rules, as `train_and_evaluate` does.
  """
  fields = config.to_dict()
  for section, name in _LOOP_ONLY_KEYS:
    fields.get(section, {}).pop(name, None)
  key = (json.dumps(fields, sort_keys=True, default=repr), str(jax.config.jax_default_prng_impl))
  if key in _programs_cache:
    _programs_cache.move_to_end(key)
    return _programs_cache[key]
  model, tx = build_model(config), make_optimizer(config)
  init = _init_fn(model, tx, int(config.seed), float(config.train.ema_decay) > 0)
  train_step = make_train_step(model, tx, config)
  programs = _Programs(model=model, tx=tx, init=init, init_unboxed=lambda: nn.meta.unbox(init()),
                       train_step=train_step, train_steps=loop.scan_steps(train_step),
                       eval_step=make_eval_step(model))
  _programs_cache[key] = programs
  while len(_programs_cache) > _PROGRAMS_KEPT:
    _programs_cache.popitem(last=False)
  return programs


# ------------------------------------------------------------------------------------------- loop
def _code_iterator(config, split: str, batch_size: int, train: bool) -> Iterator[Any]:
  """Training draws one stored view per example when `data.random_view`, and one stored tokenization of its caption
  when `data.random_caption` (text configs); evaluation always reads view 0 and tokenization 0."""
  return codes_lib.make_code_iterator(
      config.data.codes_dir, split=split, batch_size=batch_size, seed=int(config.seed), train=train,
      shard_index=jax.process_index(), shard_count=jax.process_count(), drop_remainder=True,
      random_view=train and bool(config.data.random_view),
      random_caption=train and bool(config.data.get("random_caption", False)))


def evaluate(config, eval_fn, params, codebook, mesh, meta: codes_lib.CodeMetadata) -> dict[str, float]:
  """Masked NLL over the eval split (whole global batches; fixed masks per batch index).

  The batches are the training micro-batch (train.batch_size / grad_accum_steps), the size a training step's forward
  pass runs at: with gradient accumulation set to fit memory, the eval (every position through the depth
  transformer, no backward) does not need the whole global batch's activations at once.
  """
  batch_size = int(config.train.batch_size) // int(config.train.grad_accum_steps)
  # Every host runs the same number of (collective) eval steps, although strided host shards differ by one example.
  num_batches = meta.num_examples(config.data.eval_split) // batch_size
  if not num_batches:  # (the iterator refuses a split smaller than one batch)
    log.warning("eval split %r has fewer than one global batch (%d); eval skipped", config.data.eval_split,
                batch_size)
    return {}
  it = _code_iterator(config, config.data.eval_split, batch_size // jax.process_count(), train=False)
  totals: dict[str, float] = {}
  for i, host_batch in enumerate(itertools.islice(it, num_batches)):
    batch = sharding.host_local_batch_to_global(host_batch, mesh)
    sums = jax.device_get(eval_fn(params, batch, codebook, _eval_key(int(config.seed), i)))
    for k, v in sums.items():
      totals[k] = totals.get(k, 0.0) + float(v)
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
  # Absolute in config.json, so that sampling the run works from any working directory (caption configs also name
  # the BPE files that the sampler tokenizes prompts with).
  config = configlib.absolute_paths(config, "data", ("codes_dir", "stage1_dir")
                                    + (("tokenizer_dir",) if "tokenizer_dir" in config.data else ()))
  if config.data.stage1_dir and not paths.path(config.data.stage1_dir).exists():
    raise ConfigError(f"config.data.stage1_dir {config.data.stage1_dir} does not exist (the RQ-VAE artifact that "
                      "decodes this run's samples)")
  meta = codes_lib.read_metadata(config.data.codes_dir)
  if config.data.random_view:
    log.info("Training on one of %d stored view(s) per example: %s", meta.num_views, ", ".join(meta.views))
  if config.data.get("random_caption", False) and config.data.train_split in meta.splits:
    log.info("Training on one of %d stored tokenization(s) per caption",
             meta.num_cond_variants(config.data.train_split))
  check_dataset(config, meta)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config)
  global_batch = int(config.train.batch_size)
  sharding.check_batch_size(global_batch, mesh)
  sharding.check_batch_size(global_batch // int(config.train.grad_accum_steps), mesh,
                            "config.train.batch_size / grad_accum_steps")
  programs = _programs(config)
  t = config.train
  paths.path(workdir).mkdir(parents=True, exist_ok=True)

  host_codebook = codes_lib.load_codebook(config.data.codes_dir, meta).astype(np.float32)
  codebook = jax.device_put(host_codebook, sharding.replicated(mesh))
  train_iter = _code_iterator(config, config.data.train_split, global_batch // jax.process_count(), train=True)
  ckpt = checkpoint.Checkpointer(paths.path(workdir) / "checkpoints", max_to_keep=int(t.keep_checkpoints),
                                 save_interval_steps=int(t.ckpt_every))
  abstract, state_shardings = _abstract_state(programs.init, mesh, rules)
  resuming = ckpt.latest_step() is not None
  if resuming:  # before config.json is overwritten
    check_resume_config(config, workdir)
    configlib.check_resumable(ckpt, abstract, workdir)
  known = resuming and codes_lib.check_trained_codebook(workdir, host_codebook, config.data.codes_dir)
  # The caption ids too: a tokenizer trained again (or another one) gives the same shapes and other ids.
  tokenizer_fingerprint = (meta.source.get(code_captions.FINGERPRINT_KEY)
                           if meta.is_text and isinstance(meta.source, dict) else None)
  known_tokenizer = bool(tokenizer_fingerprint) and resuming and tokenizer_lib.check_trained_tokenizer(
      workdir, tokenizer_fingerprint, config.data.codes_dir)
  if not known and host.is_chief():
    codes_lib.record_trained_codebook(workdir, host_codebook, config.data.codes_dir)
  if tokenizer_fingerprint and not known_tokenizer and host.is_chief():
    tokenizer_lib.record_trained_tokenizer(workdir, tokenizer_fingerprint, config.data.codes_dir)
  configlib.save_snapshot(config, workdir, write=host.is_chief(),
                          resumed_step=ckpt.latest_step() if resuming else None, name="stage 2")

  # ---- state: restored into its shardings, or initialised sharded
  state, restored_step = ckpt.restore(abstract, data_iterator=train_iter)
  if state is None:
    state, state_shardings = _create_state(programs.init, programs.init_unboxed, mesh, rules, state_shardings)
    log.info("Initialised a new stage-2 model in %s", workdir)
  else:
    log.info("Resumed stage 2 from step %d in %s", restored_step, workdir)
  log.info("Contextual RQ-Transformer: %s parameters; %.1f%% of them replicated on mesh %s",
               f"{common.count_params(state.params):,}",
               100 * sharding.fraction_replicated(state_shardings.params, state.params), dict(mesh.shape))

  data_sharding = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)
  train_step = jax.jit(programs.train_step, donate_argnums=(0,),
                       in_shardings=(state_shardings, data_sharding, replicated),
                       out_shardings=(state_shardings, replicated))
  eval_step = jax.jit(programs.eval_step, in_shardings=(state_shardings.params, data_sharding, replicated, replicated),
                      out_shardings=replicated)
  steps_per_call = None
  if int(t.steps_per_call) > 1:
    train_steps = jax.jit(programs.train_steps, donate_argnums=(0,),
                          in_shardings=(state_shardings, sharding.stacked_batch_sharding(mesh), replicated),
                          out_shardings=(state_shardings, replicated))
    steps_per_call = loop.StepsPerCall(
        int(t.steps_per_call), train_steps=lambda s, b: train_steps(s, b, codebook),
        next_batches=lambda n: sharding.host_local_batch_to_global(
            jax.tree.map(lambda *xs: np.stack(xs), *(next(train_iter) for _ in range(n))), mesh, stacked=True))

  def run_eval(step: int, state: TrainState) -> dict[str, float]:
    params = state.ema_params if state.ema_params is not None else state.params
    return evaluate(config, eval_step, params, codebook, mesh, meta)

  # Only the rules, not the mesh, are made ambient: under `jax.set_mesh` flax re-traces DenseGeneral's kernel init
  # during apply (its shape check) and constrains the flat kernel with the full-rank spec, which fails. Sharding of
  # activations then follows from the parameter and batch shardings (XLA propagation).
  with nn.logical_axis_rules(rules):
    result = loop.run(
        state, name="stage 2 (Contextual RQ-Transformer)",
        train_step=lambda s, b: train_step(s, b, codebook),
        next_batch=lambda: sharding.host_local_batch_to_global(next(train_iter), mesh), checkpointer=ckpt,
        data_iterator=train_iter, num_steps=int(t.num_steps), log_every=int(t.log_every),
        writer=reporting.metric_writer(workdir), periodic=[loop.Periodic("eval", int(t.eval_every), run_eval)],
        nonfinite=str(t.nonfinite), stop_after_steps=stop_after_steps, steps_per_call=steps_per_call)
  return {"state": result.state, "step": result.step, "stopped": result.stopped, "train": result.train,
          "eval": result.periodic.get("eval", {}), "history": result.history, "skipped_steps": result.skipped_steps}
