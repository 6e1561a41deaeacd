"""Speed: seconds per sample of Draft-and-Revise (the paper's Table 4 settings), the stage-2 training step, FLOP rates
against a matmul probe, and parameter counts.

Commands (ctxrq_jax/bench.py):

  python -m ctxrq_jax.bench sample --config=configs/imagenet.py:bench512 --batch_size=32
  python -m ctxrq_jax.bench train --config=configs/imagenet.py:bench512 --batch_size=32
  python -m ctxrq_jax.bench sample --config=configs/cc3m.py:333m --batch_size=8 --t_draft=64 --noreference
  python -m ctxrq_jax.bench device            (bench/device.sh: the accelerator checks)
  python -m ctxrq_jax.bench params

`bench_sample`: for each T_draft (T_revise, M from flags) it times the jitted fori_loop sampler
(`decoder.draft_and_revise`) and, optionally, the plain reference (`reference.reference_draft_and_revise`: a Python
loop over steps, spatial pass and depth steps over all N positions) on a model with random weights, and reports the
model FLOPs per sample each implies. Both draw the same random numbers and return the same codes; the table says
whether they did. With `official_src` (a checkout of kakaobrain/rq-vae-transformer) it also times the official
PyTorch RQ-Transformer sampler (causal, KV cache) at the same dims in the same run (`official.py`).

FLOPs come from XLA's cost analysis of the lowered programs (lowered for the host CPU whatever the device, nothing
compiled for it) of one spatial pass and of the D cached depth steps plus output heads at the shapes each sampler
uses (loop-free programs, so the count is exact), multiplied by the number of passes: the whole decode is a while
loop, which the cost analysis would count once. Sampling arithmetic (softmax, CDF) is not counted.

Rates. `model_probe` times jitted [M, K] x [K, N] matmuls at the model's shapes (the spatial MLP's two and the output
head's) in the same run and keeps the best: "probe" is what this machine's matmul reaches, "floor" = model FLOPs / probe
rate is the time the sampler would take if every FLOP ran at the probe's rate, and MFU = model FLOPs / time / probe
rate (on GPU/TPU also against the device's peak when `device_peak_flops` knows it).

Settings with T_draft > N are skipped (override the code shape, e.g. `--config.data.code_shape='(8, 8, 4)'`).
"""

from __future__ import annotations

import math
import threading
import time
import traceback
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ctxrq_jax.core import config as configlib
from ctxrq_jax.core import loop
from ctxrq_jax.models import common
from ctxrq_jax.models import rqvae
from ctxrq_jax.models import transformer
from ctxrq_jax.sampling import decoder
from ctxrq_jax.sampling import logits
from ctxrq_jax.sampling import reference as reference_decoder

def _host_device() -> Any:
  """The host CPU device, where XLA's cost analysis of a lowered program works on every JAX install (on a GPU, whose
  PJRT plugin does not offer it, the count would need a compile); None if JAX_PLATFORMS leaves the CPU out."""
  try:
    return jax.devices('cpu')[0]
  except RuntimeError:
    return None


def _flops(fn: Callable[..., Any], *args: Any) -> float:
  """XLA's FLOP count of `fn` at the shapes of `args`, from the lowered program (before XLA's optimisations), nan if
  the backend cannot count it. Nothing is compiled or allocated.

  The program is lowered for the host CPU (abstract arguments placed there) whatever backend runs the benchmark: the
  count is the same program's, and CPU, GPU and TPU figures are then counted the same way. (A compiled program's
  count is not used: on a GPU it scores each matmul that XLA hands to cuBLAS as -1 FLOP.)
  """
  host = _host_device()
  place = jax.sharding.SingleDeviceSharding(host) if host is not None else None
  specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=place), args)
  try:
    cost = jax.jit(fn).lower(*specs).cost_analysis()
  except Exception:  # pylint: disable=broad-except - a backend without cost analysis: no count
    cost = None
  return _cost_flops(cost)


def _cost_flops(cost: Any) -> float:
  """The 'flops' of a cost analysis (a dict, or a list of one per program in older JAX); nan when missing or not
  positive (XLA's GPU count of a program made of library calls)."""
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = float(cost.get('flops', math.nan)) if cost else math.nan
  return flops if flops > 0 else math.nan


def compiled_flops(compiled: Any) -> float:
  """XLA's FLOP count of a compiled program (after XLA's optimisations, dead code removed); nan if unknown, and on a
  GPU, where the count leaves out every matmul and convolution XLA hands to cuBLAS / cuDNN (scored -1 each)."""
  if jax.default_backend() == 'gpu':
    return math.nan
  return _cost_flops(compiled.cost_analysis())


def time_donated_steps(step: Callable[..., tuple[Any, Any]], state: Any, batches: Sequence[Any],
                       *args: Any) -> tuple[Any, Any, float]:
  """`state, metrics = step(state, batch, *args)` over `batches` (the state donated, as in training): the first a
  warm-up, then the seconds of the fastest of the others. Returns (state, last metrics, seconds)."""
  state, metrics = step(state, batches[0], *args)
  jax.block_until_ready(metrics)
  best = math.inf
  for b in batches[1:]:
    start = time.perf_counter()
    state, metrics = step(state, b, *args)
    jax.block_until_ready((state, metrics))
    best = min(best, time.perf_counter() - start)
  return state, metrics, best


