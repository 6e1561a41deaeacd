"""What `python -m ctxrq_jax.evaluate fid` costs: wall time and peak host memory for sample sets of two sizes
against one reference file, each in its own process, with a random-weight FID Inception (no download).

Peak memory should not grow with the number of samples beyond their pool features (2048 float32 = 8 KiB per image,
kept for precision/recall): images are streamed from the npz batch by batch and the covariances are summed as they
come. `bench fid` prints the difference next to what the features alone account for.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Sequence

import numpy as np

from ctxrq_jax.core import reporting
from ctxrq_jax.models import inception_convert

FEATURE_BYTES = 2048 * 4  # the pool features kept per image


def write_random_images(path: str, num_images: int, image_size: int, seed: int) -> str:
  """An ADM-layout npz of uniform random uint8 images [num_images, S, S, 3]."""
  rng = np.random.default_rng(seed)
  np.savez(path, arr_0=rng.integers(0, 256, size=(num_images, image_size, image_size, 3), dtype=np.uint8))
  return path


def run_fid(samples: str, reference: str, inception: str, *, batch_size: int) -> dict[str, float]:
  """Runs the evaluate command in a child process: {'seconds', 'peak_rss_mib'} of that process alone. Its result json
  (`samples`.json) is the bench's own scratch, replaced when the bench runs again in the same workdir."""
  args = [sys.executable, "-m", "ctxrq_jax.evaluate", "fid", f"--samples={samples}", f"--reference={reference}",
          f"--inception={inception}", f"--batch_size={batch_size}", f"--out_json={samples}.json", "--overwrite"]
  log_path = f"{samples}.log"
  t0 = time.perf_counter()
  with open(log_path, "w") as log:  # a file, not a pipe: the child never blocks on a full pipe
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
  seconds = time.perf_counter() - t0
  code = proc.returncode = os.waitstatus_to_exitcode(status)
  if code:
    with open(log_path) as f:
      raise RuntimeError(f"evaluate fid failed ({code}), its output ({log_path}):\n{f.read()[-3000:]}")
  return {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024.0}  # ru_maxrss is in KiB on Linux


def bench_fid(workdir: str, *, sample_counts: Sequence[int], reference_count: int, image_size: int,
              batch_size: int, seed: int = 0, log=print) -> list[dict[str, float]]:
  """Writes a random-weight Inception artifact and random image sets under `workdir`, times `evaluate fid` on each
  sample count against one reference; rows of {'samples', 'reference', 'image_bytes', 'seconds', 'peak_rss_mib'}."""
  os.makedirs(workdir, exist_ok=True)
  artifact = os.path.join(workdir, "inception_random")
  if not os.path.isdir(artifact):
    inception_convert.save_artifact(artifact, inception_convert.convert_state_dict(
        inception_convert.random_state_dict(seed)), source="random weights (bench fid)")
  reference = write_random_images(os.path.join(workdir, f"reference_{reference_count}.npz"), reference_count,
                                  image_size, seed + 1)
  rows = []
  for n in sample_counts:
    samples = write_random_images(os.path.join(workdir, f"samples_{n}.npz"), n, image_size, seed + 2)
    result = run_fid(samples, reference, artifact, batch_size=batch_size)
    rows.append({"samples": n, "reference": reference_count, "image_bytes": image_size * image_size * 3, **result})
    log(f"evaluate fid, {n} samples vs {reference_count} reference images: {result['seconds']:.0f} s, "
        f"peak RSS {result['peak_rss_mib']:.0f} MiB")
  return rows


def format_table(rows: Sequence[dict[str, float]]) -> str:
  """The rows, and the growth of peak memory from the first to the last set beside the features' share of it."""
  table = reporting.table(
      [[r["samples"], r["reference"], f"{r['seconds']:.1f}",
        f"{1000 * r['seconds'] / (r['samples'] + r['reference']):.1f}", f"{r['peak_rss_mib']:.0f}"] for r in rows],
      ["samples", "reference", "seconds", "ms/image", "peak RSS MiB"])
  if len(rows) > 1:
    first, last = rows[0], rows[-1]
    features = (last["samples"] - first["samples"]) * FEATURE_BYTES / 2**20
    images = (last["samples"] - first["samples"]) * last["image_bytes"] / 2**20
    table += (f"\npeak RSS, {last['samples']} vs {first['samples']} samples: "
              f"{last['peak_rss_mib'] - first['peak_rss_mib']:+.0f} MiB; the extra samples' pool features are "
              f"{features:.0f} MiB, their images {images:.0f} MiB")
  return table
