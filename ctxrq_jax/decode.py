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
argsort of the partition (padding slots are masked out). It compiles once per static setting: shapes, T_draft,
T_revise, M, D, the draft mode and, per phase, top_k and whether guidance / nucleus filtering are on. Temperatures,
top-p values, guidance scales, conditions and keys are traced.

Randomness. `rng` is split into (partition, sampling, confidence) keys. Phase p (0 = draft, m = revision m) draws its
partition from fold_in(partition_key, p); the sampling noise of sample b, position n and depth d at step t of phase p
is Gumbel noise of shape [K] from the key fold_in^5(sampling_key, p, t, b, n, d). All keys are threefry keys derived
from `rng` (whatever its implementation), since threefry draws are invariant to vmap batching. Noise therefore depends
on which position is sampled, not on where it sits in the gathered list, so the plain reference
(`reference_draft_and_revise`: Python loop over steps, spatial + depth pass over all N positions, then select) draws
exactly the same numbers and returns exactly the same codes.

Sampling at each depth: guided logits -> temperature -> top-k -> top-p -> Gumbel-max (= categorical sampling);
temperature 0 is greedy (argmax, no noise).

Classifier-free guidance convention: logits = cond + s * (cond - uncond), so s = 0 is the conditional model alone
(the uncond pass is then skipped statically) and s corresponds to w in Ho & Salimans (2021). In the other common
convention, logits = uncond + lambda * (cond - uncond), lambda = 1 + s. The unconditional branch uses the null
condition id `model.num_classes` for every condition token, and runs in the same batched pass as the conditional
branch (concatenated along the batch axis).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, NamedTuple, Optional

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ctxrq_jax import transformer as transformer_lib

Array = jax.Array
PyTree = Any

DRAFT_MODES = ('random', 'confidence')


# ----------------------------------------------------------------------------------------------------------------
# Partitions (eq. 12).


def region_partitions(rng: Array, region: Array, num_steps: int) -> Array:
  """Uniformly random balanced partitions of each sample's region into `num_steps` update steps.

  Region positions are put in a uniformly random order (a random permutation, then a stable sort that brings region
  positions first); the position of rank r among the R_b region positions of sample b is updated at step
  floor(r * T / R_b), so step sizes differ by at most one and every step is non-empty when T <= R_b.

  Args:
    rng: PRNG key; sample b uses the b-th key of `jax.random.split(rng, B)`.
    region: bool [B, N], the positions to partition.
    num_steps: T >= 1.

  Returns:
    int32 [B, N]: the step in [0, T) at which each region position is updated, -1 outside the region.
  """
  chex.assert_rank(region, 2)
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f'number of update steps T must be a positive integer, got {num_steps!r}')
  region = jnp.asarray(region, jnp.bool_)
  if not isinstance(region, jax.core.Tracer):
    smallest = int(np.asarray(region).sum(axis=1).min()) if region.shape[0] else num_steps
    if num_steps > smallest:
      raise ValueError(f'number of update steps T={num_steps} exceeds the smallest region ({smallest} positions); '
                       'a partition into T non-empty sets needs T <= region size')
  batch, n = region.shape
  perm = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(rng, batch))  # [B, N]
  in_region = jnp.take_along_axis(region, perm, axis=1)
  order = jnp.take_along_axis(perm, jnp.argsort(~in_region, axis=1, stable=True), axis=1)  # region first
  rows = jnp.arange(batch)[:, None]
  rank = jnp.zeros((batch, n), jnp.int32).at[rows, order].set(jnp.arange(n, dtype=jnp.int32)[None])
  size = jnp.maximum(region.sum(axis=1, keepdims=True, dtype=jnp.int32), 1)
  return jnp.where(region, rank * num_steps // size, -1).astype(jnp.int32)


def random_partitions(rng: Array, batch: int, num_positions: int, num_steps: int) -> Array:
  """Uniformly random balanced partitions of all N positions (eq. 12) -> int32 [B, N] update step in [0, T)."""
  for name, value in (('batch', batch), ('num_positions', num_positions), ('num_steps', num_steps)):
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f'{name} must be a positive integer, got {value!r}')
  if num_steps > num_positions:
    raise ValueError(f'number of update steps T={num_steps} exceeds the number of positions N={num_positions}')
  return region_partitions(rng, jnp.ones((batch, num_positions), jnp.bool_), num_steps)


# ----------------------------------------------------------------------------------------------------------------
# Sampling settings and helpers.


