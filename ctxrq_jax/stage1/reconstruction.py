"""Held-out reconstruction quality of an RQ-VAE: PSNR, MSE, LPIPS (VGG16), and codebook usage / perplexity per depth.

Run at the end of stage-1 training and by `python -m ctxrq_jax.evaluate rqvae`.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ctxrq_jax.core import reporting
from ctxrq_jax.data import images as image_data
from ctxrq_jax.models import lpips
from ctxrq_jax.models import rq
from ctxrq_jax.stage1 import losses


def evaluate_rqvae(model: Any, variables: Mapping[str, Any], data_cfg: Any, *, split: str, num_examples: int,
                   batch_size: int = 100, lpips_variables: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Held-out reconstruction PSNR and per-depth codebook usage of an RQ-VAE, and LPIPS when its variables are given
  (`ctxrq_jax.models.lpips_weights.load_variables()`; greyscale images are repeated to RGB).

  Returns:
    {'psnr': mean dB, 'mse': mean squared error on [-1, 1], 'num_examples', 'usage_d{d}', 'perplexity_d{d}'} and
    'lpips' (mean over images; lower is closer) with `lpips_variables`.
  """
  it = image_data.make_image_iterator(data_cfg, split=split, batch_size=batch_size, seed=0, train=False,
                                      drop_remainder=False)
  recon_fn = jax.jit(lambda v, x: model.apply(v, x))
  lpips_fn = jax.jit(lpips.lpips_distance)
  psnrs, sq_errs, codes, dists = [], [], [], []
  seen = 0
  for batch in it:
    x = jnp.asarray(batch["image"])
    out = recon_fn(variables, x)
    psnrs.append(np.asarray(losses.psnr(x, out["recon"])))
    sq_errs.append(np.asarray(jnp.mean((x - out["recon"]) ** 2, axis=(1, 2, 3))))
    codes.append(np.asarray(out["codes"]))
    if lpips_variables is not None:
      dists.append(np.asarray(lpips_fn(lpips_variables, x, out["recon"])))
    seen += x.shape[0]
    if seen >= num_examples:
      break
  if not psnrs:
    raise ValueError(f"split {split!r} gave no examples to evaluate")
  psnrs = np.concatenate(psnrs)[:num_examples]
  codes_all = np.concatenate(codes)[:num_examples]
  results: dict[str, Any] = {
      "psnr": float(psnrs.mean()),
      "mse": float(np.concatenate(sq_errs)[:num_examples].mean()),
      "num_examples": int(psnrs.shape[0]),
  }
  if dists:
    results["lpips"] = float(np.concatenate(dists)[:num_examples].mean())
  stats = rq.codebook_stats(jnp.asarray(codes_all), int(model.codebook_size))
  results.update({k: float(v) for k, v in stats.items()})
  return results


def format_rqvae_results(results: Mapping[str, Any]) -> str:
  """Two tables: held-out PSNR / MSE (/ LPIPS), then codebook usage and perplexity per depth."""
  depths = sorted(int(k[len("usage_d"):]) for k in results if k.startswith("usage_d"))
  row = [results["num_examples"], f"{results['psnr']:.2f}", f"{results['mse']:.5f}"]
  header = ["held-out images", "PSNR (dB)", "MSE"]
  if "lpips" in results:
    row.append(f"{results['lpips']:.4f}")
    header.append("LPIPS (VGG)")
  head = reporting.table([row], header)
  per_depth = reporting.table([[d, f"{100 * results[f'usage_d{d}']:.1f}%", f"{results[f'perplexity_d{d}']:.1f}"]
                               for d in depths], ["depth", "codes used", "perplexity"])
  return head + "\n\n" + per_depth
