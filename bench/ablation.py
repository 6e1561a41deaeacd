"""Step-level ablation of the sampler's speed changes, all measured in one process (ratios, not absolute times).

  JAX_PLATFORMS=cpu python bench/ablation.py --config=configs/imagenet.py:bench512 --batch_size=32 --repeats=3

Times one UPDATE step (spatial pass over all N positions, gather, D depths on U positions, scatter) with each
variant of the depth sampling, at the step shapes of a decode: a draft step of T_draft 8 (U = N/8, no guidance), of
T_draft 64 (U = N/64) and a guided revise step of T_revise 2 (U = N/2, cond + uncond). Variants, cumulative:

  before      each depth d re-runs the depth transformer on the prefix 0..d (`depth(..., at=d)`), guidance on the two
              logit vectors (output head on both branches), Gumbel-max with K noise numbers per code (the sampler
              before the speed work)
  +kv cache   one cached token-pass per depth (`depth_step`)
  +guide z    guidance on the depth features: one head matmul per code instead of two
  +inv. cdf   inverse-CDF sampling from one uniform per code (the current sampler, `decoder.sample_depths`)

The spatial pass alone is timed too (the part no variant changes). Estimated s/sample of a whole decode
(T_revise 2, M 2, guidance in the revise phase) = (T_draft x draft step + 2 M x revise step) / batch.
Variants are interleaved, and each figure is the median of the repeats.
"""