@dataclasses.dataclass(frozen=True)
class PhaseSettings:
  """Host-side sampling settings of one phase (draft or revise); validated on construction.

  Attributes:
    temperature: >= 0; 0 means greedy (argmax).
    top_k: keep the k largest logits; 0 disables (static: a new value recompiles).
    top_p: nucleus filtering in (0, 1]; 1 disables (turning it on/off recompiles, changing the value does not).
    guidance_scale: s in logits = cond + s (cond - uncond); 0 disables guidance and skips the uncond pass
      (turning it on/off recompiles, changing the value does not).
  """
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  guidance_scale: float = 0.0

  def __post_init__(self):
    if not (isinstance(self.temperature, (int, float, np.number)) and math.isfinite(self.temperature)
            and self.temperature >= 0):
      raise ValueError(f'temperature must be a finite number >= 0, got {self.temperature!r}')
    if not isinstance(self.top_k, (int, np.integer)) or isinstance(self.top_k, bool) or self.top_k < 0:
      raise ValueError(f'top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}')
    if not (isinstance(self.top_p, (int, float, np.number)) and 0.0 < self.top_p <= 1.0):
      raise ValueError(f'top_p must lie in (0, 1] (1 disables it), got {self.top_p!r}')
    if not (isinstance(self.guidance_scale, (int, float, np.number)) and math.isfinite(self.guidance_scale)):
      raise ValueError(f'guidance_scale must be a finite number, got {self.guidance_scale!r}')

  def sampler(self) -> 'Sampler':
    """The traced form used inside jitted code."""
    return Sampler(temperature=jnp.float32(self.temperature), top_p=jnp.float32(self.top_p),
                   guidance_scale=jnp.float32(self.guidance_scale), top_k=int(self.top_k),
                   guided=self.guidance_scale != 0, nucleus=self.top_p < 1.0)


@flax.struct.dataclass
class Sampler:
  """Traced sampling settings (float32 scalars) plus the static switches that shape the computation."""
  temperature: Array
  top_p: Array
  guidance_scale: Array
  top_k: int = flax.struct.field(pytree_node=False, default=0)
  guided: bool = flax.struct.field(pytree_node=False, default=False)
  nucleus: bool = flax.struct.field(pytree_node=False, default=False)


def guide_logits(cond_logits: Array, uncond_logits: Array, scale: Array) -> Array:
  """Classifier-free guidance: cond + scale * (cond - uncond); scale 0 is the conditional model alone."""
  return cond_logits + scale * (cond_logits - uncond_logits)


def filter_top_k(logits: Array, k: int) -> Array:
  """Sets all but the k largest logits along the last axis to -inf (ties at the k-th value are kept); k static."""
  k = min(int(k), logits.shape[-1])
  if k < 1:
    raise ValueError(f'top_k must be >= 1 here, got {k}')
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits < kth, -jnp.inf, logits)


def filter_top_p(logits: Array, p: Array) -> Array:
  """Nucleus filtering: keeps the smallest prefix of the sorted codes whose probability mass reaches p (>= 1 code)."""
  sorted_logits = -jnp.sort(-logits, axis=-1)  # descending
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep = jnp.maximum(jnp.sum(mass_before < p, axis=-1, keepdims=True), 1)
  cutoff = jnp.take_along_axis(sorted_logits, keep - 1, axis=-1)
  return jnp.where(logits < cutoff, -jnp.inf, logits)


def sample_logits(logits: Array, noise: Array, sampler: Sampler) -> tuple[Array, Array]:
  """Temperature, top-k, top-p, then Gumbel-max sampling (argmax when the temperature is 0).

  Args:
    logits: float [..., K] (already guided).
    noise: float [..., K] standard Gumbel noise.
    sampler: the phase's `Sampler`.

  Returns:
    (codes int32 [...], log-probability float32 [...] of each code under the filtered, tempered distribution).
  """
  chex.assert_equal_shape([logits, noise])
  greedy = sampler.temperature <= 0
  scaled = logits.astype(jnp.float32) / jnp.where(greedy, 1.0, sampler.temperature)
  if sampler.top_k:
    scaled = filter_top_k(scaled, sampler.top_k)
  if sampler.nucleus:
    scaled = filter_top_p(scaled, sampler.top_p)
  codes = jnp.argmax(jnp.where(greedy, scaled, scaled + noise), axis=-1).astype(jnp.int32)
  logprob = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), codes[..., None], axis=-1)[..., 0]
  return codes, logprob


