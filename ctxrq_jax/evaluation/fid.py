"""Samples npz vs reference npz -> Inception Score, FID, sFID, precision and recall, as the ADM evaluator reports
them (openai/guided-diffusion `evaluations/evaluator.py`).

  extractor = inception_features.InceptionFeatureExtractor(inception_convert.load_variables(WEIGHTS))
  results = fid.evaluate(extractor, 'samples.npz', 'VIRTUAL_imagenet256_labeled.npz')

Per ADM: the reference's precomputed `mu`/`sigma` (`mu_s`/`sigma_s`) are used for FID (sFID) when the file has
them, otherwise statistics of its `arr_0` images; precision/recall always use the reference images' pool features
(skipped, with None, when the reference has no images); the Inception Score is of the samples alone, over splits of
their rows shuffled with a fixed seed (`frechet.IS_SHUFFLE_SEED`: `sample` writes them sorted by class), on the
softmax of the logits without the fc bias as ADM's graph gives them (kakaobrain's RQ-Transformer code, rqvae/metrics,
adds the bias, so its Inception Scores need not equal these).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Iterable, Optional

import numpy as np

from ctxrq_jax.core import paths
from ctxrq_jax.core import reporting
from ctxrq_jax.evaluation import frechet
from ctxrq_jax.evaluation import inception_features as features_lib

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Activations:
  """Features of one image set.

  Attributes:
    pool: [N, 2048] float32 pool features (kept for precision/recall).
    logits: [N, 1008] float32 unbiased logits (kept for the Inception Score).
    pool_stats: streaming statistics of `pool`.
    spatial_stats: streaming statistics of the sFID features (the features themselves are not kept), or None.
  """

  pool: np.ndarray
  logits: np.ndarray
  pool_stats: frechet.FeatureStats
  spatial_stats: Optional[frechet.FeatureStats]

  @property
  def count(self) -> int:
    return len(self.pool)


def compute_activations(extractor: features_lib.InceptionFeatureExtractor, batches: Iterable[np.ndarray],
                        *, progress=None, stats_every: int = 4096) -> Activations:
  """Runs `extractor` over uint8 image batches; `progress(images_done)` is called after each batch if given.

  sFID features are folded into their statistics every `stats_every` rows and dropped, so memory holds the pool
  features and logits of all images but only a chunk of the spatial ones.
  """
  pools, logits, pending = [], [], []
  spatial_stats = None
  done = 0

  def flush():
    nonlocal spatial_stats
    if pending:
      chunk = np.concatenate(pending)
      pending.clear()
      if spatial_stats is None:
        spatial_stats = frechet.FeatureStats(chunk.shape[1])
      spatial_stats.update(chunk)

  for out in extractor.iter_batches(batches):
    pools.append(out["pool"])
    logits.append(out["logits"])
    if "spatial" in out:
      pending.append(out["spatial"])
      if sum(len(p) for p in pending) >= stats_every:
        flush()
    done += len(out["pool"])
    if progress is not None:
      progress(done)
  flush()
  if not pools:
    raise ValueError("no images to evaluate")
  pool = np.concatenate(pools)
  return Activations(pool, np.concatenate(logits), frechet.FeatureStats.from_features(pool), spatial_stats)


def npz_activations(extractor: features_lib.InceptionFeatureExtractor, path: str | os.PathLike, *,
                    progress=None) -> Activations:
  """Activations of `arr_0` of an ADM-layout npz, streamed `extractor.batch_size` images at a time."""
  return compute_activations(
      extractor, features_lib.iter_npz_batches(path, features_lib.IMAGES_KEY, batch_size=extractor.batch_size),
      progress=progress)


def reference_statistics(reference: features_lib.Reference, activations: Optional[Activations]
                         ) -> tuple[tuple[np.ndarray, np.ndarray], Optional[tuple[np.ndarray, np.ndarray]]]:
  """((mu, sigma), (mu_s, sigma_s) or None): the file's precomputed ones where present, else the activations'."""
  if reference.has_stats:
    pool = (reference.mu, reference.sigma)
  elif activations is not None:
    pool = (activations.pool_stats.mu, activations.pool_stats.sigma)
  else:
    raise ValueError(f"reference {reference.path} has neither statistics nor images")
  spatial = None
  if reference.has_spatial_stats:
    spatial = (reference.mu_s, reference.sigma_s)
  elif activations is not None and activations.spatial_stats is not None:
    spatial = (activations.spatial_stats.mu, activations.spatial_stats.sigma)
  return pool, spatial


def metrics(samples: Activations, reference: features_lib.Reference, reference_activations: Optional[Activations],
            *, k: int = frechet.PR_NEIGHBOURS, split_size: int = frechet.IS_SPLIT_SIZE,
            pr_block_size: int = frechet.PR_BLOCK_SIZE, fid_method: str = "svd",
            is_shuffle_seed: Optional[int] = frechet.IS_SHUFFLE_SEED) -> dict[str, Optional[float]]:
  """{'inception_score', 'fid', 'sfid', 'precision', 'recall'}; a metric whose inputs are missing is None.

  The Inception Score's splits are of the samples' rows permuted with `is_shuffle_seed` (None: in their order).
  """
  (mu, sigma), spatial = reference_statistics(reference, reference_activations)
  if mu.shape[0] != samples.pool_stats.dim:
    raise ValueError(f"reference statistics {reference.path} have {mu.shape[0]} dimensions, the samples' pool "
                     f"features {samples.pool_stats.dim}")
  results: dict[str, Optional[float]] = {
      "inception_score": frechet.inception_score(samples.logits, split_size=split_size,
                                                 shuffle_seed=is_shuffle_seed),
      "fid": frechet.frechet_distance(samples.pool_stats.mu, samples.pool_stats.sigma, mu, sigma, method=fid_method),
      "sfid": None, "precision": None, "recall": None,
  }
  if spatial is not None and samples.spatial_stats is not None:
    if spatial[0].shape[0] != samples.spatial_stats.dim:
      raise ValueError(f"reference sFID statistics have {spatial[0].shape[0]} dimensions, the samples' "
                       f"{samples.spatial_stats.dim} (sFID needs 299x299 network inputs: 17 * 17 * 7 = 2023)")
    results["sfid"] = frechet.frechet_distance(samples.spatial_stats.mu, samples.spatial_stats.sigma, *spatial,
                                               method=fid_method)
  if reference_activations is not None:
    pr = frechet.precision_recall(reference_activations.pool, samples.pool, k=k, row_batch_size=pr_block_size,
                                  col_batch_size=pr_block_size)
    results["precision"], results["recall"] = pr.precision, pr.recall
  return results


def check_resize(reference: features_lib.Reference, resize: str) -> None:
  """ValueError when `reference`'s statistics were computed with another resize mode than `resize` (they would be
  compared with differently preprocessed samples); a warning when its statistics record none (a file made elsewhere:
  ADM's reference batches come from its TF graph, `adm_tf1`; pytorch-fid's and the official RQ-Transformer's from
  `pytorch_fid`). Images alone are re-featurised here, so any mode fits them."""
  if not reference.has_stats:
    return
  if reference.resize is None:
    log.warning("reference %s does not record how its statistics were made: ADM's reference batches need "
                "--resize=adm_tf1, pytorch-fid's and the official RQ-Transformer's --resize=pytorch_fid (this run: "
                "%s)", reference.path, resize)
  elif reference.resize != resize:
    raise ValueError(f"reference {reference.path} holds statistics computed with --resize={reference.resize}; "
                     f"evaluate with the same (this run: --resize={resize})")


def evaluate(extractor: features_lib.InceptionFeatureExtractor, samples_npz: str | os.PathLike,
             reference_npz: str | os.PathLike, *, k: int = frechet.PR_NEIGHBOURS,
             split_size: int = frechet.IS_SPLIT_SIZE, pr_block_size: int = frechet.PR_BLOCK_SIZE,
             fid_method: str = "svd", is_shuffle_seed: Optional[int] = frechet.IS_SHUFFLE_SEED,
             progress=None) -> dict[str, Optional[float]]:
  """ADM's readout for `samples_npz` (`arr_0` uint8) against `reference_npz` (`arr_0` and/or `mu`/`sigma`).

  `progress(n)`, if given, is called with the number of images done over both files (the reference's first).
  """
  reference = features_lib.read_reference(reference_npz)
  check_resize(reference, extractor.resize)
  samples_ref = features_lib.read_reference(samples_npz)
  if not samples_ref.has_images:
    raise ValueError(f"samples file {samples_npz} has no images ({features_lib.IMAGES_KEY})")
  ref_acts = npz_activations(extractor, reference_npz, progress=progress) if reference.has_images else None
  offset = reference.num_images if reference.has_images else 0
  sample_acts = npz_activations(extractor, samples_npz,
                                progress=None if progress is None else (lambda n: progress(offset + n)))
  return metrics(sample_acts, reference, ref_acts, k=k, split_size=split_size, pr_block_size=pr_block_size,
                 fid_method=fid_method, is_shuffle_seed=is_shuffle_seed)


def build_reference(extractor: features_lib.InceptionFeatureExtractor, batches: Iterable[np.ndarray],
                    path: str | os.PathLike, *, keep_images: int, progress=None) -> dict[str, int]:
  """Writes an ADM-layout reference npz from a stream of uint8 image batches [B, H, W, 3].

  `mu`/`sigma` (and `mu_s`/`sigma_s`) are statistics of every image, folded in batch by batch; `arr_0` holds the
  first `keep_images` images (ADM's reference batches keep 10,000 for precision/recall), staged in a memory-mapped
  scratch file (beside a local `path`, in a temp dir for a bucket). Host memory is a batch of images and features
  plus the two covariance sums, whatever the number of images. The file records the extractor's resize mode.
  Returns {'num_images', 'kept_images'}.
  """
  path = os.fspath(path)
  scratch_dir = contextlib.ExitStack()
  scratch = (path + ".images.npy" if paths.is_local(path)
             else os.path.join(scratch_dir.enter_context(paths.scratch_dir()), "images.npy"))
  pool = spatial = None
  kept = None
  done = 0
  try:
    for batch in batches:
      batch = features_lib.check_images(batch)
      if kept is None and keep_images:
        kept = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.uint8, shape=(keep_images, *batch.shape[1:]))
      if kept is not None and done < keep_images:
        if batch.shape[1:] != kept.shape[1:]:
          raise ValueError(f"images of one reference must share a shape: {batch.shape[1:]} vs {kept.shape[1:]}")
        take = min(len(batch), keep_images - done)
        kept[done:done + take] = batch[:take]
      for out in extractor.iter_batches([batch]):
        if pool is None:
          pool = frechet.FeatureStats(out["pool"].shape[1])
        pool.update(out["pool"])
        if "spatial" in out:
          if spatial is None:
            spatial = frechet.FeatureStats(out["spatial"].shape[1])
          spatial.update(out["spatial"])
      done += len(batch)
      if progress is not None:
        progress(done)
    if pool is None:
      raise ValueError("no images to build a reference from")
    n_kept = min(done, keep_images)
    features_lib.write_reference(path, images=kept[:n_kept] if n_kept else None, stats=(pool.mu, pool.sigma),
                                 spatial_stats=None if spatial is None else (spatial.mu, spatial.sigma),
                                 resize=extractor.resize)
  finally:
    del kept
    if os.path.exists(scratch):  # a local scratch file
      os.remove(scratch)
    scratch_dir.close()
  return {"num_images": done, "kept_images": n_kept}


METRIC_NAMES = (("inception_score", "Inception Score ↑"), ("fid", "FID ↓"), ("sfid", "sFID ↓"),
                ("precision", "precision ↑"), ("recall", "recall ↑"))


def format_results(results: dict[str, Optional[float]], *, samples: str, reference: str) -> str:
  """The ADM readout as a table (a metric whose inputs are missing shows as '-')."""
  rows = [[label, "-" if results.get(key) is None else f"{results[key]:.4f}"] for key, label in METRIC_NAMES]
  return f"samples {samples}\nreference {reference}\n" + reporting.table(rows, ["metric", "value"])
