"""Stage-1 training step: what each loss term of the RQ-VAE recipe costs (`python -m ctxrq_jax.bench stage1`).

The step (`stage1.trainer.Stage1Trainer.train_step`: forward, backward, Adam, codebook EMA, and the discriminator's
update when the GAN term is on) is compiled for the config's recipe and for the recipe with its terms removed one at
a time: reconstruction + commitment only, then + LPIPS, then + the adaptive-weighted GAN term (the variants the
config enables). Each row gives XLA's FLOP count of the compiled step and its time on random images (fastest of
`repeats` steps after a warm-up, the state donated as in training), so the cost of a term is the difference
between two rows of one run. Weights are random; LPIPS uses the shipped VGG16 weights. The step is compiled as the
trainer compiles it (`Stage1Trainer.jit_train_step`: on a CPU, the config's `train.cpu_ynn_fusions`).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from ctxrq_jax.benchmarks import speed
from ctxrq_jax.stage1 import trainer as stage1_trainer


def recipe_variants(config: Any) -> list[tuple[str, Any]]:
  """(name, config) for the recipe's cumulative loss terms: 'recon', '+ LPIPS' (if on), '+ GAN' (if on)."""
  names = ['recon']
  if bool(config.loss.perceptual):
    names.append('+ LPIPS')
  if bool(config.loss.gan):
    names.append('+ GAN')
  out = []
  for i, name in enumerate(names):
    variant = config.copy_and_resolve_references()
    with variant.unlocked():
      variant.loss.perceptual = '+ LPIPS' in names[:i + 1]
      variant.loss.gan = '+ GAN' in names[:i + 1]
      variant.loss.disc_start = 0  # the GAN term's cost, not a step before it switches on
    out.append((name, variant))
  return out


def _compile(config: Any, batch: int) -> tuple[Any, Any, Any]:
  """(the step compiled for `batch` random images, its trainer, the images' shape) on the default device."""
  trainer = stage1_trainer.Stage1Trainer(config)
  res, channels = int(config.model.resolution), int(config.model.in_channels)
  abstract_state = jax.eval_shape(trainer.init, jax.random.key(0))
  images = jax.ShapeDtypeStruct((batch, res, res, channels), jnp.float32)
  step = trainer.jit_train_step()
  compiled = step.lower(abstract_state, {'image': images}, trainer.lpips_variables).compile()
  return compiled, trainer, images


def bench_stage1(config: Any, *, batch: int, repeats: int, seed: int) -> list[dict[str, Any]]:
  """One row per `recipe_variants` entry: name, batch, flops (XLA, per step), step_s (fastest of `repeats`)."""
  rows = []
  variants = recipe_variants(config)
  key = jax.random.key(seed)
  # One initialisation (of the full recipe, on the host) for every variant: a variant without the GAN term holds the
  # same RQ-VAE and optimizer state, without the discriminator's.
  full_state = jax.device_get(jax.jit(stage1_trainer.Stage1Trainer(variants[-1][1]).init)(key))
  for name, variant in variants:
    compiled, trainer, images = _compile(variant, batch)
    state = full_state if trainer.use_gan else full_state.replace(disc_params={}, disc_opt_state={})
    state = jax.device_put(state)
    batches = [{'image': jax.random.uniform(jax.random.fold_in(key, i), images.shape, minval=-1.0, maxval=1.0)}
               for i in range(repeats + 1)]
    state, metrics, step_s = speed.time_donated_steps(compiled, state, batches, trainer.lpips_variables)
    rows.append({'name': name, 'batch': batch, 'flops': speed.compiled_flops(compiled), 'step_s': step_s,
                 'loss': float(metrics['loss'])})
    del state, batches
  return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
  """Plain-text table of `bench_stage1` rows; each term's cost is the row minus the one above it."""
  head = (f"{'loss terms':>10}  {'batch':>5}  {'GFLOP/step':>10}  {'+GFLOP':>8}  {'s/step':>8}  {'+s':>7}  "
          f"{'images/s':>8}  {'GFLOP/s':>8}")
  lines = [head, '-' * len(head)]
  previous = None
  for r in rows:
    extra_flops = f"{(r['flops'] - previous['flops']) / 1e9:>8.1f}" if previous else f"{'-':>8}"
    extra_s = f"{r['step_s'] - previous['step_s']:>7.3f}" if previous else f"{'-':>7}"
    lines.append(f"{r['name']:>10}  {r['batch']:>5}  {r['flops'] / 1e9:>10.1f}  {extra_flops}  {r['step_s']:>8.3f}  "
                 f"{extra_s}  {r['batch'] / r['step_s']:>8.2f}  {r['flops'] / r['step_s'] / 1e9:>8.1f}")
    previous = r
  if len(rows) > 1:
    lines.append(f"full recipe / recon only: {rows[-1]['step_s'] / rows[0]['step_s']:.2f}x the time, "
                 f"{rows[-1]['flops'] / rows[0]['flops']:.2f}x the FLOPs")
  return '\n'.join(lines)