def gumbel_noise(step_key: Array, positions: Array, depth: int, num_codes: int) -> Array:
  """Gumbel noise of sample b, position positions[b, u], depth d: float32 [B, U, K].

  The noise depends only on (step_key, b, position, depth), never on the slot u, so for a threefry `step_key` (the
  samplers derive one) a sampler that gathers a subset of positions and one that samples all N positions draw
  identical numbers.
  """
  chex.assert_rank(positions, 2)

  def one(sample_key: Array, position: Array) -> Array:
    key = jax.random.fold_in(jax.random.fold_in(sample_key, position), depth)
    return jax.random.gumbel(key, (num_codes,), jnp.float32)

  sample_keys = jax.vmap(lambda b: jax.random.fold_in(step_key, b))(jnp.arange(positions.shape[0]))
  return jax.vmap(jax.vmap(one, in_axes=(None, 0)))(sample_keys, positions)


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


def _null_cond(model: Any, cond: Array) -> Array:
  return jnp.full_like(cond, model.num_classes)


def _sample_stacks(model: Any, variables: PyTree, codebook: Array, codes: Array, mask: Array, cond: Array,
                   positions: Array, step_key: Array, sampler: Sampler) -> tuple[Array, Array]:
  """One spatial pass over the masked map, then D depth passes on the gathered positions only.

  Args:
    codes: int32 [B, N, D]; mask: bool [B, N] ([MASK] positions); cond: int32 [B, L].
    positions: int32 [B, U], positions whose stacks are sampled.

  Returns:
    (stacks int32 [B, U, D], log-probability float32 [B, U] of each sampled stack).
  """
  batch, _, depth = codes.shape
  if sampler.guided:  # cond and uncond branches in one batched pass
    codes, mask, positions_in = (jnp.concatenate([x, x]) for x in (codes, mask, positions))
    cond = jnp.concatenate([cond, _null_cond(model, cond)])
  else:
    positions_in = positions
  h = model.apply(variables, codes, mask, cond, codebook, method=model.spatial)  # [B', N, W]
  h = jnp.take_along_axis(h, positions_in[..., None], axis=1)  # [B', U, W]
  stacks = jnp.zeros(positions.shape + (depth,), jnp.int32)
  logprob = jnp.zeros(positions.shape, jnp.float32)
  num_codes = codebook.shape[0]
  for d in range(depth):  # D is small and static; pass d runs the causal prefix of depths 0..d
    stacks_in = jnp.concatenate([stacks, stacks]) if sampler.guided else stacks
    logits = model.apply(variables, h, stacks_in, codebook, at=d, method=model.depth)  # [B', U, K]
    if sampler.guided:
      logits = guide_logits(logits[:batch], logits[batch:], sampler.guidance_scale)
    code, lp = sample_logits(logits, gumbel_noise(step_key, positions, d, num_codes), sampler)
    stacks = stacks.at[:, :, d].set(code)
    logprob = logprob + lp
  return stacks, logprob


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


def _split_rng(rng: Array) -> tuple[Array, Array, Array]:
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
  k_part, k_samp, k_conf = _split_rng(rng)
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


# ----------------------------------------------------------------------------------------------------------------
# Host-side validation and public entry points.


def _variables(params: PyTree) -> dict[str, PyTree]:
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


