"""Evaluation metrics and the `evaluate` command.

  python -m ctxrq_jax.evaluate rqvae --artifact=runs/demo/stage1/rqvae --config=configs/rqvae_mnist.py
      held-out reconstruction PSNR and per-depth codebook usage / perplexity of a stage-1 artifact
  python -m ctxrq_jax.evaluate stage2 --workdir=runs/demo/stage2
      held-out masked-code NLL (eq. 11, masks from q(m)) against the codes' unigram entropy
  python -m ctxrq_jax.evaluate samples --workdir=runs/demo/stage2
      how many class-conditional samples a CNN trained on the real digits assigns to their class, draft vs revisions
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


# ------------------------------------------------------------------------------------------------ stage 2
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
    codes: int [M, N, D]; labels: int [M].

  Returns:
    {'nll': mean over all masked codes, 'nll_d{d}': per depth, 'masked_codes': count}.
  """
  from ctxrq_jax import masking  # pylint: disable=g-import-not-at-top

  m, n, depth = codes.shape

  @jax.jit
  def sums(p, c, y, valid, key):
    mask = masking.sample_mask(key, c.shape[0], n)
    logits = model.apply({"params": p}, c, mask, y[:, None], codebook)
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
        y = np.concatenate([y, np.zeros((pad,), y.dtype)])
      key = jax.random.fold_in(jax.random.key(seed), draw * 1_000_003 + i)
      s, k = sums(params, jnp.asarray(c, jnp.int32), jnp.asarray(y, jnp.int32), jnp.asarray(valid), key)
      total += np.asarray(s)
      count += np.asarray(k)
  out = {"nll": float(total.sum() / count.sum()), "masked_codes": int(count.sum())}
  out.update({f"nll_d{d + 1}": float(total[d] / count[d]) for d in range(depth)})
  return out


def evaluate_stage2(workdir: str, *, num_draws: int = 4, seed: int = 0) -> dict[str, float]:
  """Held-out masked-code NLL of a stage-2 run against the unigram entropy of its codes (nats per code)."""
  from ctxrq_jax import sample  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.data import codes as code_data  # pylint: disable=g-import-not-at-top

  loaded = sample.Stage2Model(workdir)
  cfg = loaded.config.data
  eval_codes, eval_labels = code_data.load_codes(cfg.codes_dir, cfg.eval_split)
  train_codes, _ = code_data.load_codes(cfg.codes_dir, cfg.train_split)
  m, depth = eval_codes.shape[0], eval_codes.shape[-1]
  results = masked_code_nll(loaded.model, loaded.params, loaded.codebook, eval_codes.reshape(m, -1, depth),
                            eval_labels, num_draws=num_draws, seed=seed)
  results.update(unigram_cross_entropy(train_codes, eval_codes, int(cfg.vocab_size)))
  results["nll_over_unigram"] = results["nll"] / results["unigram_per_depth"]
  results["step"] = int(loaded.step)
  return results


def format_stage2_results(r: Mapping[str, Any]) -> str:
  depths = sorted(int(k[len("nll_d"):]) for k in r if k.startswith("nll_d"))
  return "\n".join([
      f"stage-2 step {r['step']}: held-out masked-code NLL {r['nll']:.3f} nats/code over {r['masked_codes']} codes",
      "  per depth: " + ", ".join(f"d{d} {r[f'nll_d{d}']:.3f}" for d in depths),
      f"unigram cross-entropy: per-depth {r['unigram_per_depth']:.3f}, pooled {r['unigram_pooled']:.3f} nats/code",
      f"NLL / per-depth unigram entropy = {100 * r['nll_over_unigram']:.1f}%"])