def _time(fn: Callable[[int], Any], repeats: int) -> float:
  """Seconds of the fastest of `repeats` calls after a warm-up call (the least disturbed by other jobs)."""
  jax.block_until_ready(fn(0))  # compile / warm up
  best = math.inf
  for i in range(max(1, repeats)):
    start = time.perf_counter()
    jax.block_until_ready(fn(i + 1))
    best = min(best, time.perf_counter() - start)
  return best


def matmul_probe(m: int, k: int, n: int, *, repeats: int = 5, dtype: Any = jnp.float32) -> float:
  """FLOP/s of a jitted [m, k] x [k, n] matmul in `dtype` (float32 accumulation), best of `repeats` timed calls."""
  a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32).astype(dtype)
  fn = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  jax.block_until_ready(fn(a, b))
  best = math.inf
  for _ in range(max(1, repeats)):
    start = time.perf_counter()
    jax.block_until_ready(fn(a, b))
    best = min(best, time.perf_counter() - start)
  return 2.0 * m * k * n / best


def model_probe(model: transformer.ContextualRQTransformer, batch: int, *, repeats: int = 5) -> float:
  """The best `matmul_probe` rate over the model's three main matmul shapes, in the model's dtype: the spatial MLP's
  [T, W] x [W, rW] and [T, rW] x [rW, W] (T = batch * (N + L) tokens, r = mlp_ratio) and the output head's
  [batch * N, W] x [W, K]. A single shape under-reports what the CPU's matmul reaches on the others."""
  tokens = batch * (model.num_positions + model.cond_length)
  w, hidden = model.width, model.mlp_ratio * model.width
  shapes = ((tokens, w, hidden), (tokens, hidden, w), (batch * model.num_positions, w, model.vocab_size))
  return max(matmul_probe(m, k, n, repeats=repeats, dtype=model.dtype) for m, k, n in shapes)


# Dense peak FLOP/s of known accelerators in bf16 (vendor figures), by `device_kind` prefix.
PEAK_BF16_FLOPS = {
    'NVIDIA H200': 989e12, 'NVIDIA H100': 989e12, 'NVIDIA A100': 312e12, 'NVIDIA L4': 121e12,
    'NVIDIA A10G': 125e12, 'NVIDIA GH200': 989e12, 'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12,
    'TPU v5p': 459e12, 'TPU v5': 459e12, 'TPU v6 lite': 918e12, 'TPU v6e': 918e12,
}


def device_peak_flops(device: Any = None) -> Optional[float]:
  """The dense bf16 peak FLOP/s of `device` (default: the first device) if known, else None (e.g. CPUs)."""
  kind = str(getattr(device or jax.devices()[0], 'device_kind', ''))
  for prefix in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
    if kind.startswith(prefix):
      return PEAK_BF16_FLOPS[prefix]
  return None


def pass_flops(model: transformer.ContextualRQTransformer, variables: Any, codebook: jax.Array, batch: int,
               positions: int, guided: bool = False) -> tuple[float, float]:
  """(spatial pass FLOPs, FLOPs of the D cached depth steps and output heads on `positions` positions per example).

  With `guided` both run on 2 * batch rows (cond and uncond) and the guided depth features go through the head once
  (what `decoder.sample_depths` does).
  """
  n, d, w = model.num_positions, model.code_depth, model.width
  rows = 2 * batch if guided else batch
  codes = jnp.zeros((rows, n, d), jnp.int32)
  spatial = _flops(lambda v, c, m, y, e: model.apply(v, c, m, y, e, method=model.spatial), variables, codes,
                   jnp.zeros((rows, n), bool), jnp.zeros((rows, model.cond_length), jnp.int32), codebook)

  def depth_steps(v, h, c, e):
    cache, out = None, []
    for at in range(d):
      z, cache = model.apply(v, h, c, e, cache, at=at, method=model.depth_step)
      if guided:
        z = logits.guide_logits(z[:batch], z[batch:], 1.5)
      out.append(model.apply(v, z, method=model.logits))
    return out

  depth = _flops(depth_steps, variables, jnp.zeros((rows, positions, w), model.dtype),
                 jnp.zeros((rows, positions, d), jnp.int32), codebook)
  return spatial, depth


