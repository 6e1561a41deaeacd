"""Draft-and-Revise decoding for Contextual RQ-Transformer (§3.3, Algorithms 1-2, eq. 12-14).

UPDATE (Algorithm 1) walks a partition Pi = (m^1 .. m^T) of the positions: at step t the spatial transformer reads the
map with every position of m^t (and every position not generated yet) replaced by [MASK], and the depth transformer
samples the D codes of each position in m^t autoregressively. Draft-and-Revise (Algorithm 2) runs UPDATE once from
the empty map with T_draft steps (the draft) and then M more times with T_revise steps (the revisions), each with a
fresh uniformly random balanced partition (eq. 12).

A partition is stored as one int32 per position, the step at which it is updated (-1: never, e.g. outside an
inpainting region); all partitions are drawn up front. The fast sampler (`draft_and_revise`, `inpaint`) is one jitted
function built from `lax.fori_loop`s; per step it runs the spatial transformer once over all N positions and the depth
transformer only on the ceil(R/T) positions being updated (R = region size, N for a full image), gathered by an
argsort of the partition (padding slots are masked out). The depth transformer runs one depth at a time with a
key/value cache across depths (`model.depth_step`), so a stack of D codes costs D token-passes, not D(D+1)/2; with
guidance the cond and uncond depth features are combined before the (linear, bias-free) output head, so the head runs
once per code. It compiles once per static setting: shapes, T_draft, T_revise, M, D, the draft mode and, per phase,
top_k and whether guidance / nucleus filtering are on. Temperatures, top-p values, guidance scales, conditions and
keys are traced.

Randomness. `rng` is split into (partition, sampling, confidence) keys. Phase p (0 = draft, m = revision m) draws its
partition from fold_in(partition_key, p); the code of sample b, position n and depth d at step t of phase p is drawn
by inverse-CDF sampling from one uniform number, keyed by fold_in^5(sampling_key, p, t, b, n, d)
(`logits.sampling_uniforms`; K Gumbel numbers per code cost more than the output head on a CPU). All keys are
threefry keys derived from `rng` (whatever its implementation), since threefry draws are invariant to vmap batching.
The numbers therefore depend on which position is sampled, not on where it sits in the gathered list, so the plain
reference (`reference_draft_and_revise`: Python loop over steps, spatial pass and depth steps over all N positions,
then select) draws exactly the same numbers and returns exactly the same codes.

Sampling at each depth: guided logits -> temperature -> top-k -> top-p -> categorical (inverse CDF); temperature 0 is
greedy (argmax, no noise).

Classifier-free guidance convention: logits = cond + s * (cond - uncond), so s = 0 is the conditional model alone
(the uncond pass is then skipped statically) and s corresponds to w in Ho & Salimans (2021). In the other common
convention, logits = uncond + lambda * (cond - uncond), lambda = 1 + s. The unconditional branch uses the null
condition id `model.null_cond_id` for every condition token (the extra class id num_classes, or [PAD] = 0 for
captions: the empty caption), and runs in the same batched pass as the conditional
branch (concatenated along the batch axis).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, NamedTuple, Optional

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ctxrq_jax.models import transformer as transformer_lib
from ctxrq_jax.sampling.logits import PhaseSettings
from ctxrq_jax.sampling.logits import Sampler
from ctxrq_jax.sampling.logits import guide_logits
from ctxrq_jax.sampling.logits import sample_categorical
from ctxrq_jax.sampling.logits import sampling_uniforms
from ctxrq_jax.sampling.partitions import region_partitions

Array = jax.Array
PyTree = Any

DRAFT_MODES = ('random', 'confidence')


# ----------------------------------------------------------------------------------------------------------------
# Decode state and the UPDATE step (Algorithm 1).


@flax.struct.dataclass
class DecodeState:
  """Map of code stacks being decoded.

  Attributes:
    codes: int32 [B, N, D]; values at unknown positions are placeholders (never read by the model).
    known: bool [B, N], positions holding generated (or given) codes; the others are read as [MASK].
    updates: int32 [B, N], how many times each stack has been written (instrumentation for tests and counts).
  """
  codes: Array
  known: Array
  updates: Array


def init_state(codes: Array, region: Array) -> DecodeState:
  """State with `region` (bool [B, N]) empty ([MASK]) and the other stacks of `codes` ([B, N, D]) as context."""
  chex.assert_rank([codes, region], [3, 2])
  chex.assert_equal_shape_prefix([codes, region], 2)
  region = jnp.asarray(region, jnp.bool_)
  codes = jnp.where(region[..., None], 0, jnp.asarray(codes, jnp.int32))
  return DecodeState(codes=codes, known=~region, updates=jnp.zeros(region.shape, jnp.int32))


def null_cond(model: Any, cond: Array) -> Array:
  """The null condition [B, L] of the unconditional branch: the extra class id, or the empty caption (all [PAD])."""
  return jnp.full_like(cond, model.null_cond_id)


def sample_depths(model: Any, variables: PyTree, codebook: Array, h: Array, positions: Array, step_key: Array,
                  sampler: Sampler) -> tuple[Array, Array]:
  """The D codes of each given position, autoregressively over depths, with the depth transformer's key/value cache.

  Depth d is one cached token-pass per position (`model.depth_step`); guidance combines the cond and uncond depth
  features before the output head (`model.logits`, linear without bias: the same logits as guiding the two logit
  vectors, one head matmul instead of two). Shared with the reference sampler, which calls it on all N positions.

  Args:
    h: [B', U, W] context vectors of the positions (B' = 2B with guidance: cond rows, then uncond rows).
    positions: int32 [B, U], the positions' indices (they key the sampling noise).

  Returns:
    (stacks int32 [B, U, D], log-probability float32 [B, U] of each sampled stack).
  """
  batch, depth = positions.shape[0], model.code_depth
  stacks = jnp.zeros(positions.shape + (depth,), jnp.int32)
  logprob = jnp.zeros(positions.shape, jnp.float32)
  cache = None
  for d in range(depth):  # D is small and static; each depth is one cached token-pass
    stacks_in = jnp.concatenate([stacks, stacks]) if sampler.guided else stacks
    z, cache = model.apply(variables, h, stacks_in, codebook, cache, at=d, method=model.depth_step)  # [B', U, W]
    if sampler.guided:
      z = guide_logits(z[:batch].astype(jnp.float32), z[batch:].astype(jnp.float32), sampler.guidance_scale)
    logits = model.apply(variables, z, method=model.logits)  # [B, U, K]
    code, lp = sample_categorical(logits, sampling_uniforms(step_key, positions, d), sampler)
    stacks = stacks.at[:, :, d].set(code)
    logprob = logprob + lp
  return stacks, logprob


def _sample_stacks(model: Any, variables: PyTree, codebook: Array, codes: Array, mask: Array, cond: Array,
                   positions: Array, step_key: Array, sampler: Sampler) -> tuple[Array, Array]:
  """One spatial pass over the masked map, then D cached depth steps on the gathered positions only.

  Args:
    codes: int32 [B, N, D]; mask: bool [B, N] ([MASK] positions); cond: int32 [B, L].
    positions: int32 [B, U], positions whose stacks are sampled.

  Returns:
    (stacks int32 [B, U, D], log-probability float32 [B, U] of each sampled stack).
  """
  if sampler.guided:  # cond and uncond branches in one batched pass
    codes, mask, positions_in = (jnp.concatenate([x, x]) for x in (codes, mask, positions))
    cond = jnp.concatenate([cond, null_cond(model, cond)])
  else:
    positions_in = positions
  h = model.apply(variables, codes, mask, cond, codebook, method=model.spatial)  # [B', N, W]
  h = jnp.take_along_axis(h, positions_in[..., None], axis=1)  # [B', U, W]
  return sample_depths(model, variables, codebook, h, positions, step_key, sampler)


def _update_step(model: Any, variables: PyTree, codebook: Array, state: DecodeState, cond: Array, partition: Array,
                 step: Array, step_key: Array, sampler: Sampler, max_updates: int) -> DecodeState:
  """One step of Algorithm 1: resample the stacks at {n : partition[b, n] == step}."""
  batch = state.codes.shape[0]
  chosen = partition == step  # [B, N]
  mask = chosen | ~state.known
  # Chosen positions first (in index order), padded with unchosen ones that are masked out below.
  idx = jnp.argsort(~chosen, axis=1, stable=True)[:, :max_updates].astype(jnp.int32)  # [B, U]
  valid = jnp.take_along_axis(chosen, idx, axis=1)
  stacks, _ = _sample_stacks(model, variables, codebook, state.codes, mask, cond, idx, step_key, sampler)
  rows = jnp.arange(batch)[:, None]
  new = jnp.where(valid[..., None], stacks, state.codes[rows, idx])
  return DecodeState(codes=state.codes.at[rows, idx].set(new), known=state.known | chosen,
                     updates=state.updates.at[rows, idx].add(valid.astype(jnp.int32)))


def _update_pass(model: Any, variables: PyTree, codebook: Array, state: DecodeState, cond: Array, partition: Array,
                 pass_key: Array, sampler: Sampler, num_steps: int, max_updates: int) -> DecodeState:
  """Algorithm 1 over all T steps; step t samples with fold_in(pass_key, t)."""
  def body(t, s):
    return _update_step(model, variables, codebook, s, cond, partition, t, jax.random.fold_in(pass_key, t), sampler,
                        max_updates)
  return jax.lax.fori_loop(0, num_steps, body, state)


def _confidence_step(model: Any, variables: PyTree, codebook: Array, state: DecodeState, cond: Array,
                     region: Array, step: Array, num_steps: int, step_key: Array, noise_key: Array,
                     sampler: Sampler, noise_scale: float) -> DecodeState:
  """MaskGIT-style step: sample every unknown stack, keep the most confident ones (cosine schedule, exact count)."""
  batch, n, _ = state.codes.shape
  positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))
  stacks, logprob = _sample_stacks(model, variables, codebook, state.codes, ~state.known, cond, positions, step_key,
                                   sampler)
  unknown = region & ~state.known
  progress = (step + 1).astype(jnp.float32) / num_steps
  conf = logprob + noise_scale * (1.0 - progress) * jax.random.gumbel(jax.random.fold_in(noise_key, step), (batch, n))
  conf = jnp.where(unknown, conf, -jnp.inf)
  size = region.sum(axis=1, dtype=jnp.int32)
  done = (region & state.known).sum(axis=1, dtype=jnp.int32)
  # Known after this step: N (1 - gamma(progress)) with gamma the quarter cosine, >= one new stack, all at the end.
  target = size - jnp.floor(size * jnp.cos(0.5 * jnp.pi * progress)).astype(jnp.int32)
  target = jnp.where(step == num_steps - 1, size, jnp.clip(jnp.maximum(target, done + 1), 0, size))
  rank = jnp.argsort(jnp.argsort(-conf, axis=1, stable=True), axis=1)  # exact-k: no threshold ties
  select = (rank < (target - done)[:, None]) & unknown
  return DecodeState(codes=jnp.where(select[..., None], stacks, state.codes), known=state.known | select,
                     updates=state.updates + select.astype(jnp.int32))


def _confidence_pass(model: Any, variables: PyTree, codebook: Array, state: DecodeState, cond: Array, region: Array,
                     pass_key: Array, noise_key: Array, sampler: Sampler, num_steps: int,
                     noise_scale: float) -> DecodeState:
  def body(t, s):
    return _confidence_step(model, variables, codebook, s, cond, region, t, num_steps,
                            jax.random.fold_in(pass_key, t), noise_key, sampler, noise_scale)
  return jax.lax.fori_loop(0, num_steps, body, state)


# ----------------------------------------------------------------------------------------------------------------
# Draft-and-Revise (Algorithm 2).


class _Plan(NamedTuple):
  """Static description of one decode; a new value compiles a new program."""
  t_draft: int
  t_revise: int
  num_revisions: int
  draft_updates: int  # ceil(R_max / T_draft): gathered positions per draft step
  revise_updates: int
  draft_mode: str
  confidence_noise: float
  history: bool


def split_rng(rng: Array) -> tuple[Array, Array, Array]:
  """(partition, sampling, confidence-noise) threefry keys derived from `rng` (a key of any PRNG implementation).

  Threefry draws do not depend on how keys are batched under vmap (the 'rbg' implementation's do), which the exact
  equality of the gathered sampler and the all-positions reference relies on.
  """
  key = jax.random.wrap_key_data(jax.random.bits(rng, (2,), jnp.uint32), impl='threefry2x32')
  k_part, k_samp, k_conf = jax.random.split(key, 3)
  return k_part, k_samp, k_conf


@functools.partial(jax.jit, static_argnames=('model', 'plan'))
def _decode(model: Any, variables: PyTree, codebook: Array, cond: Array, rng: Array, codes: Array, region: Array,
            draft: Sampler, revise: Sampler, plan: _Plan) -> tuple[Array, Optional[Array]]:
  k_part, k_samp, k_conf = split_rng(rng)
  state = init_state(codes, region)
  if plan.draft_mode == 'random':
    partition = region_partitions(jax.random.fold_in(k_part, 0), region, plan.t_draft)
    state = _update_pass(model, variables, codebook, state, cond, partition, jax.random.fold_in(k_samp, 0), draft,
                         plan.t_draft, plan.draft_updates)
  else:
    state = _confidence_pass(model, variables, codebook, state, cond, region, jax.random.fold_in(k_samp, 0), k_conf,
                             draft, plan.t_draft, plan.confidence_noise)
  history = None
  if plan.history:
    history = jnp.zeros((plan.num_revisions + 1,) + codes.shape, jnp.int32).at[0].set(state.codes)
  if plan.num_revisions:
    phases = jnp.arange(1, plan.num_revisions + 1)
    partitions = jax.vmap(lambda p: region_partitions(jax.random.fold_in(k_part, p), region, plan.t_revise))(phases)

    def revision(m, carry):
      s, hist = carry
      s = s.replace(known=jnp.ones_like(s.known))
      s = _update_pass(model, variables, codebook, s, cond, partitions[m], jax.random.fold_in(k_samp, m + 1), revise,
                       plan.t_revise, plan.revise_updates)
      if hist is not None:
        hist = hist.at[m + 1].set(s.codes)
      return s, hist

    state, history = jax.lax.fori_loop(0, plan.num_revisions, revision, (state, history))
  return state.codes, history


@functools.partial(jax.jit, static_argnames=('model', 'plan'))
def _decode_each(model: Any, variables: PyTree, codebook: Array, cond: Array, keys: Array, codes: Array,
                 region: Array, draft: Sampler, revise: Sampler, plan: _Plan) -> tuple[Array, Optional[Array]]:
  """`_decode` with one key per sample (keys [B]): sample b's random numbers are a function of keys[b] and its own
  inputs only, whatever the batch it is drawn in and however that batch is split over devices (its codes bit for bit
  when the per-device batch shape is the same; XLA tiles matmuls by row count, so another shape can round a logit
  differently in its last bit)."""
  def one(c, k, x, r):
    out, hist = _decode(model, variables, codebook, c[None], k, x[None], r[None], draft, revise, plan=plan)
    return out[0], (None if hist is None else hist[:, 0])

  out, history = jax.vmap(one)(cond, _threefry_keys(keys), codes, region)
  return out, (None if history is None else jnp.swapaxes(history, 0, 1))


def _threefry_keys(keys: Array) -> Array:
  """Threefry keys [B] from keys [B] of any implementation, each a function of its own key's data only.

  (`split_rng` draws bits from the key, and some implementations' draws, 'rbg' among them, change when the keys
  are batched under vmap; folding the key data into a threefry key does not.)
  """
  data = jax.random.key_data(keys) if jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key) else keys
  data = data.reshape(data.shape[0], -1).astype(jnp.uint32)
  base = jax.random.wrap_key_data(jnp.zeros((2,), jnp.uint32), impl='threefry2x32')

  def one(words):
    key = base
    for j in range(words.shape[0]):  # the key's 2-4 data words
      key = jax.random.fold_in(key, words[j])
    return key

  return jax.vmap(one)(data)


def _run(model, params, codebook, cond, rng, codes, region, draft_s, revise_s, plan):
  """`_decode` for one key, `_decode_each` for a key per sample (rng of shape [B])."""
  typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
  key_shape = rng.shape if typed else rng.shape[:-1]  # a raw uint32 key has a trailing key-data axis
  if key_shape == ():
    return _decode(model, as_variables(params), codebook, cond, rng, codes, region, draft_s, revise_s, plan=plan)
  if key_shape != (cond.shape[0],):
    raise ValueError(f'rng must be one key or one key per sample [B={cond.shape[0]}], got keys of shape {key_shape}')
  return _decode_each(model, as_variables(params), codebook, cond, rng, codes, region, draft_s, revise_s, plan=plan)


# ----------------------------------------------------------------------------------------------------------------
# Host-side validation and public entry points.


def as_variables(params: PyTree) -> dict[str, PyTree]:
  if isinstance(params, Mapping) and set(params.keys()) == {'params'}:
    raise ValueError("pass the model's 'params' collection, not the variables dict {'params': ...}")
  return {'params': params}


def _check_steps(name: str, value: Any, smallest: int, what: str) -> None:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
    raise ValueError(f'{name} must be a positive integer, got {value!r}')
  if value > smallest:
    raise ValueError(f'{name}={value} exceeds {what} ({smallest}); each UPDATE step must update at least one position')


def _check_settings(name: str, settings: Any) -> Sampler:
  if not isinstance(settings, PhaseSettings):
    raise ValueError(f'{name} must be a PhaseSettings, got {type(settings).__name__}')
  return settings.sampler()


def prepare(model: Any, codebook: Any, cond: Any, codes: Any, region: Any, *, t_draft: int, t_revise: int,
             num_revisions: int, draft: Any, revise: Any, draft_mode: str, confidence_noise: float,
             return_history: bool) -> tuple[Array, Array, Array, Array, Sampler, Sampler, _Plan]:
  """Validates concrete inputs before anything is compiled; returns device arrays, samplers and the static plan."""
  cond_arg, cond = cond, np.asarray(cond)
  transformer_lib.check_inputs(model, cond=cond, codebook=codebook)
  batch, n, depth = cond.shape[0], model.num_positions, model.code_depth
  if batch < 1:
    raise ValueError('cond must hold at least one example')
  if region is None:
    region = np.ones((batch, n), np.bool_)
    codes = np.zeros((batch, n, depth), np.int32)
  else:
    region, codes = np.asarray(region), np.asarray(codes)
    if region.shape != (batch, n):
      raise ValueError(f'region must be bool [B={batch}, N={n}], got shape {region.shape}')
    if region.dtype != np.bool_:
      raise ValueError(f'region must be boolean, got dtype {region.dtype}')
    if codes.shape != (batch, n, depth):
      raise ValueError(f'codes must be [B={batch}, N={n}, D={depth}], got shape {codes.shape}')
    if not np.issubdtype(codes.dtype, np.integer):
      raise ValueError(f'codes must be integers, got dtype {codes.dtype}')
    context = codes[~region]
    if context.size and (context.min() < 0 or context.max() >= model.vocab_size):
      raise ValueError(f'codes outside the region must lie in [0, {model.vocab_size}), got range '
                       f'[{context.min()}, {context.max()}]')
    if not region.any(axis=1).all():
      raise ValueError(f'region is empty for examples {np.flatnonzero(~region.any(axis=1)).tolist()}; '
                       'nothing to inpaint')
  sizes = region.sum(axis=1)
  what = f'N={n} positions' if sizes.min() == n else 'the smallest region size'
  _check_steps('t_draft', t_draft, int(sizes.min()), what)
  _check_steps('t_revise', t_revise, int(sizes.min()), what)
  if not isinstance(num_revisions, (int, np.integer)) or isinstance(num_revisions, bool) or num_revisions < 0:
    raise ValueError(f'num_revisions must be an integer >= 0, got {num_revisions!r}')
  if draft_mode not in DRAFT_MODES:
    raise ValueError(f'draft_mode must be one of {DRAFT_MODES}, got {draft_mode!r}')
  if not (isinstance(confidence_noise, (int, float)) and math.isfinite(confidence_noise) and confidence_noise >= 0):
    raise ValueError(f'confidence_noise must be a finite number >= 0, got {confidence_noise!r}')
  largest = int(sizes.max())
  plan = _Plan(t_draft=int(t_draft), t_revise=int(t_revise), num_revisions=int(num_revisions),
               draft_updates=-(-largest // int(t_draft)), revise_updates=-(-largest // int(t_revise)),
               draft_mode=draft_mode, confidence_noise=float(confidence_noise), history=bool(return_history))
  # A device array keeps its sharding (e.g. batch-sharded over a mesh); the host copy above was only for checks.
  cond_in = cond_arg.astype(jnp.int32) if isinstance(cond_arg, jax.Array) else jnp.asarray(cond, jnp.int32)
  return (jnp.asarray(codebook, jnp.float32), cond_in, jnp.asarray(codes, jnp.int32),
          jnp.asarray(region), _check_settings('draft', draft), _check_settings('revise', revise), plan)


def draft_and_revise(model: Any, params: PyTree, codebook: Array, cond: Array, rng: Array, *, t_draft: int,
                     t_revise: int, num_revisions: int, draft: PhaseSettings, revise: PhaseSettings,
                     draft_mode: str = 'random', confidence_noise: float = 0.0,
                     return_history: bool = False) -> Array | tuple[Array, Array]:
  """Algorithm 2: a draft from the empty map with T_draft steps, then M revisions with T_revise steps each.

  Args:
    model: a `ContextualRQTransformer` (or any module with its `spatial` / `depth` methods and fields).
    params: the model's 'params' collection.
    codebook: float [K, n_z], the frozen RQ-VAE codebook.
    cond: int [B, L] condition ids in [0, cond_vocab) (a class id, num_classes = no class; or caption tokens);
      checked on the host.
    rng: one PRNG key for the batch, or keys [B], one per sample: then sample b depends on rng[b] only (not on the
      batch size, the other samples or the devices), which makes large sample sets reproducible piece by piece.
    t_draft: T_draft in [1, N].
    t_revise: T_revise in [1, N].
    num_revisions: M >= 0.
    draft: sampling settings of the draft phase.
    revise: sampling settings of the revise phase.
    draft_mode: 'random' (the paper's UPDATE) or 'confidence' (MaskGIT-style draft, see `confidence_draft`).
    confidence_noise: scale of the annealed Gumbel noise added to confidences in 'confidence' mode.
    return_history: also return the draft and every revision.

  Returns:
    codes int32 [B, N, D]; with return_history, (codes, history int32 [M+1, B, N, D]) where history[0] is the draft
    and history[m] the m-th revision (history[M] == codes).
  """
  codebook, cond, codes, region, draft_s, revise_s, plan = prepare(
      model, codebook, cond, None, None, t_draft=t_draft, t_revise=t_revise, num_revisions=num_revisions,
      draft=draft, revise=revise, draft_mode=draft_mode, confidence_noise=confidence_noise,
      return_history=return_history)
  out, history = _run(model, params, codebook, cond, rng, codes, region, draft_s, revise_s, plan)
  return (out, history) if return_history else out


def inpaint(model: Any, params: PyTree, codebook: Array, codes: Array, region: Array, cond: Array, rng: Array, *,
            t_draft: int, t_revise: int, num_revisions: int, draft: PhaseSettings, revise: PhaseSettings,
            draft_mode: str = 'random', confidence_noise: float = 0.0,
            return_history: bool = False) -> Array | tuple[Array, Array]:
  """Draft-and-Revise restricted to `region`; every other stack is fixed context and returned bit-identical.

  Partitions cover only each sample's region positions (sizes vary per sample), so T_draft and T_revise must not
  exceed the smallest region in the batch. The number of positions gathered per step is ceil(R_max / T) with R_max
  the largest region, so batches with a different R_max compile a new program.

  Args:
    codes: int [B, N, D]; values inside the region are ignored, values outside must lie in [0, K).
    region: bool [B, N], True where stacks are generated; non-empty for every example.
    Other arguments as in `draft_and_revise`.

  Returns:
    codes int32 [B, N, D] (and history [M+1, B, N, D] with return_history).
  """
  codebook, cond, codes, region, draft_s, revise_s, plan = prepare(
      model, codebook, cond, codes, region, t_draft=t_draft, t_revise=t_revise, num_revisions=num_revisions,
      draft=draft, revise=revise, draft_mode=draft_mode, confidence_noise=confidence_noise,
      return_history=return_history)
  out, history = _run(model, params, codebook, cond, rng, codes, region, draft_s, revise_s, plan)
  return (out, history) if return_history else out


def confidence_draft(model: Any, params: PyTree, codebook: Array, cond: Array, rng: Array, *, t_draft: int,
                     settings: PhaseSettings, noise_scale: float = 0.0) -> Array:
  """Confidence-based draft (MaskGIT-style UPDATE; the paper's Appendix C comparison) -> int32 [B, N, D].

  At step t every unknown stack is sampled (with `settings`); its confidence is the log-probability of the sampled
  stack plus noise_scale * (1 - (t+1)/T) * Gumbel noise, and the most confident ones are kept so that
  N (1 - cos(pi/2 (t+1)/T)) stacks are known after step t (at least one new stack per step, all after T steps),
  selected exactly by argsort. Uses the same key derivation as the random draft.
  """
  return draft_and_revise(model, params, codebook, cond, rng, t_draft=t_draft, t_revise=1, num_revisions=0,
                          draft=settings, revise=PhaseSettings(), draft_mode='confidence', confidence_noise=noise_scale)


@functools.partial(jax.jit, static_argnames=('model', 'max_updates'))
def update_step(model: Any, params: PyTree, codebook: Array, state: DecodeState, cond: Array, partition: Array,
                step: Array, step_key: Array, sampler: Sampler, *, max_updates: int) -> DecodeState:
  """Jitted single UPDATE step (Algorithm 1, line 2) on {n : partition[b, n] == step}.

  Args:
    params: the 'params' collection; state: the map ([B, N, D] codes, [B, N] known/updates);
    cond: int32 [B, L]; partition: int32 [B, N] step ids (-1: never); step: int32 scalar;
    step_key: PRNG key of this step; sampler: `PhaseSettings.sampler()`;
    max_updates: static number of gathered positions, >= the largest number of positions at any step.

  Returns:
    The new state; chosen positions are resampled, known, and their `updates` count incremented.
  """
  chex.assert_rank([state.codes, state.known, cond, partition], [3, 2, 2, 2])
  return _update_step(model, as_variables(params), codebook, state, cond, partition, step, step_key, sampler,
                      max_updates)


@functools.partial(jax.jit, static_argnames=('model', 'num_steps', 'max_updates'))
def update_pass(model: Any, params: PyTree, codebook: Array, state: DecodeState, cond: Array, partition: Array,
                pass_key: Array, sampler: Sampler, *, num_steps: int, max_updates: int) -> DecodeState:
  """Jitted UPDATE (Algorithm 1): `num_steps` update steps over `partition`; step t uses fold_in(pass_key, t)."""
  chex.assert_rank([state.codes, state.known, cond, partition], [3, 2, 2, 2])
  return _update_pass(model, as_variables(params), codebook, state, cond, partition, pass_key, sampler, num_steps,
                      max_updates)