def evaluate_samples(workdir: str, *, samples_per_class: int = 20, seed: int = 0,
                     classifier_steps: int = 400) -> dict[str, Any]:
  """Class-conditional fidelity on the embedded digits: a CNN trained on the real train split labels samples.

  Returns the classifier's accuracy on the real test digits and on their RQ-VAE reconstructions (the ceiling for
  samples), and the fraction of samples labelled as their conditioning class for the draft alone and after each
  revision (the same sampling run, `config.sample` settings).
  """
  import os  # pylint: disable=g-import-not-at-top
  from ctxrq_jax import classifier  # pylint: disable=g-import-not-at-top
  from ctxrq_jax import runtime  # pylint: disable=g-import-not-at-top
  from ctxrq_jax import sample  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.data import codes as code_data  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.data import images as image_data  # pylint: disable=g-import-not-at-top

  loaded = sample.Stage2Model(workdir)
  stage1_cfg = runtime.load_config(os.path.dirname(os.path.abspath(loaded.config.data.stage1_dir)))
  data_cfg = stage1_cfg.data

  def whole(split):
    it = image_data.make_image_iterator(data_cfg, split=split, batch_size=500, seed=0, train=False,
                                        drop_remainder=False)
    batches = list(it)
    return (np.concatenate([b["image"] for b in batches]), np.concatenate([b["label"] for b in batches]))

  (x_tr, y_tr), (x_te, y_te) = whole(data_cfg.split_train), whole(data_cfg.split_eval)
  num_classes = int(loaded.config.model.num_classes)
  clf, clf_params = classifier.train_classifier(x_tr, y_tr, num_classes=num_classes, steps=classifier_steps,
                                                seed=seed)
  results: dict[str, Any] = {"classifier_test_accuracy": float(np.mean(classifier.predict(clf, clf_params, x_te)
                                                                        == y_te))}
  # The ceiling for samples: the held-out digits after the RQ-VAE round trip (decoded from their codes).
  eval_codes, eval_labels = code_data.load_codes(loaded.config.data.codes_dir, loaded.config.data.eval_split)
  results["classifier_reconstruction_accuracy"] = float(np.mean(
      classifier.predict(clf, clf_params, loaded.images(eval_codes)) == eval_labels))
  s = loaded.config.sample
  labels = np.repeat(np.arange(num_classes, dtype=np.int32), samples_per_class)
  history = sample.sample_codes(loaded, labels, jax.random.key(seed), batch_size=int(s.batch_size),
                                t_draft=int(s.T_draft), t_revise=int(s.T_revise), num_revisions=int(s.M),
                                draft=sample.phase_settings(s.draft), revise=sample.phase_settings(s.revise))
  for phase, codes in enumerate(history):
    name = "draft" if phase == 0 else f"revision_{phase}"
    pred = classifier.predict(clf, clf_params, loaded.images(codes))
    results[f"{name}_accuracy"] = float(np.mean(pred == labels))
  results["num_samples"] = int(len(labels))
  return results


def format_sample_results(r: Mapping[str, Any]) -> str:
  lines = [f"classifier accuracy on real held-out digits: {100 * r['classifier_test_accuracy']:.1f}%",
           f"  ... on their RQ-VAE reconstructions (the ceiling for samples): "
           f"{100 * r['classifier_reconstruction_accuracy']:.1f}%",
           f"samples labelled as their conditioning class ({r['num_samples']} samples):"]
  lines += [f"  {k[:-len('_accuracy')]:>12}: {100 * v:.1f}%" for k, v in r.items()
            if k.endswith("_accuracy") and not k.startswith("classifier_")]
  return "\n".join(lines)


def main(argv: Any) -> None:
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ctxrq_jax import rqvae  # pylint: disable=g-import-not-at-top
  from ctxrq_jax import runtime  # pylint: disable=g-import-not-at-top

  f = flags.FLAGS
  if len(argv) != 2 or argv[1] not in ("rqvae", "stage2", "samples"):
    raise app.UsageError("usage: python -m ctxrq_jax.evaluate {rqvae|stage2|samples} ...")
  if argv[1] == "rqvae":
    if not f.artifact or f.config is None:
      raise app.UsageError("rqvae needs --artifact and --config (a stage-1 config, for its data section)")
    model, variables = rqvae.load_artifact(f.artifact)
    results = evaluate_rqvae(model, variables, f.config.data, split=f.config.data.split_eval,
                             num_examples=int(f.config.data.eval_examples))
    print(format_rqvae_results(results))
    return
  if not f.workdir:
    raise app.UsageError(f"{argv[1]} needs --workdir (a stage-2 run)")
  runtime.setup_host()
  if argv[1] == "stage2":
    print(format_stage2_results(evaluate_stage2(f.workdir, num_draws=f.num_draws, seed=f.seed)))
  else:
    print(format_sample_results(evaluate_samples(f.workdir, samples_per_class=f.samples_per_class, seed=f.seed)))


def define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "rqvae: the stage-1 config (data section).", lock_config=True)
  flags.DEFINE_string("artifact", None, "rqvae: stage-1 artifact directory.")
  flags.DEFINE_string("workdir", None, "stage2/samples: stage-2 workdir.")
  flags.DEFINE_integer("num_draws", 4, "stage2: masks drawn per held-out example.")
  flags.DEFINE_integer("samples_per_class", 20, "samples: samples per class.")
  flags.DEFINE_integer("seed", 0, "Seed for masks / sampling.")


if __name__ == "__main__":
  from absl import app as _app  # pylint: disable=g-import-not-at-top
  define_flags()
  _app.run(main)
