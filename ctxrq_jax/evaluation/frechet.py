"""Sample-quality metrics on Inception features, as the ADM evaluator (openai/guided-diffusion
`evaluations/evaluator.py`) defines them: Fréchet distance (FID, sFID), Inception Score and improved
precision/recall. Pure numpy; every tunable number is an argument whose default is ADM's.

- `FeatureStats`: mean and covariance (ddof 1, like `np.cov`) accumulated batch by batch in float64 with Chan et
  al.'s pairwise update, so 50,000 x 2048 features never need to be held at once and a large mean does not cancel.
- `frechet_distance`: ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}), float64.
- `inception_score`: exp(E_x KL(p(y|x) || p(y))) per split of `split_size` samples (ADM: 5,000, so 10 splits of
  50,000 samples), averaged over splits.
- `precision_recall`: Kynkäänniemi et al. (2019) with k = 3: a point's radius is its distance to the k-th nearest
  point of its own set (itself excluded); precision = fraction of samples inside some reference ball, recall =
  fraction of references inside some sample ball. Distances are computed in [row_batch_size, col_batch_size] blocks
  (memory O(block^2), never [N, M]).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, NamedTuple, Optional

import numpy as np
import scipy.linalg

# ADM's defaults.
IS_SPLIT_SIZE = 5000
# The Inception Score's splits are consecutive rows, which assumes a random order (ADM's samplers draw random
# classes). `sample` writes its npz sorted by class, where a split of 5,000 would hold 100 of ImageNet's 1,000 classes
# and score at most ~100 however good the samples; the official RQ-Transformer evaluation shuffles before splitting.
# The evaluator shuffles the rows with this seed first (reproducible), unless asked to keep the file's order.
IS_SHUFFLE_SEED = 0
PR_NEIGHBOURS = 3
PR_BLOCK_SIZE = 10000
FID_EPS = 1e-6


# ----------------------------------------------------------------------------------------------------------------
# Feature statistics.


@dataclasses.dataclass
class FeatureStats:
  """Running mean and scatter of feature vectors (float64); `update` batch by batch, `merge` across workers.

  Attributes:
    dim: feature dimension.
    count: vectors seen.
    mean: [dim] float64.
    scatter: [dim, dim] float64, sum of (x - mean)(x - mean)^T over the vectors seen.
  """

  dim: int
  count: int = 0
  mean: Optional[np.ndarray] = None
  scatter: Optional[np.ndarray] = None

  def __post_init__(self):
    if self.mean is None:
      self.mean = np.zeros(self.dim, np.float64)
    if self.scatter is None:
      self.scatter = np.zeros((self.dim, self.dim), np.float64)

  def update(self, features: np.ndarray) -> "FeatureStats":
    """Adds a batch [B, dim] (any float dtype; promoted to float64)."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[1] != self.dim:
      raise ValueError(f"features must be [B, {self.dim}], got {x.shape}")
    if not np.all(np.isfinite(x)):
      raise ValueError("features contain NaN or infinity")
    if len(x) == 0:
      return self
    mean = x.mean(axis=0)
    centred = x - mean
    self._combine(len(x), mean, centred.T @ centred)
    return self

  def merge(self, other: "FeatureStats") -> "FeatureStats":
    """Adds another accumulator's vectors (e.g. from another host)."""
    if other.dim != self.dim:
      raise ValueError(f"cannot merge statistics of dimension {other.dim} into {self.dim}")
    if other.count:
      self._combine(other.count, other.mean, other.scatter)
    return self

  def _combine(self, n: int, mean: np.ndarray, scatter: np.ndarray) -> None:
    total = self.count + n
    delta = mean - self.mean
    self.scatter = self.scatter + scatter + np.outer(delta, delta) * (self.count * n / total)
    self.mean = self.mean + delta * (n / total)
    self.count = total

  @property
  def mu(self) -> np.ndarray:
    """Mean [dim], float64."""
    if self.count < 1:
      raise ValueError("no features accumulated")
    return self.mean.copy()

  @property
  def sigma(self) -> np.ndarray:
    """Unbiased covariance [dim, dim] (ddof 1, like `np.cov(x, rowvar=False)`), float64."""
    if self.count < 2:
      raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
    return self.scatter / (self.count - 1)

  @classmethod
  def from_features(cls, features: np.ndarray, *, batch_size: int = 10000) -> "FeatureStats":
    features = np.asarray(features)
    if features.ndim != 2:
      raise ValueError(f"features must be [N, dim], got {features.shape}")
    stats = cls(features.shape[1])
    for i in range(0, len(features), batch_size):
      stats.update(features[i:i + batch_size])
    return stats


