"""Evaluation metrics and the `evaluate` command.

  python -m ctxrq_jax.evaluate rqvae --artifact=runs/demo/stage1/rqvae --config=configs/rqvae_mnist.py

prints held-out reconstruction PSNR and per-depth codebook usage / perplexity of a stage-1 artifact.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np


def psnr(x: jax.Array, y: jax.Array) -> jax.Array:
  """Per-image PSNR in dB of images [B, H, W, C] in [-1, 1] (peak 1 on the [0, 1] scale). Returns [B]."""
  mse01 = jnp.mean(((x.astype(jnp.float32) - y.astype(jnp.float32)) / 2.0) ** 2, axis=(1, 2, 3))
  return -10.0 * jnp.log10(jnp.maximum(mse01, 1e-12))


def codebook_stats(codes: jax.Array, codebook_size: int, prefix: str = "") -> dict[str, jax.Array]:
  """Per-depth fraction of the K codes used and perplexity exp(H) of the code histogram.

  Args:
    codes: int [..., D].
    codebook_size: K.
    prefix: prepended to the metric names.

  Returns:
    {f'{prefix}usage_d{d}', f'{prefix}perplexity_d{d}'} scalars for d = 1..D.
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


def evaluate_rqvae(model: Any, variables: Mapping[str, Any], data_cfg: Any, *, split: str, num_examples: int,
                   batch_size: int = 100) -> dict[str, Any]:
  """Held-out reconstruction PSNR and per-depth codebook usage of an RQ-VAE.

  Returns:
    {'psnr': mean dB, 'mse': mean squared error on [-1, 1], 'num_examples', 'usage_d{d}', 'perplexity_d{d}'}.
  """
  from ctxrq_jax.data import images as image_data  # pylint: disable=g-import-not-at-top

  it = image_data.make_image_iterator(data_cfg, split=split, batch_size=batch_size, seed=0, train=False,
                                      drop_remainder=False)
  recon_fn = jax.jit(lambda v, x: model.apply(v, x))
  psnrs, sq_errs, codes = [], [], []
  seen = 0
  for batch in it:
    x = jnp.asarray(batch["image"])
    out = recon_fn(variables, x)
    psnrs.append(np.asarray(psnr(x, out["recon"])))
    sq_errs.append(np.asarray(jnp.mean((x - out["recon"]) ** 2, axis=(1, 2, 3))))
    codes.append(np.asarray(out["codes"]))
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
  stats = codebook_stats(jnp.asarray(codes_all), int(model.codebook_size))
  results.update({k: float(v) for k, v in stats.items()})
  return results


def format_rqvae_results(results: Mapping[str, Any]) -> str:
  """A small table: PSNR, then usage and perplexity per depth."""
  depths = sorted(int(k[len("usage_d"):]) for k in results if k.startswith("usage_d"))
  lines = [f"held-out examples: {results['num_examples']}   PSNR: {results['psnr']:.2f} dB   "
           f"MSE: {results['mse']:.5f}",
           "depth | codes used | perplexity"]
  for d in depths:
    lines.append(f"{d:5d} | {100 * results[f'usage_d{d}']:9.1f}% | {results[f'perplexity_d{d}']:10.1f}")
  return "\n".join(lines)
