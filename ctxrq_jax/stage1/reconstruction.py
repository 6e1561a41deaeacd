"""Held-out reconstruction quality of an RQ-VAE: PSNR, MSE, LPIPS (VGG16), and codebook usage / perplexity per depth;
coarse-to-fine reconstructions from the first 1, 2, ..., D codes of every stack.

Run at the end of stage-1 training and by `python -m ctxrq_jax.evaluate rqvae`.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ctxrq_jax.core import reporting
from ctxrq_jax.data import images as image_data
from ctxrq_jax.models import lpips
from ctxrq_jax.models import rq
from ctxrq_jax.models import rqvae
from ctxrq_jax.stage1 import losses


def evaluate_rqvae(model: Any, variables: Mapping[str, Any], data_cfg: Any, *, split: str, num_examples: int,
                   batch_size: int = 100, lpips_variables: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Held-out reconstruction PSNR and per-depth codebook usage of an RQ-VAE, and LPIPS when its variables are given
  (`ctxrq_jax.models.lpips_weights.load_variables()`; greyscale images are repeated to RGB). PSNR, MSE and LPIPS
  score the reconstruction clipped to [-1, 1], as every image made from it is.

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
    recon = jnp.clip(out["recon"], -1.0, 1.0)
    psnrs.append(np.asarray(losses.psnr(x, recon)))
    sq_errs.append(np.asarray(jnp.mean((x - recon) ** 2, axis=(1, 2, 3))))
    codes.append(np.asarray(out["codes"]))
    if lpips_variables is not None:
      dists.append(np.asarray(lpips_fn(lpips_variables, x, recon)))
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


@functools.partial(jax.jit, static_argnums=0)
def _coarse_to_fine(model: rqvae.RQVAE, variables: Any, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  _, codes, _, partial_sums = model.apply(variables, model.apply(variables, x, method=rqvae.RQVAE.encode),
                                          method=rqvae.RQVAE.quantize)
  depth, batch = partial_sums.shape[-2], x.shape[0]
  latents = jnp.moveaxis(partial_sums, -2, 0).reshape(depth * batch, *partial_sums.shape[1:3], -1)  # [D B, h, w, n_z]
  recon = model.apply(variables, latents, method=rqvae.RQVAE.decode)
  return jnp.clip(recon.reshape(depth, batch, *recon.shape[1:]), -1.0, 1.0), codes


def coarse_to_fine(model: rqvae.RQVAE, variables: Mapping[str, Any], images: Any) -> tuple[np.ndarray, np.ndarray]:
  """Reconstructions of images float [B, R, R, C] in [-1, 1] from the first d codes of every stack, d = 1 ... D.

  Residual quantization makes each depth a refinement: the latent decoded at depth d is the partial sum of the first
  d code embeddings, so d = D is the model's reconstruction and d = 1 its coarsest (one code per position).

  Returns:
    (reconstructions float32 [D, B, R, R, C_out] clipped to [-1, 1], codes int32 [B, h, w, D]).
  """
  x = jnp.asarray(images, jnp.float32)
  chex.assert_rank(x, 4)
  recon, codes = _coarse_to_fine(model, variables, x)
  return np.asarray(recon), np.asarray(codes)


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