# ----------------------------------------------------------------------------------------------------------------
# Fréchet distance.


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh((a + a.T) / 2)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, *, method: str = "svd",
                       eps: float = FID_EPS) -> float:
  """tr((S1 S2)^{1/2}) for covariance matrices S1, S2 [d, d] (float64).

  method='svd' (default): S1 S2 is similar to S1^{1/2} S2 S1^{1/2} = (S1^{1/2} S2^{1/2})(S1^{1/2} S2^{1/2})^T, so
    the trace is the sum of the singular values of S1^{1/2} S2^{1/2} (symmetric square roots by eigh, negative
    round-off clipped). Real arithmetic throughout, and no square root of a round-off-sized eigenvalue, so singular
    covariances (N < d) stay accurate: identical statistics give 0 to ~1e-12 relative.
  method='sqrtm': scipy.linalg.sqrtm(S1 S2) as pytorch-fid and the ADM evaluator do; when the result is not finite,
    `eps` is added to both diagonals and it is retried; an imaginary part above 1e-3 on the diagonal is an error.
  """
  s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if method == "svd":
    if s2 is s1 or np.array_equal(s1, s2):
      # S^{1/2} S^{1/2} = S: the singular values are S's eigenvalues (negative round-off clipped, as above), so no
      # eigenvectors and no SVD are needed (4-5x less work at d = 2048).
      return float(np.sum(np.clip(np.linalg.eigvalsh((s1 + s1.T) / 2), 0, None)))
    a = _sqrt_psd(s1)
    return float(np.sum(np.linalg.svd(a @ _sqrt_psd(s2), compute_uv=False)))
  if method == "sqrtm":
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.all(np.isfinite(covmean)):
      offset = np.eye(s1.shape[0]) * eps
      covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
      if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
        raise ValueError(f"sqrtm(S1 S2) has an imaginary component {np.max(np.abs(covmean.imag)):g}")
      covmean = covmean.real
    return float(np.trace(covmean))
  raise ValueError(f"method must be 'svd' or 'sqrtm', got {method!r}")


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *,
                     method: str = "svd", eps: float = FID_EPS) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

  Args:
    mu1, mu2: means [d].
    sigma1, sigma2: covariances [d, d].
    method, eps: see `trace_sqrt_product`.

  Returns:
    ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^{1/2}) as a Python float (can be a tiny
    negative number from round-off when the two are equal).
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or mu1.ndim != 1:
    raise ValueError(f"means must be vectors of one length, got {mu1.shape} and {mu2.shape}")
  d = mu1.shape[0]
  if sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(f"covariances must be [{d}, {d}], got {sigma1.shape} and {sigma2.shape}")
  diff = mu1 - mu2
  tr = trace_sqrt_product(sigma1, sigma2, method=method, eps=eps)
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr)


