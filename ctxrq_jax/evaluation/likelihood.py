"""Held-out likelihood of a stage-2 run: masked-code NLL under the training mask distribution (eq. 10-11), against
the unigram cross-entropy of the codes (what a model that ignores context would score) and against the same model
given the null condition (what it does without the class or caption)."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ctxrq_jax.core import reporting
from ctxrq_jax.data import codes as code_data
from ctxrq_jax.sampling import decoder
from ctxrq_jax.sampling import loader
from ctxrq_jax.stage2 import masking


def unigram_cross_entropy(train_codes: np.ndarray, eval_codes: np.ndarray, codebook_size: int) -> dict[str, float]:
  """Per-code cross-entropy (nats) of held-out codes under unigram models fit on the training codes.

  Args:
    train_codes, eval_codes: int [M, ..., D].
    codebook_size: K.

  Returns:
    {'unigram_pooled': one histogram over all depths, 'unigram_per_depth': one histogram per depth (the stronger
     baseline)}; add-one smoothing keeps unseen codes finite.
  """
  depth = train_codes.shape[-1]
  tr, ev = train_codes.reshape(-1, depth), eval_codes.reshape(-1, depth)
  pooled = np.bincount(tr.reshape(-1), minlength=codebook_size) + 1.0
  pooled = np.log(pooled / pooled.sum())
  per_depth = []
  for d in range(depth):
    counts = np.bincount(tr[:, d], minlength=codebook_size) + 1.0
    per_depth.append(-np.log(counts / counts.sum())[ev[:, d]].mean())
  return {"unigram_pooled": float(-pooled[ev.reshape(-1)].mean()), "unigram_per_depth": float(np.mean(per_depth))}


def masked_code_nll(model: Any, params: Any, codebook: jax.Array, codes: np.ndarray, labels: np.ndarray, *,
                    num_draws: int = 4, seed: int = 0, batch_size: int = 100) -> dict[str, float]:
  """Held-out NLL (nats per masked code) of a stage-2 model under the training mask distribution q(m) (eq. 10-11).

  Each example gets `num_draws` masks from fixed seeds, so the figure is reproducible.

  Args:
    codes: int [M, N, D]; labels: int [M] class ids, or int [M, L] condition tokens (captions).

  Returns:
    {'nll': mean over all masked codes, 'nll_d{d}': per depth, 'masked_codes': count}.
  """
  m, n, depth = codes.shape
  labels = np.asarray(labels)
  labels = labels[:, None] if labels.ndim == 1 else labels  # [M, L]

  @jax.jit
  def sums(p, c, y, valid, key):
    mask = masking.sample_mask(key, c.shape[0], n)
    logits = model.apply({"params": p}, c, mask, y, codebook)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, c[..., None], axis=-1)[..., 0]  # [B, N, D]
    w = (mask & valid[:, None])[..., None].astype(jnp.float32)  # padded rows carry no weight
    return jnp.sum(nll * w, axis=(0, 1)), jnp.sum(w, axis=(0, 1)) * jnp.ones((depth,))

  total, count = np.zeros(depth), np.zeros(depth)
  for draw in range(num_draws):
    for i in range(0, m, batch_size):
      c, y = codes[i:i + batch_size], labels[i:i + batch_size]
      valid = np.arange(batch_size) < len(c)
      pad = batch_size - len(c)
      if pad:  # one compiled shape
        c = np.concatenate([c, np.zeros((pad, n, depth), c.dtype)])
        y = np.concatenate([y, np.zeros((pad, y.shape[1]), y.dtype)])
      key = jax.random.fold_in(jax.random.key(seed), draw * 1_000_003 + i)
      s, k = sums(params, jnp.asarray(c, jnp.int32), jnp.asarray(y, jnp.int32), jnp.asarray(valid), key)
      total += np.asarray(s)
      count += np.asarray(k)
  out = {"nll": float(total.sum() / count.sum()), "masked_codes": int(count.sum())}
  out.update({f"nll_d{d + 1}": float(total[d] / count[d]) for d in range(depth)})
  return out


def evaluate_stage2(workdir: str, *, num_draws: int = 4, seed: int = 0) -> dict[str, float]:
  """Held-out masked-code NLL of a stage-2 run against the unigram entropy of its codes (nats per code), and the
  same NLL with every example's condition replaced by the null condition (no class / the empty caption, the one
  condition dropout trains), on the same masks: `condition_gain` = null - conditioned is what the condition tells
  the model about the masked codes."""
  loaded = loader.Stage2Model(workdir)
  cfg = loaded.config.data
  eval_codes, eval_labels = code_data.load_codes(cfg.codes_dir, cfg.eval_split)
  train_codes, _ = code_data.load_codes(cfg.codes_dir, cfg.train_split)
  m, depth = eval_codes.shape[0], eval_codes.shape[-1]
  codes = eval_codes.reshape(m, -1, depth)
  results = masked_code_nll(loaded.model, loaded.params, loaded.codebook, codes, eval_labels, num_draws=num_draws,
                            seed=seed)
  null_labels = np.asarray(decoder.null_cond(loaded.model, jnp.asarray(eval_labels)))
  null = masked_code_nll(loaded.model, loaded.params, loaded.codebook, codes, null_labels, num_draws=num_draws,
                         seed=seed)
  results["nll_null_condition"] = null["nll"]
  results["condition_gain"] = null["nll"] - results["nll"]
  results.update(unigram_cross_entropy(train_codes, eval_codes, int(cfg.vocab_size)))
  results["nll_over_unigram"] = results["nll"] / results["unigram_per_depth"]
  results["step"] = int(loaded.step)
  return results


def format_stage2_results(r: Mapping[str, Any]) -> str:
  """A table of the held-out NLL (all depths, then per depth) against the unigram baselines."""
  depths = sorted(int(k[len("nll_d"):]) for k in r if k.startswith("nll_d"))
  rows = [["masked-code NLL (all depths)", f"{r['nll']:.3f}"]]
  rows += [[f"  depth {d}", f"{r[f'nll_d{d}']:.3f}"] for d in depths]
  rows += [["unigram cross-entropy, per depth", f"{r['unigram_per_depth']:.3f}"],
           ["unigram cross-entropy, pooled", f"{r['unigram_pooled']:.3f}"],
           ["NLL / per-depth unigram", f"{100 * r['nll_over_unigram']:.1f}%"],
           ["masked-code NLL, null condition", f"{r['nll_null_condition']:.3f}"],
           ["what the condition adds (null - conditioned)", f"{r['condition_gain']:.3f}"]]
  return (f"stage-2 step {r['step']}, {r['masked_codes']} held-out masked codes\n"
          + reporting.table(rows, ["held-out", "nats/code"]))