def _prepare(model: Any, codebook: Any, cond: Any, codes: Any, region: Any, *, t_draft: int, t_revise: int,
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
    cond: int [B, L] condition ids in [0, num_classes] (num_classes = no condition); checked on the host.
    rng: PRNG key.
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
  codebook, cond, codes, region, draft_s, revise_s, plan = _prepare(
      model, codebook, cond, None, None, t_draft=t_draft, t_revise=t_revise, num_revisions=num_revisions,
      draft=draft, revise=revise, draft_mode=draft_mode, confidence_noise=confidence_noise,
      return_history=return_history)
  out, history = _decode(model, _variables(params), codebook, cond, rng, codes, region, draft_s, revise_s, plan=plan)
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
  codebook, cond, codes, region, draft_s, revise_s, plan = _prepare(
      model, codebook, cond, codes, region, t_draft=t_draft, t_revise=t_revise, num_revisions=num_revisions,
      draft=draft, revise=revise, draft_mode=draft_mode, confidence_noise=confidence_noise,
      return_history=return_history)
  out, history = _decode(model, _variables(params), codebook, cond, rng, codes, region, draft_s, revise_s, plan=plan)
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
  return _update_step(model, _variables(params), codebook, state, cond, partition, step, step_key, sampler,
                      max_updates)


@functools.partial(jax.jit, static_argnames=('model', 'num_steps', 'max_updates'))
def update_pass(model: Any, params: PyTree, codebook: Array, state: DecodeState, cond: Array, partition: Array,
                pass_key: Array, sampler: Sampler, *, num_steps: int, max_updates: int) -> DecodeState:
  """Jitted UPDATE (Algorithm 1): `num_steps` update steps over `partition`; step t uses fold_in(pass_key, t)."""
  chex.assert_rank([state.codes, state.known, cond, partition], [3, 2, 2, 2])
  return _update_pass(model, _variables(params), codebook, state, cond, partition, pass_key, sampler, num_steps,
                      max_updates)


# ----------------------------------------------------------------------------------------------------------------
# Plain reference implementation (tests and benchmark).


@functools.partial(jax.jit, static_argnames=('model',))
def _reference_step(model: Any, variables: PyTree, codebook: Array, codes: Array, known: Array, cond: Array,
                    chosen: Array, step_key: Array, sampler: Sampler) -> tuple[Array, Array]:
  """Spatial pass and D depth passes over ALL N positions, then keep the chosen ones."""
  batch, n, depth = codes.shape
  mask = chosen | ~known
  if sampler.guided:
    h = model.apply(variables, jnp.concatenate([codes, codes]), jnp.concatenate([mask, mask]),
                    jnp.concatenate([cond, _null_cond(model, cond)]), codebook, method=model.spatial)
  else:
    h = model.apply(variables, codes, mask, cond, codebook, method=model.spatial)
  positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))
  stacks = jnp.zeros((batch, n, depth), jnp.int32)
  for d in range(depth):
    stacks_in = jnp.concatenate([stacks, stacks]) if sampler.guided else stacks
    logits = model.apply(variables, h, stacks_in, codebook, at=d, method=model.depth)
    if sampler.guided:
      logits = guide_logits(logits[:batch], logits[batch:], sampler.guidance_scale)
    code, _ = sample_logits(logits, gumbel_noise(step_key, positions, d, codebook.shape[0]), sampler)
    stacks = stacks.at[:, :, d].set(code)
  return jnp.where(chosen[..., None], stacks, codes), known | chosen


def reference_draft_and_revise(model: Any, params: PyTree, codebook: Array, cond: Array, rng: Array, *,
                               t_draft: int, t_revise: int, num_revisions: int, draft: PhaseSettings,
                               revise: PhaseSettings, codes: Optional[Array] = None, region: Optional[Array] = None,
                               return_history: bool = False) -> Array | tuple[Array, Array]:
  """Plain Draft-and-Revise: a Python loop over UPDATE steps, each a full spatial + depth pass over all N positions.

  Consumes the same random numbers as `draft_and_revise` / `inpaint` (random draft mode) and returns the same codes.
  With `codes` and `region` given it is the reference of `inpaint`.
  """
  codebook, cond, codes, region, draft_s, revise_s, plan = _prepare(
      model, codebook, cond, codes, region, t_draft=t_draft, t_revise=t_revise, num_revisions=num_revisions,
      draft=draft, revise=revise, draft_mode='random', confidence_noise=0.0, return_history=return_history)
  variables = _variables(params)
  k_part, k_samp, _ = _split_rng(rng)
  state = init_state(codes, region)
  codes, known = state.codes, state.known
  history = []
  for phase in range(plan.num_revisions + 1):
    num_steps, sampler = (plan.t_draft, draft_s) if phase == 0 else (plan.t_revise, revise_s)
    partition = region_partitions(jax.random.fold_in(k_part, phase), region, num_steps)
    pass_key = jax.random.fold_in(k_samp, phase)
    for t in range(num_steps):
      codes, known = _reference_step(model, variables, codebook, codes, known, cond, partition == t,
                                     jax.random.fold_in(pass_key, t), sampler)
    history.append(codes)
  return (codes, jnp.stack(history)) if return_history else codes


__all__ = ['DRAFT_MODES', 'DecodeState', 'PhaseSettings', 'Sampler', 'confidence_draft', 'draft_and_revise',
           'filter_top_k', 'filter_top_p', 'guide_logits', 'gumbel_noise', 'init_state', 'inpaint',
           'random_partitions', 'reference_draft_and_revise', 'region_partitions', 'sample_logits', 'update_pass',
           'update_step']
