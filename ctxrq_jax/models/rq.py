"""Residual quantization (RQ) as pure functions of arrays (paper §3.1, eqs. 1-3).

A vector z in R^{n_z} is represented by a code stack (k_1, ..., k_D) from ONE codebook shared by all depths:
r_0 = z, k_d = argmin_k ||r_{d-1} - e(k)||^2, r_d = r_{d-1} - e(k_d). The d-th partial sum e(k_1) + ... + e(k_d)
approximates z ever more finely; D = 1 is plain VQ.

The codebook is not a gradient-trained parameter: it follows exponential moving averages (EMA) of the vectors
assigned to each code, with Laplace smoothing of the counts and restarts of dead codes, kept in a `CodebookState`
and updated by `ema_update` / `restart_dead_codes` outside the gradient: once per step on all depths' assignments, or
after each depth during the quantization itself as the PyTorch reference does (`rq_quantize_updating`).
"""

from __future__ import annotations

import dataclasses
import math

import chex
import flax
import jax
import jax.numpy as jnp

DEFAULT_CHUNK_SIZE = 2048


def _check_codebook(codebook: jax.Array, n_z: int) -> None:
  if codebook.ndim != 2:
    raise ValueError(f"codebook must be [K, n_z], got shape {codebook.shape}")
  if codebook.shape[1] != n_z:
    raise ValueError(f"vector size {n_z} does not match codebook embedding size {codebook.shape[1]}")