import functools
import statistics
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', 'configs/imagenet.py:bench512', 'Stage-2 config.')
flags.DEFINE_integer('batch_size', 32, 'Batch.')
flags.DEFINE_integer('repeats', 3, 'Timed calls per (variant, step), interleaved.')
flags.DEFINE_list('variants', ['before', '+kv cache', '+guide z', '+inv. cdf'], 'Variants to time.')


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.benchmarks import speed  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.sampling import decoder  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.sampling import logits as L  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.sampling import partitions  # pylint: disable=g-import-not-at-top

  config = FLAGS.config
  model, variables, codebook = speed.random_model(config, 0)
  batch, n, depth = FLAGS.batch_size, model.num_positions, model.code_depth

  def depths(variables, codebook, h, positions, step_key, sampler, *, cache, guide_z, inverse_cdf):
    stacks = jnp.zeros(positions.shape + (depth,), jnp.int32)
    kv = None
    for d in range(depth):
      stacks_in = jnp.concatenate([stacks, stacks]) if sampler.guided else stacks
      if cache:
        z, kv = model.apply(variables, h, stacks_in, codebook, kv, at=d, method=model.depth_step)
        if sampler.guided and guide_z:
          logits = model.apply(variables, L.guide_logits(z[:batch], z[batch:], sampler.guidance_scale),
                               method=model.logits)
        else:
          logits = model.apply(variables, z, method=model.logits)
      else:
        logits = model.apply(variables, h, stacks_in, codebook, at=d, method=model.depth)
      if sampler.guided and not (cache and guide_z):
        logits = L.guide_logits(logits[:batch], logits[batch:], sampler.guidance_scale)
      if inverse_cdf:
        code, _ = L.sample_categorical(logits, L.sampling_uniforms(step_key, positions, d), sampler)
      else:
        code, _ = L.sample_logits(logits, L.gumbel_noise(step_key, positions, d, codebook.shape[0]), sampler)
      stacks = stacks.at[:, :, d].set(code)
    return stacks

  variants = {'before': dict(cache=False, guide_z=False, inverse_cdf=False),
              '+kv cache': dict(cache=True, guide_z=False, inverse_cdf=False),
              '+guide z': dict(cache=True, guide_z=True, inverse_cdf=False),
              '+inv. cdf': dict(cache=True, guide_z=True, inverse_cdf=True)}

  def update_step(variables, codebook, codes, known, cond, chosen, key, sampler, *, updates, opts):
    """decoder._update_step with the depth sampling of one variant."""
    mask = chosen | ~known
    idx = jnp.argsort(~chosen, axis=1, stable=True)[:, :updates].astype(jnp.int32)
    valid = jnp.take_along_axis(chosen, idx, axis=1)
    c, m, y, pos = codes, mask, cond, idx
    if sampler.guided:
      c, m, pos = (jnp.concatenate([x, x]) for x in (codes, mask, idx))
      y = jnp.concatenate([cond, decoder.null_cond(model, cond)])
    h = model.apply(variables, c, m, y, codebook, method=model.spatial)
    h = jnp.take_along_axis(h, pos[..., None], axis=1)
    stacks = depths(variables, codebook, h, idx, key, sampler, **opts)
    rows = jnp.arange(batch)[:, None]
    new = jnp.where(valid[..., None], stacks, codes[rows, idx])
    return codes.at[rows, idx].set(new), known | chosen

  key = jax.random.key(1, impl='threefry2x32')
  codes = jax.random.randint(key, (batch, n, depth), 0, model.vocab_size)
  cond = jax.random.randint(key, (batch, 1), 0, model.num_classes)
  draft = L.PhaseSettings.from_config(config.sample.draft).sampler()
  revise = L.PhaseSettings.from_config(config.sample.revise).sampler()
  steps = {}
  for name, t, sampler, known in (('draft T=8', 8, draft, False), ('draft T=64', 64, draft, False),
                                  ('revise T=2', 2, revise, True)):
    if t > n:
      continue
    part = partitions.random_partitions(jax.random.key(2), batch, n, t)
    known_map = jnp.full((batch, n), known) if known else part < t // 2  # a draft step half way through
    chosen = part == (t // 2 if not known else 0)
    steps[name] = (t, sampler, known_map, chosen, -(-n // t))

  fns = {}
  for variant in FLAGS.variants:
    for name, (t, sampler, known_map, chosen, updates) in steps.items():
      fn = jax.jit(functools.partial(update_step, updates=updates, opts=variants[variant]))
      fns[variant, name] = functools.partial(fn, variables, codebook, codes, known_map, cond, chosen, key, sampler)
  spatial = jax.jit(lambda v, e, c, m, y: model.apply(v, c, m, y, e, method=model.spatial))
  spatial_args = {name: (jnp.concatenate([codes, codes]) if s.guided else codes,
                         jnp.concatenate([~k | c, ~k | c]) if s.guided else ~k | c,
                         jnp.concatenate([cond, cond]) if s.guided else cond)
                  for name, (_, s, k, c, _) in steps.items()}
  print(f'compiling {len(fns)} step programs ...', file=sys.stderr, flush=True)
  for fn in fns.values():
    jax.block_until_ready(fn())
  for name, args in spatial_args.items():
    jax.block_until_ready(spatial(variables, codebook, *args))
  times = {k: [] for k in list(fns) + [('spatial only', name) for name in steps]}
  probes = []
  for _ in range(FLAGS.repeats):
    probes.append(speed.model_probe(model, batch, repeats=2))
    for k, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[k].append(time.perf_counter() - start)
    for name, args in spatial_args.items():
      start = time.perf_counter()
      jax.block_until_ready(spatial(variables, codebook, *args))
      times['spatial only', name].append(time.perf_counter() - start)
  med = {k: statistics.median(v) for k, v in times.items()}
  names = list(steps)
  print(f'UPDATE step seconds (median of {FLAGS.repeats}), batch {batch}, width {model.width}, '
        f'{model.spatial_layers}/{model.depth_layers} layers, K {model.vocab_size}, N {n}, D {depth}; '
        f'probe {max(probes) / 1e9:.1f} GFLOP/s')
  head = f"{'variant':>14}  " + '  '.join(f'{nm:>11}' for nm in names) + '  ' + '  '.join(
      f'{"s/sample T" + str(t):>13}' for t in (8, 64) if f'draft T={t}' in steps) + '  vs before'
  print(head)
  print('-' * len(head))
  base = None
  for variant in FLAGS.variants + ['spatial only']:
    per = [med[variant, nm] for nm in names]
    est = [(t * med[variant, f'draft T={t}'] + 4 * med[variant, 'revise T=2']) / batch
           for t in (8, 64) if f'draft T={t}' in steps]
    if variant == 'before':
      base = est
    ratio = ' '.join(f'{b / e:5.2f}x' for b, e in zip(base, est)) if base else ''
    print(f'{variant:>14}  ' + '  '.join(f'{x:>11.4f}' for x in per) + '  ' + '  '.join(
        f'{e:>13.4f}' for e in est) + f'  {ratio}')


if __name__ == '__main__':
  app.run(main)