def stats_distance(a: FeatureStats, b: FeatureStats, **kwargs) -> float:
  return frechet_distance(a.mu, a.sigma, b.mu, b.sigma, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Inception Score.


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  z = logits - logits.max(axis=1, keepdims=True)
  return z - np.log(np.sum(np.exp(z), axis=1, keepdims=True))


def inception_score_splits(logits: np.ndarray, *, split_size: int = IS_SPLIT_SIZE,
                           num_splits: Optional[int] = None, shuffle_seed: Optional[int] = None) -> np.ndarray:
  """Inception Score of each split; see `inception_score`."""
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or len(logits) == 0:
    raise ValueError(f"logits must be [N, classes] with N >= 1, got {logits.shape}")
  if shuffle_seed is not None:
    logits = logits[np.random.default_rng(shuffle_seed).permutation(len(logits))]
  if num_splits is not None:
    if not 1 <= num_splits <= len(logits):
      raise ValueError(f"num_splits must lie in [1, N={len(logits)}], got {num_splits}")
    parts = np.array_split(np.arange(len(logits)), num_splits)
  else:
    if split_size < 1:
      raise ValueError(f"split_size must be >= 1, got {split_size}")
    parts = [np.arange(i, min(i + split_size, len(logits))) for i in range(0, len(logits), split_size)]
  scores = []
  for idx in parts:
    logp = _log_softmax(logits[idx])  # log p(y|x)
    p = np.exp(logp)
    log_py = np.log(np.mean(p, axis=0))  # log p(y) over the split
    kl = np.sum(p * (logp - log_py), axis=1)  # KL(p(y|x) || p(y)) per sample
    scores.append(np.exp(np.mean(kl)))
  return np.asarray(scores)


def inception_score(logits: np.ndarray, *, split_size: int = IS_SPLIT_SIZE, num_splits: Optional[int] = None,
                    shuffle_seed: Optional[int] = None) -> float:
  """Inception Score: the mean over splits of exp(E_x KL(p(y|x) || p(y))).

  Args:
    logits: [N, classes], softmaxed in float64. The ADM evaluator softmaxes the logits WITHOUT the fc bias
      (`FIDInceptionV3`'s `logits_unbiased`); the original improved-GAN code and torch-fidelity's default too.
    split_size: samples per split, consecutive (ADM: 5,000; the last split may be shorter).
    num_splits: instead of `split_size`, this many near-equal consecutive splits (improved-GAN's 10).
    shuffle_seed: if given, the rows are permuted with this seed before splitting (see `IS_SHUFFLE_SEED`); None
      keeps their order, as ADM does.

  Returns:
    The mean score over splits (ADM reports only the mean; `inception_score_splits` gives each split's).
  """
  return float(np.mean(inception_score_splits(logits, split_size=split_size, num_splits=num_splits,
                                             shuffle_seed=shuffle_seed)))


# ----------------------------------------------------------------------------------------------------------------
# Improved precision and recall.


class PrecisionRecall(NamedTuple):
  precision: float
  recall: float


def _sq_norms(x: np.ndarray) -> np.ndarray:
  return np.einsum("ij,ij->i", x, x)


def _sq_distances(u: np.ndarray, v: np.ndarray, nu: np.ndarray, nv: np.ndarray) -> np.ndarray:
  """Squared Euclidean distances [len(u), len(v)] in float32, clipped at 0. (ADM's DistanceBlock computes them in
  float16 first and falls back to float32 only where that overflows, so its precision/recall can differ from these
  in the last digits.)"""
  d = nu[:, None] - 2.0 * (u @ v.T) + nv[None, :]
  return np.maximum(d, 0.0, out=d)


def _as_features(x: np.ndarray, name: str) -> np.ndarray:
  x = np.asarray(x, np.float32)
  if x.ndim != 2 or len(x) == 0:
    raise ValueError(f"{name} must be [N, dim] with N >= 1, got {x.shape}")
  return x


def manifold_radii(features: np.ndarray, *, k: int = PR_NEIGHBOURS, row_batch_size: int = PR_BLOCK_SIZE,
                   col_batch_size: int = PR_BLOCK_SIZE) -> np.ndarray:
  """Squared distance from each feature vector to its k-th nearest neighbour in the same set (itself excluded).

  Args:
    features: [N, dim] with N > k.
    k: neighbourhood size (ADM: 3).
    row_batch_size, col_batch_size: block shape of the distance computation (ADM: 10,000 x 10,000).

  Returns:
    [N] float32 squared radii. As in ADM, the k-th smallest entry after the vector's distance to itself (0) is
    taken, so an exact duplicate counts as a neighbour at distance 0.
  """
  x = _as_features(features, "features")
  n = len(x)
  if not 1 <= k < n:
    raise ValueError(f"k must lie in [1, N - 1] = [1, {n - 1}], got {k}")
  norms = _sq_norms(x)
  radii = np.empty(n, np.float32)
  for r0 in range(0, n, row_batch_size):
    rows = slice(r0, min(r0 + row_batch_size, n))
    best = np.full((rows.stop - r0, 0), np.inf, np.float32)  # the k + 1 smallest distances seen so far, unordered
    for c0 in range(0, n, col_batch_size):
      cols = slice(c0, min(c0 + col_batch_size, n))
      d = _sq_distances(x[rows], x[cols], norms[rows], norms[cols])
      merged = np.concatenate([best, d], axis=1)
      keep = min(k + 1, merged.shape[1])
      best = np.partition(merged, keep - 1, axis=1)[:, :keep]
    radii[rows] = np.partition(best, k, axis=1)[:, k]
  return radii


def precision_recall(reference: np.ndarray, samples: np.ndarray, *, k: int = PR_NEIGHBOURS,
                     row_batch_size: int = PR_BLOCK_SIZE, col_batch_size: int = PR_BLOCK_SIZE,
                     reference_radii: Optional[np.ndarray] = None) -> PrecisionRecall:
  """Improved precision and recall (Kynkäänniemi et al. 2019) of `samples` against `reference`.

  Args:
    reference: [N, dim] features of real images.
    samples: [M, dim] features of generated images.
    k: neighbourhood size for the radii (ADM: 3).
    row_batch_size, col_batch_size: block shape of every distance computation; memory is O(row x col).
    reference_radii: precomputed `manifold_radii(reference, k=k)` to reuse across sample sets.

  Returns:
    (precision: fraction of samples within some reference point's radius, recall: fraction of reference points
    within some sample's radius); "within" is distance <= radius, as in ADM.
  """
  ref = _as_features(reference, "reference")
  smp = _as_features(samples, "samples")
  if ref.shape[1] != smp.shape[1]:
    raise ValueError(f"reference and samples have different feature sizes: {ref.shape[1]} vs {smp.shape[1]}")
  r_ref = (manifold_radii(ref, k=k, row_batch_size=row_batch_size, col_batch_size=col_batch_size)
           if reference_radii is None else np.asarray(reference_radii, np.float32))
  if r_ref.shape != (len(ref),):
    raise ValueError(f"reference_radii must be [{len(ref)}], got {r_ref.shape}")
  r_smp = manifold_radii(smp, k=k, row_batch_size=row_batch_size, col_batch_size=col_batch_size)
  n_ref, n_smp = _sq_norms(ref), _sq_norms(smp)
  sample_in = np.zeros(len(smp), bool)  # inside some reference ball
  ref_in = np.zeros(len(ref), bool)  # inside some sample ball
  for r0 in range(0, len(ref), row_batch_size):
    rows = slice(r0, min(r0 + row_batch_size, len(ref)))
    for c0 in range(0, len(smp), col_batch_size):
      cols = slice(c0, min(c0 + col_batch_size, len(smp)))
      d = _sq_distances(ref[rows], smp[cols], n_ref[rows], n_smp[cols])
      sample_in[cols] |= np.any(d <= r_ref[rows, None], axis=0)
      ref_in[rows] |= np.any(d <= r_smp[None, cols], axis=1)
  return PrecisionRecall(float(np.mean(sample_in)), float(np.mean(ref_in)))


def stats_of_batches(batches: Iterable[np.ndarray], dim: int) -> FeatureStats:
  """FeatureStats over an iterable of [B, dim] batches."""
  stats = FeatureStats(dim)
  for b in batches:
    stats.update(b)
  return stats
