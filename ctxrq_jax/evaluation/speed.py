"""Speed: seconds per sample of Draft-and-Revise (the paper's Table 4 settings) and parameter counts.

The command is `python -m ctxrq_jax.bench sample --config=configs/imagenet.py:tiny --batch_size=100` (or `params`).

For each T_draft (default 8, 32, 64; T_revise 2, M 2) it times the jitted fori_loop sampler
(`decoder.draft_and_revise`) and the plain reference (`reference.reference_draft_and_revise`: a Python loop over steps,
spatial + depth passes over all N positions) on a model with random weights, and reports the model FLOPs per sample
each implies. Both draw the same random numbers and return the same codes; the table says whether they did.

FLOPs come from XLA's cost analysis of one spatial pass and one depth pass at the shapes each sampler uses
(loop-free programs, so the count is exact), multiplied by the number of passes: the whole decode is a while loop,
which the cost analysis would count once. Settings with T_draft > N are skipped (override the code shape, e.g.
`--config.data.code_shape='(8, 8, 4)'`).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ctxrq_jax.core import config as configlib
from ctxrq_jax.models import common
from ctxrq_jax.models import rqvae
from ctxrq_jax.models import transformer
from ctxrq_jax.sampling import decoder
from ctxrq_jax.sampling import logits
from ctxrq_jax.sampling import reference as reference_decoder


def _flops(fn: Callable[..., Any], *args: Any) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returns one dict per program
    cost = cost[0]
  return float(cost.get('flops', float('nan'))) if cost else float('nan')


def pass_flops(model: transformer.ContextualRQTransformer, variables: Any, codebook: jax.Array, batch: int,
               positions: int) -> tuple[float, float]:
  """(spatial pass FLOPs at batch `batch`, FLOPs of the D depth passes on `positions` positions per example)."""
  n, d, w = model.num_positions, model.code_depth, model.width
  codes = jnp.zeros((batch, n, d), jnp.int32)
  spatial = _flops(lambda v, c, m, y, e: model.apply(v, c, m, y, e, method=model.spatial), variables, codes,
                   jnp.zeros((batch, n), bool), jnp.zeros((batch, model.cond_length), jnp.int32), codebook)
  depth = sum(_flops(lambda v, h, c, e, at=at: model.apply(v, h, c, e, at=at, method=model.depth), variables,
                     jnp.zeros((batch, positions, w), jnp.float32), jnp.zeros((batch, positions, d), jnp.int32),
                     codebook) for at in range(d))
  return spatial, depth


def decode_flops(model: transformer.ContextualRQTransformer, variables: Any, codebook: jax.Array, *, batch: int,
                 t_draft: int, t_revise: int, num_revisions: int, draft: logits.PhaseSettings,
                 revise: logits.PhaseSettings, reference: bool) -> float:
  """Model FLOPs per sample of one Draft-and-Revise decode (fast sampler, or the reference when `reference`)."""
  n = model.num_positions
  total = 0.0
  for steps, settings, repeats in ((t_draft, draft, 1), (t_revise, revise, num_revisions)):
    if not repeats:
      continue
    rows = batch * (2 if settings.guidance_scale != 0 else 1)
    gathered = n if reference else -(-n // steps)
    spatial, depth = pass_flops(model, variables, codebook, rows, gathered)
    total += repeats * steps * (spatial + depth)  # one spatial pass and D depth passes per step
  return total / batch


def _time(fn: Callable[[int], jax.Array], repeats: int) -> float:
  jax.block_until_ready(fn(0))  # compile / warm up
  start = time.perf_counter()
  for i in range(repeats):
    jax.block_until_ready(fn(i + 1))
  return (time.perf_counter() - start) / repeats


def bench_sample(config: Any, *, batch: int, t_drafts: Sequence[int], t_revise: int, num_revisions: int,
                 repeats: int, reference: bool, seed: int) -> list[dict[str, Any]]:
  """Times the samplers for each T_draft; returns one row (dict) per setting."""
  model = transformer.from_run_config(config)
  key = jax.random.key(seed)
  codebook = jax.random.normal(jax.random.fold_in(key, 1), (config.data.vocab_size, config.data.embed_dim))
  variables = jax.jit(model.init)(jax.random.fold_in(key, 2), *transformer.init_inputs(model, 1)[:3], codebook)
  params = variables['params']
  draft = logits.PhaseSettings.from_config(config.sample.draft)
  revise = logits.PhaseSettings.from_config(config.sample.revise)
  cond = jax.random.randint(jax.random.fold_in(key, 3), (batch, model.cond_length), 0, model.num_classes)
  rows = []
  for t_draft in t_drafts:
    row: dict[str, Any] = {'t_draft': t_draft}
    if t_draft > model.num_positions or t_revise > model.num_positions:
      row['skipped'] = f'T > N={model.num_positions}'
      rows.append(row)
      continue
    kw = dict(t_draft=t_draft, t_revise=t_revise, num_revisions=num_revisions, draft=draft, revise=revise)
    fast = lambda i: decoder.draft_and_revise(  # noqa: E731
        model, params, codebook, cond, jax.random.fold_in(key, 10 + i), **kw)
    row['fast_s'] = _time(fast, repeats) / batch
    row['fast_flops'] = decode_flops(model, variables, codebook, batch=batch, reference=False, **kw)
    if reference:
      ref = lambda i: reference_decoder.reference_draft_and_revise(  # noqa: E731
          model, params, codebook, cond, jax.random.fold_in(key, 10 + i), **kw)
      row['ref_s'] = _time(ref, repeats) / batch
      row['ref_flops'] = decode_flops(model, variables, codebook, batch=batch, reference=True, **kw)
      row['same_codes'] = bool(np.array_equal(fast(0), ref(0)))
    rows.append(row)
  return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
  """Plain-text table of `bench_sample` rows."""
  head = (f"{'T_draft':>7}  {'s/sample':>10}  {'GFLOP/sample':>12}  {'ref s/sample':>12}  {'ref GFLOP':>10}  "
          f"{'speedup':>7}  {'same codes':>10}")
  lines = [head, '-' * len(head)]
  for r in rows:
    if 'skipped' in r:
      lines.append(f"{r['t_draft']:>7}  skipped ({r['skipped']})")
      continue
    ref_s, ref_f = r.get('ref_s', math.nan), r.get('ref_flops', math.nan)
    lines.append(f"{r['t_draft']:>7}  {r['fast_s']:>10.5f}  {r['fast_flops'] / 1e9:>12.4f}  {ref_s:>12.5f}  "
                 f"{ref_f / 1e9:>10.4f}  {ref_s / r['fast_s']:>7.2f}  {str(r.get('same_codes', '-')):>10}")
  return '\n'.join(lines)


def param_table() -> str:
  """Parameter counts of the paper's model sizes (configs/imagenet.py) and the ImageNet RQ-VAE, via eval_shape."""
  paper = {'333m': 333e6, '821m': 821e6, '1.4b': 1.4e9}  # Table 1 / the reference RQ-Transformer
  lines = [f"{'model':>14}  {'width':>5}  {'heads':>5}  {'layers':>7}  {'parameters':>15}  {'paper':>7}  {'diff':>6}",
           '-' * 72]
  for size in paper:
    c = configlib.load_config_file('imagenet', size)
    model = transformer.from_run_config(c)
    n = common.count_params(transformer.abstract_variables(model)['params'])
    lines.append(f"{'ctx-rq ' + size:>14}  {c.model.width:>5}  {c.model.num_heads:>5}  "
                 f"{c.model.spatial_layers:>3}/{c.model.depth_layers:<3}  {n:>15,}  {paper[size] / 1e6:>6.0f}M  "
                 f"{100 * (n / paper[size] - 1):>+5.2f}%")
  c = configlib.load_config_file('rqvae_imagenet')
  model = rqvae.RQVAE.from_config(c.model)
  v = jax.eval_shape(lambda: rqvae.init_variables(model, jax.random.key(0)))
  n = common.count_params(v['params']) + model.codebook_size * model.embed_dim + model.embed_dim  # + the padding row
  lines.append(f"{'rq-vae 8x8x4':>14}  {'':>5}  {'':>5}  {'':>7}  {n:>15,}  {'104.4':>6}M  "
               f"{100 * (n / 104_402_051 - 1):>+5.2f}%")
  return '\n'.join(lines)