def decode_flops(model: transformer.ContextualRQTransformer, variables: Any, codebook: jax.Array, *, batch: int,
                 t_draft: int, t_revise: int, num_revisions: int, draft: logits.PhaseSettings,
                 revise: logits.PhaseSettings, reference: bool, memo: Optional[dict[Any, Any]] = None) -> float:
  """Model FLOPs per sample of one Draft-and-Revise decode (fast sampler, or the reference when `reference`).

  `memo` keeps `pass_flops` results by shape across calls on the same model (each count is a compile).
  """
  memo = {} if memo is None else memo
  n = model.num_positions
  total = 0.0
  for steps, settings, repeats in ((t_draft, draft, 1), (t_revise, revise, num_revisions)):
    if not repeats:
      continue
    gathered = n if reference else -(-n // steps)
    shape = (batch, gathered, settings.guidance_scale != 0)
    if shape not in memo:
      memo[shape] = pass_flops(model, variables, codebook, *shape)
    spatial, depth = memo[shape]
    total += repeats * steps * (spatial + depth)  # one spatial pass and D depth steps per step
  return total / batch


def autoregressive_flops(model: transformer.ContextualRQTransformer, variables: Any, codebook: jax.Array, *,
                         batch: int) -> float:
  """Model FLOPs per sample of an autoregressive RQ-Transformer of the same dims with KV caches: every position
  through the spatial stack once and through the D depth steps once (the attention scores of a causal pass, half
  of the bidirectional ones, are counted in full: they are ~2% of the total at these shapes)."""
  spatial, depth = pass_flops(model, variables, codebook, batch, model.num_positions)
  return (spatial + depth) / batch


def random_model(config: Any, seed: int) -> tuple[transformer.ContextualRQTransformer, Any, jax.Array]:
  """(model, variables, codebook) of a stage-2 config with random weights and a random N(0, 1) codebook."""
  model = transformer.from_run_config(config)
  key = jax.random.key(seed)
  codebook = jax.random.normal(jax.random.fold_in(key, 1), (config.data.vocab_size, config.data.embed_dim))
  variables = jax.jit(model.init)(jax.random.fold_in(key, 2), *transformer.init_inputs(model, 1)[:3], codebook)
  return model, variables, codebook


def random_conditions(model: transformer.ContextualRQTransformer, key: jax.Array, batch: int) -> jax.Array:
  """int32 [batch, L] random conditions: class ids in [0, num_classes) (L = 1), or for a text-to-image model L caption
  tokens drawn from its text vocabulary [0, cond_vocab_size) (e.g. 32 of 16,384 for configs/cc3m.py)."""
  high = model.cond_vocab if model.is_text else model.num_classes
  return jax.random.randint(key, (batch, model.cond_length), 0, high, jnp.int32)


def training_conditions(model: transformer.ContextualRQTransformer, key: jax.Array, batch: int) -> dict[str, jax.Array]:
  """The condition of a random training batch as the code iterator yields it: {'cond': int32 [B, L]} (captions) or
  {'label': int32 [B]} (class labels)."""
  cond = random_conditions(model, key, batch)
  return {'cond': cond} if model.is_text else {'label': cond[:, 0]}


def bench_sample(config: Any, *, batch: int, t_drafts: Sequence[int], t_revise: int, num_revisions: int,
                 repeats: int, reference: bool, seed: int, probe: bool = True,
                 official_src: Optional[str] = None, official_repeats: int = 1,
                 log: Callable[[str], None] = lambda _: None,
                 flops_memo: Optional[dict[Any, Any]] = None,
                 parts: Optional[tuple[Any, Any, jax.Array]] = None) -> list[dict[str, Any]]:
  """Times the samplers for each T_draft; returns one row (dict) per setting.

  Every time is the fastest of `repeats` calls after a warm-up (this machine may be shared).
  Row keys: t_draft; fast_s (s/sample), fast_flops (model FLOPs/sample); with `reference` ref_s, ref_flops,
  same_codes; with `probe` probe_flops (FLOP/s of `model_probe`, the best of one measurement before and one after
  the timings); with `official_src` official_s (s/sample of the official PyTorch sampler, the fastest of one
  measurement before and one after ours) and official_flops (`autoregressive_flops`); 'skipped' when T > N.
  `flops_memo` (see `decode_flops`) may be shared by calls on the same config, and `parts` = `random_model(config,
  seed)` built once (an 821M model takes a while to initialise).
  """
  flops_memo = {} if flops_memo is None else flops_memo
  model, variables, codebook = parts if parts is not None else random_model(config, seed)
  params = variables['params']
  key = jax.random.key(seed)
  draft = logits.PhaseSettings.from_config(config.sample.draft)
  revise = logits.PhaseSettings.from_config(config.sample.revise)
  cond = random_conditions(model, jax.random.fold_in(key, 3), batch)
  probes = [model_probe(model, batch)] if probe else []
  extra: dict[str, Any] = {}
  if official_src:
    from ctxrq_jax.benchmarks import official  # pylint: disable=g-import-not-at-top
    log(f'timing the official RQ-Transformer sampler ({official_src})')
    official_times = [official.time_sampler(official_src, config, batch=batch, repeats=official_repeats, seed=seed)]
    extra['official_flops'] = autoregressive_flops(model, variables, codebook, batch=batch)
  rows = []
  for t_draft in t_drafts:
    row: dict[str, Any] = {'t_draft': t_draft}
    if t_draft > model.num_positions or t_revise > model.num_positions:
      row['skipped'] = f'T > N={model.num_positions}'
      rows.append(row)
      continue
    log(f'T_draft={t_draft}')
    kw = dict(t_draft=t_draft, t_revise=t_revise, num_revisions=num_revisions, draft=draft, revise=revise)
    fast = lambda i: decoder.draft_and_revise(  # noqa: E731
        model, params, codebook, cond, jax.random.fold_in(key, 10 + i), **kw)
    row['fast_s'] = _time(fast, repeats) / batch
    row['fast_flops'] = decode_flops(model, variables, codebook, batch=batch, reference=False, memo=flops_memo, **kw)
    if reference:
      ref = lambda i: reference_decoder.reference_draft_and_revise(  # noqa: E731
          model, params, codebook, cond, jax.random.fold_in(key, 10 + i), **kw)
      row['ref_s'] = _time(ref, repeats) / batch
      row['ref_flops'] = decode_flops(model, variables, codebook, batch=batch, reference=True,
                                      memo=flops_memo, **kw)
      row['same_codes'] = bool(np.array_equal(fast(0), ref(0)))
    row.update(extra)
    rows.append(row)
  if official_src:  # once more after our timings: the fastest of the two, as for every other figure
    official_times.append(official.time_sampler(official_src, config, batch=batch, repeats=official_repeats,
                                                seed=seed))
    for row in rows:
      if 'skipped' not in row:
        row['official_s'] = min(official_times) / batch
  if probe:
    probes.append(model_probe(model, batch))
    for row in rows:
      if 'skipped' not in row:
        row['probe_flops'] = max(probes)
  return rows


def _cell(value: float, width: int, digits: int) -> str:
  """`value` right-aligned in `width` with `digits` decimals; 'n/a' when it is not finite (a FLOP count the backend
  could not give)."""
  return f'{value:>{width}.{digits}f}' if math.isfinite(value) else f"{'n/a':>{width}}"


def _percent(value: float, width: int) -> str:
  """`value` as 'x.y%' right-aligned in `width`, or 'n/a'."""
  return f'{value:>{width - 1}.1f}%' if math.isfinite(value) else f"{'n/a':>{width}}"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
  """Plain-text table of `bench_sample` rows (columns whose data was not measured are left out)."""
  has = lambda k: any(k in r for r in rows)  # noqa: E731
  cols = [('T_draft', 7, lambda r: f"{r['t_draft']:>7}"),
          ('s/sample', 9, lambda r: f"{r['fast_s']:>9.4f}"),
          ('GFLOP/sample', 12, lambda r: _cell(r['fast_flops'] / 1e9, 12, 2)),
          ('GFLOP/s', 7, lambda r: _cell(r['fast_flops'] / r['fast_s'] / 1e9, 7, 1))]
  if has('decode_s'):
    cols += [('+ decode s', 10, lambda r: f"{r['decode_s']:>10.4f}"),
             ('total s', 8, lambda r: f"{r['fast_s'] + r['decode_s']:>8.4f}")]
  if has('probe_flops'):
    cols += [('% probe', 7, lambda r: _cell(100 * r['fast_flops'] / r['fast_s'] / r['probe_flops'], 7, 1)),
             ('floor s', 8, lambda r: _cell(r['fast_flops'] / r['probe_flops'], 8, 4)),
             ('/ floor', 7, lambda r: _cell(r['fast_s'] * r['probe_flops'] / r['fast_flops'], 7, 2))]
  if has('ref_s'):
    cols += [('ref s/sample', 12, lambda r: f"{r['ref_s']:>12.4f}"),
             ('ref GFLOP', 9, lambda r: _cell(r['ref_flops'] / 1e9, 9, 2)),
             ('vs ref', 6, lambda r: f"{r['ref_s'] / r['fast_s']:>6.2f}"),
             ('same codes', 10, lambda r: f"{str(r['same_codes']):>10}")]
  if has('official_s'):
    cols += [('official s', 10, lambda r: f"{r['official_s']:>10.4f}"),
             ('off. GFLOP', 10, lambda r: _cell(r['official_flops'] / 1e9, 10, 2)),
             ('vs official', 11, lambda r: f"{r['official_s'] / r['fast_s']:>11.2f}")]
  head = '  '.join(f'{name:>{width}}' for name, width, _ in cols)
  lines = [head, '-' * len(head)]
  for r in rows:
    if 'skipped' in r:
      lines.append(f"{r['t_draft']:>7}  skipped ({r['skipped']})")
    else:
      lines.append('  '.join(fmt(r) for _, _, fmt in cols))
  if has('probe_flops'):
    probe = max(r['probe_flops'] for r in rows if 'probe_flops' in r)
    lines.append(f'matmul probe (same run, best of the model MLP and head shapes): {probe / 1e9:.1f} GFLOP/s; '
                 'floor s = GFLOP/sample / probe')
  return '\n'.join(lines)


def forward_flops(model: transformer.ContextualRQTransformer, variables: Any, codebook: jax.Array, batch: int,
                  group: int = 1) -> float:
  """FLOPs of one training forward pass at `batch` (logits, no loss): spatial over all N positions, then the
  teacher-forced depth transformer and head over all of them (`group` 1) or over the masked-first slots of mask
  groups of `group` examples, as the trainer runs them (`stage2.trainer.training_logits`)."""
  from ctxrq_jax.stage2 import trainer  # pylint: disable=g-import-not-at-top
  codes, mask, cond, _ = transformer.init_inputs(model, batch)
  return _flops(lambda v, c, m, y, e: trainer.training_logits(model, v['params'], c, m, y, e, group=group)[0],
                variables, codes, mask, cond, codebook)


def _is_out_of_memory(err: BaseException) -> bool:
  text = str(err)
  return isinstance(err, DoesNotFit) or 'RESOURCE_EXHAUSTED' in text or 'out of memory' in text.lower()


class DoesNotFit(MemoryError):
  """The compiled step needs more memory than the limit (XLA's memory analysis, before anything runs)."""


def device_memory_limit(device: Any = None) -> Optional[float]:
  """Bytes the device can still give XLA: its allocator's limit (`memory_stats()['bytes_limit']`, JAX's default 75%
  of a GPU's memory) less what is in use; None where unknown (CPU)."""
  try:
    stats = (device or jax.devices()[0]).memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  if not stats or 'bytes_limit' not in stats:
    return None
  return float(stats['bytes_limit']) - float(stats.get('bytes_in_use', 0))


def bench_train(config: Any, *, batch: int, repeats: int, seed: int, probe: bool = True,
                memory_limit: Optional[float] = None) -> dict[str, Any]:
  """Times one stage-2 training step (forward + backward + AdamW update, `stage2.trainer.make_train_step`, jitted
  with the state donated, as in training) on random codes; returns a dict.

  With the config's `train.steps_per_call` k > 1 the step is run as the trainer runs it, k steps in one compiled
  call (`loop.scan_steps`) on k stacked batches, and step_s is the fastest call's seconds / k.

  Keys: batch, step_s (seconds of the fastest of `repeats` steps after a warm-up), steps_per_call, mask_group (the config's),
  model_flops (3 x the forward FLOPs as trained, `forward_flops` with the mask group: the usual MFU convention,
  whatever remat recomputes), all_positions_flops (the same with every position through the depth transformer and
  head, as without mask groups and as the official autoregressive step), xla_flops (XLA's count of the compiled
  step, remat and optimizer included), memory_bytes (XLA's estimate of the step's arguments + outputs +
  temporaries), probe_flops (with `probe`: FLOP/s of `model_probe` at the
  training batch, best of one before and one after) and peak_flops (the device's bf16 peak, None if unknown).
  MFU is model_flops / step_s / probe_flops (or / peak_flops).

  Raises DoesNotFit when the compiled step's memory estimate exceeds `memory_limit` bytes (checked before any batch
  is allocated), or the XLA error when the device runs out of memory.
  """
  from ctxrq_jax.core import sharding  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.stage2 import trainer  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  model = transformer.from_run_config(config)
  tx = trainer.make_optimizer(config)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config)
  h, w, d = (int(v) for v in config.data.code_shape)
  key = jax.random.key(seed)
  codebook = jax.random.normal(jax.random.fold_in(key, 1), (config.data.vocab_size, config.data.embed_dim))
  rep = sharding.replicated(mesh)
  abstract_state, shardings = trainer.abstract_train_state(model, tx, config, mesh, rules)
  per_call = int(config.train.steps_per_call)
  data = sharding.stacked_batch_sharding(mesh) if per_call > 1 else sharding.batch_sharding(mesh)

  def one_batch(k: jax.Array) -> dict[str, jax.Array]:
    return {'codes': jax.random.randint(k, (batch, h, w, d), 0, int(config.data.vocab_size), jnp.int32),
            **training_conditions(model, jax.random.fold_in(k, 1), batch)}

  def batch_of(i: int) -> dict[str, jax.Array]:  # one step's batch, or k of them stacked [k, B, ...]
    k = jax.random.fold_in(key, 100 + i)
    if per_call == 1:
      return one_batch(k)
    return jax.tree.map(lambda *xs: jnp.stack(xs), *(one_batch(jax.random.fold_in(k, j)) for j in range(per_call)))

  abstract_batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=data),
                                jax.eval_shape(batch_of, 0))
  step_fn = trainer.make_train_step(model, tx, config)
  step = jax.jit(loop.scan_steps(step_fn) if per_call > 1 else step_fn, donate_argnums=(0,),
                 in_shardings=(shardings, data, rep), out_shardings=(shardings, rep))
  with nn.logical_axis_rules(rules):
    compiled = step.lower(abstract_state, abstract_batch, codebook).compile()
  memory = math.nan
  try:
    m = compiled.memory_analysis()
    memory = float(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)
  except Exception:  # pylint: disable=broad-except - not every backend reports it
    pass
  if memory_limit is not None and memory > memory_limit:
    raise DoesNotFit(f'batch {batch}: the step needs ~{memory / 2**30:.2f} GiB, the limit is '
                     f'{memory_limit / 2**30:.2f} GiB')
  probes = [model_probe(model, batch)] if probe else []
  state, _ = trainer.create_train_state(model, tx, config, mesh, rules)
  batches = [jax.device_put(batch_of(i), data) for i in range(repeats + 1)]
  with nn.logical_axis_rules(rules):
    state, metrics, call_s = time_donated_steps(compiled, state, batches, codebook)
  step_s = call_s / per_call
  if per_call > 1:  # metrics stacked [k]: the last step's
    metrics = jax.tree.map(lambda x: x[-1], metrics)
  variables = {'params': state.params}
  group = int(config.train.mask_group)
  all_positions = 3.0 * forward_flops(model, variables, codebook, batch)
  out = {'batch': batch, 'step_s': step_s, 'steps_per_call': per_call, 'mask_group': group,
         'all_positions_flops': all_positions,
         'model_flops': 3.0 * forward_flops(model, variables, codebook, batch, group) if group > 1 else all_positions,
         # A scanned call's count is one step's: XLA's cost analysis counts a loop body once (tested).
         'xla_flops': compiled_flops(compiled), 'memory_bytes': memory,
         'peak_flops': device_peak_flops(), 'loss': float(metrics['loss'])}
  del state, variables, batches
  if probe:
    probes.append(model_probe(model, batch))
    out['probe_flops'] = max(probes)
  return out