def nearest_code(z: jax.Array, codebook: jax.Array, chunk_size: int = DEFAULT_CHUNK_SIZE) -> jax.Array:
  """Index of the nearest code embedding (eq. 1), ties broken towards the lowest index.

  The vectors are flattened and processed `chunk_size` at a time with `lax.map`, so the distance matrix held at
  once is at most [chunk_size, K] float32 (128 MiB for K = 16384 at the default 2048) however large the batch.

  Args:
    z: [..., n_z] vectors.
    codebook: [K, n_z] code embeddings.
    chunk_size: number of vectors whose distances are computed together.

  Returns:
    int32 [...] code indices.
  """
  _check_codebook(codebook, z.shape[-1])
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}")
  batch_shape, n_z = z.shape[:-1], z.shape[-1]
  flat = z.reshape(-1, n_z).astype(jnp.float32)
  m = flat.shape[0]
  if m == 0:
    return jnp.zeros(batch_shape, jnp.int32)
  codebook = codebook.astype(jnp.float32)
  e_sq = jnp.sum(codebook**2, axis=-1)  # [K]

  def chunk_codes(v: jax.Array) -> jax.Array:  # [c, n_z] -> [c]
    # HIGHEST precision: a bf16 matmul pass (TPU default) can flip the argmin between close codes.
    cross = jnp.matmul(v, codebook.T, precision=jax.lax.Precision.HIGHEST)
    dist = jnp.sum(v**2, axis=-1, keepdims=True) + e_sq[None, :] - 2.0 * cross
    return jnp.argmin(dist, axis=-1).astype(jnp.int32)

  c = min(chunk_size, m)
  num_chunks = -(-m // c)
  padded = jnp.pad(flat, ((0, num_chunks * c - m), (0, 0)))
  codes = jax.lax.map(chunk_codes, padded.reshape(num_chunks, c, n_z))
  return codes.reshape(-1)[:m].reshape(batch_shape)


def rq_quantize(
    z: jax.Array, codebook: jax.Array, depth: int, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[jax.Array, jax.Array]:
  """Residual quantization of z with one shared codebook (eqs. 2-3).

  No gradient flows to z (the argmin is not differentiable); partial sums are differentiable w.r.t. the codebook.

  Args:
    z: [..., n_z] vectors.
    codebook: [K, n_z].
    depth: D, the number of codes per vector.
    chunk_size: see `nearest_code`.

  Returns:
    codes: int32 [..., D].
    partial_sums: [..., D, n_z] (float32); partial_sums[..., d, :] = e(k_1) + ... + e(k_{d+1}).
  """
  if depth < 1:
    raise ValueError(f"RQ depth must be >= 1, got {depth}")
  _check_codebook(codebook, z.shape[-1])
  codebook = codebook.astype(jnp.float32)
  residual = jax.lax.stop_gradient(z.astype(jnp.float32))
  partial = jnp.zeros_like(residual)
  codes, sums = [], []
  for _ in range(depth):  # static, D <= 8
    k = nearest_code(residual, codebook, chunk_size)
    e = jnp.take(codebook, k, axis=0)
    residual = residual - jax.lax.stop_gradient(e)
    partial = partial + e
    codes.append(k)
    sums.append(partial)
  return jnp.stack(codes, axis=-1), jnp.stack(sums, axis=-2)


def embed_codes(codes: jax.Array, codebook: jax.Array) -> jax.Array:
  """Quantized vector of a code stack: the sum of its code embeddings.

  Args:
    codes: int [..., D].
    codebook: [K, n_z].

  Returns:
    [..., n_z] (codebook dtype).
  """
  if codebook.ndim != 2:
    raise ValueError(f"codebook must be [K, n_z], got shape {codebook.shape}")
  return jnp.sum(jnp.take(codebook, codes, axis=0), axis=-2)


def residuals(z: jax.Array, partial_sums: jax.Array) -> jax.Array:
  """The vectors each depth quantized: r_{d-1} = z - (partial sum of depth d-1), r_0 = z.

  These (paired with the codes) are what the EMA codebook update averages.

  Args:
    z: [..., n_z].
    partial_sums: [..., D, n_z] from `rq_quantize`.

  Returns:
    [..., D, n_z] float32.
  """
  chex.assert_equal_shape_prefix([z, partial_sums], z.ndim - 1)
  z = jax.lax.stop_gradient(z.astype(jnp.float32))[..., None, :]
  previous = jnp.concatenate(
      [jnp.zeros_like(partial_sums[..., :1, :]), partial_sums[..., :-1, :]], axis=-2
  )
  return z - jax.lax.stop_gradient(previous.astype(jnp.float32))


def straight_through(z: jax.Array, z_q: jax.Array) -> jax.Array:
  """Forward value z_q, gradient of the identity to z. Shapes [..., n_z]."""
  chex.assert_equal_shape([z, z_q])
  return z + jax.lax.stop_gradient(z_q.astype(z.dtype) - z)


def commitment_loss(z: jax.Array, partial_sums: jax.Array) -> jax.Array:
  """Mean over depths of mean((z - sg(partial_sum_d))^2), as the reference RQ-VAE computes it.

  Args:
    z: [..., n_z] encoder output (gets the gradient).
    partial_sums: [..., D, n_z].

  Returns:
    scalar float32.
  """
  chex.assert_equal_shape_prefix([z, partial_sums], z.ndim - 1)
  diff = z.astype(jnp.float32)[..., None, :] - jax.lax.stop_gradient(partial_sums.astype(jnp.float32))
  # Mean over all elements == mean over depths of the per-depth element means (equal sizes per depth).
  return jnp.mean(diff**2)


@flax.struct.dataclass
class CodebookState:
  """EMA codebook. codebook [K, n_z]; cluster_size_ema [K]; embed_ema [K, n_z] (all float32)."""

  codebook: jax.Array
  cluster_size_ema: jax.Array
  embed_ema: jax.Array

  @classmethod
  def create(cls, codebook: jax.Array, cluster_size: float = 1.0) -> "CodebookState":
    """Initial state: EMA counts all `cluster_size`, EMA sums = the embeddings.

    The reference RQ-VAE starts its counts at 0 (`torch.zeros(n_embed)` in quantizations.py) with the sums equal to
    the embeddings: every count is then below 1 after the first update unless a code drew >= 1 / (1 - decay)
    vectors, so the first restart re-seeds nearly every code from the batch. Counts of 1 instead make the initial
    state a fixed point of smoothing (the smoothed mean is the codebook) and keep the random codebook until codes die.
    Config: `quantizer.init_cluster_size`.
    """
    codebook = jnp.asarray(codebook, jnp.float32)
    if codebook.ndim != 2:
      raise ValueError(f"codebook must be [K, n_z], got shape {codebook.shape}")
    if cluster_size < 0:
      raise ValueError(f"initial cluster size must be >= 0, got {cluster_size}")
    return cls(codebook=codebook, cluster_size_ema=jnp.full(codebook.shape[:1], cluster_size, jnp.float32),
               embed_ema=codebook)


def _check_state(state: CodebookState) -> tuple[int, int]:
  k, n_z = state.codebook.shape
  chex.assert_shape(state.cluster_size_ema, (k,))
  chex.assert_shape(state.embed_ema, (k, n_z))
  return k, n_z


def smoothed_codebook(cluster_size_ema: jax.Array, embed_ema: jax.Array, eps: float) -> jax.Array:
  """embed_ema / Laplace-smoothed counts, n (c + eps) / (n + K eps) with n = sum(c). Shapes [K], [K, n_z]."""
  k = cluster_size_ema.shape[0]
  n = jnp.sum(cluster_size_ema)
  counts = n * (cluster_size_ema + eps) / (n + k * eps)
  return embed_ema / counts[:, None]


def ema_update(
    state: CodebookState, vectors: jax.Array, codes: jax.Array, decay: float, eps: float
) -> CodebookState:
  """One EMA step of the codebook on a batch of (vector, assigned code) pairs.

  c <- decay c + (1 - decay) count(k);  s <- decay s + (1 - decay) sum of vectors assigned to k;
  codebook <- s / (Laplace-smoothed c).

  Given the residuals of ALL depths (`residuals(z, partial_sums)`) with their codes, flattened, it pools the D depths'
  assignments into ONE update per training step (`quantizer.codebook_update='per_step'`): the forward pass stays
  free of state, per-step counts are ~D times larger and the decay is applied once rather than D times. The PyTorch
  reference instead updates the shared codebook once per depth inside its forward pass (`rq_quantize_updating`,
  'per_depth', which calls this on one depth's pairs at a time).

  Args:
    state: current `CodebookState`.
    vectors: [M, n_z] vectors (any batch/depth layout flattened).
    codes: int [M] codes assigned to them.
    decay: EMA decay in [0, 1).
    eps: Laplace smoothing constant.

  Returns:
    the new `CodebookState`.
  """
  k, n_z = _check_state(state)
  chex.assert_rank([vectors, codes], [2, 1])
  chex.assert_equal_shape_prefix([vectors, codes], 1)
  if vectors.shape[1] != n_z:
    raise ValueError(f"vectors have size {vectors.shape[1]}, the codebook {n_z}")
  vectors = jax.lax.stop_gradient(vectors.astype(jnp.float32))
  # segment_sum instead of a [M, K] one-hot: M * K is 2^29 floats for a 256-image batch at K = 16384.
  counts = jax.ops.segment_sum(jnp.ones(codes.shape, jnp.float32), codes, num_segments=k)
  sums = jax.ops.segment_sum(vectors, codes, num_segments=k)
  cluster_size_ema = decay * state.cluster_size_ema + (1.0 - decay) * counts
  embed_ema = decay * state.embed_ema + (1.0 - decay) * sums
  return CodebookState(
      codebook=smoothed_codebook(cluster_size_ema, embed_ema, eps),
      cluster_size_ema=cluster_size_ema,
      embed_ema=embed_ema,
  )


def _candidate_vectors(vectors: jax.Array, k: int, rng: jax.Array) -> jax.Array:
  """k random distinct rows of `vectors` [M, n_z]; when M < k, of its tiling with small noise (uniform in
  [0, 0.01 / sqrt(n_z)) per coordinate, as the reference's `_tile_with_noise`)."""
  m, n_z = vectors.shape
  noise_rng, perm_rng = jax.random.split(rng)
  if m < k:
    repeats = -(-k // m)
    vectors = jnp.tile(vectors, (repeats, 1))
    # Noise keeps the copies of one vector apart, so restarted codes do not stay identical.
    vectors = vectors + (0.01 / math.sqrt(n_z)) * jax.random.uniform(noise_rng, vectors.shape, vectors.dtype)
  idx = jax.random.permutation(perm_rng, vectors.shape[0])[:k]
  return jnp.take(vectors, idx, axis=0)


def restart_dead_codes(state: CodebookState, vectors: jax.Array, rng: jax.Array, eps: float = 1e-5) -> CodebookState:
  """Restarts codes whose EMA count fell below 1 at random batch vectors.

  Dead code i takes a random vector v_i of the batch (without replacement; the batch is tiled with small noise if it
  has fewer than K vectors): cluster_size_ema[i] = 1, embed_ema[i] = v_i. EMA statistics of live codes are left
  untouched. The codebook is then recomputed from the EMA statistics as in `ema_update` (like the reference, which
  restarts before renormalizing; live embeddings move only through the total count n of the smoothing).

  Args:
    state: `CodebookState`, usually right after `ema_update`.
    vectors: [M, n_z] batch vectors (e.g. the flattened residuals given to `ema_update`).
    rng: PRNG key.
    eps: Laplace smoothing constant (the one given to `ema_update`).

  Returns:
    the new `CodebookState`.
  """
  k, n_z = _check_state(state)
  chex.assert_rank(vectors, 2)
  if vectors.shape[0] == 0:
    raise ValueError("restart_dead_codes needs at least one vector")
  if vectors.shape[1] != n_z:
    raise ValueError(f"vectors have size {vectors.shape[1]}, the codebook {n_z}")
  vectors = jax.lax.stop_gradient(vectors.astype(jnp.float32))
  random_vectors = _candidate_vectors(vectors, k, rng)  # [K, n_z]
  dead = state.cluster_size_ema < 1.0
  cluster_size_ema = jnp.where(dead, 1.0, state.cluster_size_ema)
  embed_ema = jnp.where(dead[:, None], random_vectors, state.embed_ema)
  return CodebookState(
      codebook=smoothed_codebook(cluster_size_ema, embed_ema, eps),
      cluster_size_ema=cluster_size_ema,
      embed_ema=embed_ema,
  )


@dataclasses.dataclass(frozen=True)
class EmaSettings:
  """How the codebook follows the data: EMA `decay` in [0, 1), Laplace `eps`, and whether dead codes `restart`."""

  decay: float
  eps: float
  restart: bool


def rq_quantize_updating(
    z: jax.Array, state: CodebookState, depth: int, decay: float, eps: float, restart_rng: jax.Array | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[jax.Array, jax.Array, CodebookState]:
  """Residual quantization that updates the EMA codebook after each depth: the PyTorch reference's training forward.

  Depth d = 1..D: k_d = nearest code of r_{d-1} in the current codebook; the EMA statistics take the pairs
  (r_{d-1}, k_d) (`ema_update`, then `restart_dead_codes` on r_{d-1} when `restart_rng` is given); the quantized
  vector e(k_d) is looked up BEFORE this depth's update, as the reference embeds before it renormalizes, and
  r_d = r_{d-1} - e(k_d). So depth d's codes are found with the codebook that depths 1..d-1 of this batch moved, the
  decay acts D times per call and the counts are per depth. `ema_update` with `residuals` is the pooled alternative
  (one update per step, the codebook fixed during the forward pass).

  Nothing here is differentiable (the codebook is not a gradient-trained parameter): the outputs are constants to the
  caller's gradient, which reaches z through `straight_through` and `commitment_loss`.

  Args:
    z: [..., n_z] vectors.
    state: the `CodebookState` before this batch.
    depth: D.
    decay: EMA decay in [0, 1).
    eps: Laplace smoothing constant.
    restart_rng: PRNG key for the dead-code restarts (depth d uses `fold_in(restart_rng, d)`); None: no restarts.
    chunk_size: see `nearest_code`.

  Returns:
    codes: int32 [..., D].
    partial_sums: [..., D, n_z] float32, the sums of the embeddings each depth looked up.
    state: the `CodebookState` after the D updates.
  """
  if depth < 1:
    raise ValueError(f"RQ depth must be >= 1, got {depth}")
  _, n_z = _check_state(state)
  _check_codebook(state.codebook, z.shape[-1])
  residual = jax.lax.stop_gradient(z.astype(jnp.float32))
  flat_shape = (-1, n_z)
  partial = jnp.zeros_like(residual)
  codes, sums = [], []
  for d in range(depth):  # static, D <= 8
    k = nearest_code(residual, state.codebook, chunk_size)
    e = jnp.take(state.codebook, k, axis=0)
    vectors = residual.reshape(flat_shape)
    state = ema_update(state, vectors, k.reshape(-1), decay, eps)
    if restart_rng is not None:
      state = restart_dead_codes(state, vectors, jax.random.fold_in(restart_rng, d), eps)
    residual = residual - e
    partial = partial + e
    codes.append(k)
    sums.append(partial)
  state = jax.tree.map(jax.lax.stop_gradient, state)
  return jnp.stack(codes, axis=-1), jax.lax.stop_gradient(jnp.stack(sums, axis=-2)), state


def codebook_stats(codes: jax.Array, codebook_size: int, prefix: str = "") -> dict[str, jax.Array]:
  """Per-depth fraction of the K codes used and perplexity exp(H) of the code histogram.

  Args:
    codes: int [..., D].
    codebook_size: K.
    prefix: prepended to the metric names.

  Returns:
    {f'{prefix}usage_d{d}', f'{prefix}perplexity_d{d}'} float32 scalars for d = 1..D.
  """
  depth = codes.shape[-1]
  flat = codes.reshape(-1, depth)
  out = {}
  for d in range(depth):  # static, D <= 8
    counts = jnp.zeros((codebook_size,), jnp.float32).at[flat[:, d]].add(1.0)
    p = counts / jnp.sum(counts)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    out[f"{prefix}usage_d{d + 1}"] = jnp.mean((counts > 0).astype(jnp.float32))
    out[f"{prefix}perplexity_d{d + 1}"] = jnp.exp(entropy)
  return out