def format_train(result: dict[str, Any], official: Optional[dict[str, Any]] = None) -> str:
  """Plain-text table of a `bench_train` result (and of the official step, when timed)."""
  r = result
  lines = [f"{'step':>12}  {'batch':>5}  {'s/step':>8}  {'model GFLOP':>11}  {'XLA GFLOP':>9}  {'GFLOP/s':>8}  "
           f"{'MFU probe':>9}  {'MFU peak':>8}"]
  lines.append('-' * len(lines[0]))
  rate = r['model_flops'] / r['step_s']
  mfu_probe = _percent(100 * rate / r['probe_flops'], 9) if r.get('probe_flops') else f"{'-':>9}"
  mfu_peak = _percent(100 * rate / r['peak_flops'], 8) if r.get('peak_flops') else f"{'-':>8}"
  lines.append(f"{'ctxrq_jax':>12}  {r['batch']:>5}  {r['step_s']:>8.4f}  {_cell(r['model_flops'] / 1e9, 11, 1)}  "
               f"{_cell(r['xla_flops'] / 1e9, 9, 1)}  {_cell(rate / 1e9, 8, 1)}  {mfu_probe}  {mfu_peak}")
  if official:
    o_rate = official['model_flops'] / official['step_s']
    o_probe = _percent(100 * o_rate / r['probe_flops'], 9) if r.get('probe_flops') else f"{'-':>9}"
    lines.append(f"{'official':>12}  {official['batch']:>5}  {official['step_s']:>8.4f}  "
                 f"{_cell(official['model_flops'] / 1e9, 11, 1)}  {'-':>9}  {_cell(o_rate / 1e9, 8, 1)}  {o_probe}  "
                 f"{'-':>8}")
    lines.append(f"official / ctxrq_jax step time: {official['step_s'] / r['step_s']:.2f}")
  if r.get('probe_flops'):
    lines.append(f"matmul probe (same run, best of the model MLP and head shapes at this batch): "
                 f"{r['probe_flops'] / 1e9:.1f} GFLOP/s; "
                 f"model FLOPs = 3 x forward as trained (mask group {r['mask_group']}: "
                 f"{r['model_flops'] / r['all_positions_flops']:.0%} of all positions' FLOPs)")
  return '\n'.join(lines)


def precision_check(config: Any, *, batch: int, t_draft: int, seed: int) -> dict[str, Any]:
  """The sampler in bfloat16 against float32 on one config (same weights, same keys). The float32 side runs at
  'highest' matmul precision (a GPU's default for float32 matmuls is TF32, a TPU's one bfloat16 pass).

  Returns max_rel_logit_err (max |logits_bf16 - logits_fp32| / max |logits_fp32| of one training forward pass at
  random codes), greedy_agree (fraction of codes equal in a greedy draft with T_draft steps: greedy decoding has no
  noise, so only precision can make them differ), sampled_ok (bf16 sampling with the config's settings returned codes
  in [0, K)) and finite (no NaN / inf in the bf16 logits).
  """
  with jax.default_matmul_precision('highest'):
    ref, ref_codes, _ = _precision_run(config, 'float32', batch=batch, t_draft=t_draft, seed=seed)
  low, low_codes, sampled_ok = _precision_run(config, 'bfloat16', batch=batch, t_draft=t_draft, seed=seed)
  return {'sampled_ok': sampled_ok, 'finite': bool(np.isfinite(low).all()),
          'max_rel_logit_err': float(np.abs(low - ref).max() / max(np.abs(ref).max(), 1e-30)),
          'greedy_agree': float((ref_codes == low_codes).mean())}


def _precision_run(config: Any, dtype: str, *, batch: int, t_draft: int,
                   seed: int) -> tuple[np.ndarray, np.ndarray, bool]:
  """One side of `precision_check`, the model in `dtype`: (logits of a forward pass at random codes and masks
  [B, N, D, K], codes of a greedy draft [B, N, D], whether sampling with the config's settings gave codes in
  [0, K))."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict(config.to_dict())
  c.model.dtype = dtype
  model, variables, codebook = random_model(c, seed)
  codes, mask, cond, _ = transformer.init_inputs(model, batch)
  key = jax.random.key(seed + 1)
  codes = jax.random.randint(key, codes.shape, 0, model.vocab_size)
  mask = jax.random.bernoulli(jax.random.fold_in(key, 1), 0.5, mask.shape)
  out = np.asarray(jax.jit(model.apply)(variables, codes, mask, cond, codebook))
  greedy = logits.PhaseSettings(temperature=0.0)
  cond = random_conditions(model, jax.random.fold_in(key, 2), batch)
  greedy_codes = np.asarray(decoder.draft_and_revise(
      model, variables['params'], codebook, cond, jax.random.fold_in(key, 3), t_draft=t_draft, t_revise=1,
      num_revisions=0, draft=greedy, revise=greedy))
  sampled = np.asarray(decoder.draft_and_revise(
      model, variables['params'], codebook, cond, jax.random.fold_in(key, 4), t_draft=t_draft,
      t_revise=int(config.sample.T_revise), num_revisions=int(config.sample.M),
      draft=logits.PhaseSettings.from_config(config.sample.draft),
      revise=logits.PhaseSettings.from_config(config.sample.revise)))
  return out, greedy_codes, bool(sampled.min() >= 0 and sampled.max() < model.vocab_size)


def bench_decode(rqvae_config: Any, *, batch: int, repeats: int, seed: int) -> dict[str, Any]:
  """Seconds per sample to turn codes into uint8 pixels on the host with `models.artifact.CodeDecoder` (`batch`
  stacks per call), random weights and codes, at the backend's default float32 precision.

  The official throughput script times the decode after the sampler and reports ms/sample = sampler + decode; it
  decodes one sample per call in float32 with cuDNN's default TF32 convolutions, which the default precision matches
  on a GPU. (`sample` decodes at 'highest', true float32: slower on a GPU, the same on a CPU.)
  Returns {'batch', 'decode_s' (s/sample), 'code_shape', 'resolution'}.
  """
  from ctxrq_jax.models import artifact  # pylint: disable=g-import-not-at-top
  model = rqvae.RQVAE.from_config(rqvae_config.model)
  key = jax.random.key(seed)
  variables = jax.jit(lambda k: rqvae.init_variables(model, k))(jax.random.fold_in(key, 1))
  codes = np.asarray(jax.random.randint(jax.random.fold_in(key, 2), (batch, *model.code_shape), 0,
                                        model.codebook_size, jnp.int32))
  code_decoder = artifact.CodeDecoder((model, variables), batch_size=batch)
  seconds = _time(lambda _: code_decoder.images(codes, uint8=True), repeats)
  return {'batch': batch, 'decode_s': seconds / batch, 'code_shape': model.code_shape,
          'resolution': model.resolution}


def bench_device(config: Any, *, batch: int, t_drafts: Sequence[int], t_revise: int, num_revisions: int,
                 train_batches: Sequence[int], check_config: Any, check_batch: int, rqvae_config: Any,
                 deadline_s: float, seed: int, memory_limit: Optional[float] = None,
                 log: Callable[[str], None] = print, started: Optional[float] = None,
                 clock: Callable[[], float] = time.perf_counter, exit_by_s: Optional[float] = None,
                 on_overrun: Optional[Callable[[dict[str, Any], str], None]] = None) -> dict[str, Any]:
  """The accelerator checks, each printed as soon as it is done:

  0. `precision_check` on `check_config` (the tiny config);
  1. the Table 4 protocol on `config` (bf16 for 821m): s/sample of the codes for each T_draft (T_revise, M, batch
     100), then (1b) s/sample of decoding them to pixels with `rqvae_config`'s RQ-VAE (`bench_decode`), which the
     official protocol adds;
  2. one training step at the largest of `train_batches` that fits (tried in decreasing order; a batch fits when
     XLA's memory estimate is within `memory_limit`, default what the device has free, and it runs): time and MFU.
  Run in the order 0, 1 (the first T_draft, then the others from the largest: the issue's H200 target is T_draft
  64), 1b, 2 (the batch search, whose rejected batches each cost a compile, last). A check that raises is logged
  with its traceback and listed in 'failed' (a training batch that fails for any reason gives way to the next smaller
  one);
  the others still run. `deadline_s` counts from `started` (a `clock()` reading, default now, e.g. the process's
  start): a check is skipped when the time left is below 1.2x what the previous check of its kind took (or none is
  left). A first check of its kind has no estimate: with `exit_by_s` (seconds from `started`, on the real clock) a
  watchdog thread calls `on_overrun(out so far, name of the check in flight)` then, which should report and end the
  process (it runs while the main thread is inside an XLA compile), so that a run under `timeout` still ends with
  its tables.
  Returns {'sample': rows, 'decode': result or None, 'train': result or None, 'precision': result or None,
  'skipped': [names], 'failed': [names]}.
  """
  start = clock() if started is None else started
  now = lambda: clock() - start  # noqa: E731
  device = jax.devices()[0]
  log(f'device: {device.platform} {getattr(device, "device_kind", "")} x{jax.device_count()}; {package_versions()}; '
      f'model {config.model.width}w {config.model.spatial_layers}/{config.model.depth_layers} layers, '
      f'dtype {config.model.dtype}; deadline {deadline_s:.0f} s')
  out: dict[str, Any] = {'sample': [], 'decode': None, 'train': None, 'precision': None, 'skipped': [],
                         'failed': []}
  took: dict[str, float] = {}  # seconds the last check of each kind took
  in_flight = ['']  # the name of the check running now
  watchdog = None
  if exit_by_s is not None and on_overrun is not None:
    real_start = time.perf_counter() if started is None else started
    watchdog = threading.Timer(max(exit_by_s - (time.perf_counter() - real_start), 0.0),
                               lambda: on_overrun(with_decode(out), in_flight[0]))
    watchdog.daemon = True
    watchdog.start()

  def attempt(kind: str, name: str, fn: Callable[[], Any]) -> tuple[bool, Any]:
    """(whether `fn` ran without an exception, its result or None): skipped (listed) when the time left is short;
    an exception is logged with its traceback and listed as failed."""
    left = deadline_s - now()
    if left <= 0 or left < 1.2 * took.get(kind, 0.0):
      out['skipped'].append(name)
      log(f'[{now():6.1f} s] {name}: skipped, {max(left, 0.0):.0f} s left before the deadline')
      return False, None
    begin = clock()
    in_flight[0] = name
    try:
      return True, fn()
    except Exception as err:  # pylint: disable=broad-except - one failed check must not cost the others
      first_line = (str(err).splitlines() or [''])[0]
      if kind == 'train' and _is_out_of_memory(err):  # the next smaller batch is tried
        log(f'[{now():6.1f} s] {name}: out of memory ({first_line[:200]})')
      else:
        out['failed'].append(name)
        log(f'[{now():6.1f} s] {name}: failed, {type(err).__name__}: {first_line[:300]}\n{traceback.format_exc()}')
      return False, None  # not the exception: its traceback would keep a failed batch's train state alive
    finally:
      took[kind] = clock() - begin
      in_flight[0] = ''

  # 0 first: it tells whether bf16 sampling is sound before the long runs.
  ok, result = attempt('precision', 'bf16 vs fp32 check', lambda: precision_check(
      check_config, batch=check_batch, t_draft=int(check_config.sample.T_draft), seed=seed))
  if ok:
    out['precision'] = result
    log(f"[{now():6.1f} s] bf16 vs fp32 sampler (tiny config): " + ', '.join(
        f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in result.items()))
  parts: list[Any] = []  # the benchmarked model, built once (its own check: not part of a sample check's time)
  memo: dict[Any, Any] = {}  # FLOP counts by shape (`decode_flops`)

  def sample(t_draft: int) -> None:
    if not parts:
      ok, built = attempt('build', 'build the model', lambda: random_model(config, seed))
      parts.append(built if ok else None)  # a failed build is not tried again before each T_draft
    if parts[0] is None:
      return
    ok, rows = attempt('sample', f'sample T_draft={t_draft}', lambda: bench_sample(
        config, batch=batch, t_drafts=[t_draft], t_revise=t_revise, num_revisions=num_revisions, repeats=1,
        reference=False, seed=seed, probe=False, flops_memo=memo, parts=parts[0]))
    if not ok:
      return
    out['sample'] = sorted(out['sample'] + rows, key=lambda r: r['t_draft'])  # the table in T_draft order
    row = rows[0]
    log(f"[{now():6.1f} s] sample T_draft={t_draft}: " + (
        f"{row['fast_s']:.4f} s/sample (codes), {_cell(row['fast_flops'] / 1e9, 1, 1)} GFLOP/sample"
        if 'fast_s' in row else row.get('skipped', '')))

  def decode() -> None:
    ok, result = attempt('decode', f'RQ-VAE decode batch {batch}', lambda: bench_decode(
        rqvae_config, batch=batch, repeats=1, seed=seed))
    if ok:
      out['decode'] = result
      log(f"[{now():6.1f} s] RQ-VAE decode to uint8 pixels, batch {batch}, {result['resolution']}px from codes "
          f"{'x'.join(map(str, result['code_shape']))}: {result['decode_s']:.4f} s/sample")

  def train() -> None:
    limit = device_memory_limit() if memory_limit is None else memory_limit
    tried = sorted(train_batches, reverse=True)
    log(f"[{now():6.1f} s] train: the largest of batches {' / '.join(map(str, tried))} that fits "
        f"(limit {'unknown' if limit is None else f'{limit / 2**30:.1f} GiB'})")
    for b in tried:
      ok, result = attempt('train', f'train batch {b}', lambda b=b: bench_train(
          config, batch=b, repeats=2, seed=seed, probe=True, memory_limit=limit))
      if not ok:
        if f'train batch {b}' in out['skipped']:
          return
        continue
      out['train'] = result
      rate = result['model_flops'] / result['step_s']
      peak = result['peak_flops']
      log(f"[{now():6.1f} s] train step batch {b}: {result['step_s']:.4f} s, "
          f"{_cell(rate / 1e12, 1, 3)} TFLOP/s model, MFU "
          f"{_percent(100 * rate / result['probe_flops'], 2)} of the probe"
          + (f", {_percent(100 * rate / peak, 2)} of the {peak / 1e12:.0f} TFLOP/s peak" if peak else ''))
      return

  # Table 4 first (the first T_draft, then the others from the largest), the decode, then the training step: its
  # batch search is the longest and least predictable part (each batch that does not fit costs a compile), so a
  # deadline cuts it rather than T_draft 64, the H200 target.
  for t_draft in list(t_drafts[:1]) + sorted(t_drafts[1:], reverse=True):
    sample(t_draft)
  decode()
  train()
  if watchdog is not None:
    watchdog.cancel()
  return with_decode(out)


def package_versions(names: Sequence[str] = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint')) -> str:
  """'python 3.12.3, jax 0.11.2, ...' (a package that is not installed: '-'): what a one-shot run ran on."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  import platform  # pylint: disable=g-import-not-at-top

  def version(name: str) -> str:
    try:
      return metadata.version(name)
    except metadata.PackageNotFoundError:
      return '-'
  return ', '.join([f'python {platform.python_version()}', *(f'{n} {version(n)}' for n in names)])


def with_decode(out: dict[str, Any]) -> dict[str, Any]:
  """`bench_device`'s result with the decode's s/sample ('decode_s') in every timed sample row."""
  if out['decode']:
    for row in out['sample']:
      if 'fast_s' in row:
        row['decode_s'] = out['decode']['decode_s']
  return out


def param_table() -> str:
  """Parameter counts of the paper's model sizes (configs/imagenet.py, configs/cc3m.py) and the ImageNet RQ-VAE, via
  eval_shape."""
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
  for size, target in (('333m', 333e6), ('654m', 654e6)):  # text-to-image (Table 2), configs/cc3m.py
    c = configlib.load_config_file('cc3m', size)
    n = common.count_params(transformer.abstract_variables(transformer.from_run_config(c))['params'])
    lines.append(f"{'t2i ' + size:>14}  {c.model.width:>5}  {c.model.num_heads:>5}  "
                 f"{c.model.spatial_layers:>3}/{c.model.depth_layers:<3}  {n:>15,}  {target / 1e6:>6.0f}M  "
                 f"{100 * (n / target - 1):>+5.2f}%")
  c = configlib.load_config_file('rqvae_imagenet')
  model = rqvae.RQVAE.from_config(c.model)
  v = rqvae.abstract_variables(model)
  n = common.count_params(v['params']) + model.codebook_size * model.embed_dim + model.embed_dim  # + the padding row
  lines.append(f"{'rq-vae 8x8x4':>14}  {'':>5}  {'':>5}  {'':>7}  {n:>15,}  {'104.4':>6}M  "
               f"{100 * (n / 104_402_051 - 1):>+5.2f}%")
  return '\n'.join(lines)
