"""The demo's class-conditional samples judged by a digit CNN trained on the real training digits.

`evaluate_samples` reports how many samples the classifier assigns to their conditioning class, for the draft and
after each revision, beside the same classifier on real held-out digits and on their RQ-VAE reconstructions (the
ceiling for samples).

`evaluate_text_samples` judges the text demo: the digit by the same classifier, and the captioned width, thickness
and slant by the pixel measurements that wrote the captions.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ctxrq_jax.core import config as configlib
from ctxrq_jax.core import reporting
from ctxrq_jax.data import codes as code_data
from ctxrq_jax.data import digit_captions
from ctxrq_jax.data import images as image_data
from ctxrq_jax.models.digit_cnn import DigitCNN
from ctxrq_jax.sampling import loader
from ctxrq_jax.sampling import logits
from ctxrq_jax.sampling import runner


def _batches(images: np.ndarray, labels: np.ndarray, batch_size: int, rng: np.random.Generator):
  while True:
    order = rng.permutation(len(images))
    for i in range(0, len(order) - batch_size + 1, batch_size):
      idx = order[i:i + batch_size]
      yield images[idx], labels[idx]


def train_classifier(train_images: np.ndarray, train_labels: np.ndarray, *, num_classes: int, steps: int = 400,
                     batch_size: int = 128, lr: float = 2e-3, seed: int = 0) -> tuple[DigitCNN, Any]:
  """Trains `DigitCNN` with Adam on images [M, H, W, C] in [-1, 1]; returns (model, params)."""
  if len(train_images) < batch_size:
    raise ValueError(f"need at least batch_size={batch_size} training images, got {len(train_images)}")
  model = DigitCNN(num_classes=num_classes)
  params = model.init(jax.random.key(seed), jnp.zeros((1, *train_images.shape[1:])))["params"]
  tx = optax.adam(lr)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  it = _batches(train_images, train_labels, batch_size, np.random.default_rng(seed))
  for _ in range(steps):
    x, y = next(it)
    params, opt_state, _ = step(params, opt_state, jnp.asarray(x), jnp.asarray(y))
  return model, params


def predict(model: DigitCNN, params: Any, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
  """Predicted class ids int32 [M] for images [M, H, W, C] in [-1, 1]."""
  fn = jax.jit(lambda p, x: jnp.argmax(model.apply({"params": p}, x), axis=-1))
  out = [np.asarray(fn(params, jnp.asarray(images[i:i + batch_size]))) for i in range(0, len(images), batch_size)]
  return np.concatenate(out).astype(np.int32) if out else np.zeros((0,), np.int32)


def evaluate_samples(workdir: str, *, samples_per_class: int = 20, seed: int = 0,
                     classifier_steps: int = 400) -> dict[str, Any]:
  """Class-conditional fidelity on the embedded digits: a CNN trained on the real train split labels samples.

  Returns the classifier's accuracy on the real test digits and on their RQ-VAE reconstructions (the ceiling for
  samples), and the fraction of samples labelled as their conditioning class for the draft alone and after each
  revision (the same sampling run, `config.sample` settings).
  """
  loaded = loader.Stage2Model(workdir)
  if loaded.model.is_text:
    raise ValueError(f"{workdir} is a text-to-image run; use `evaluate text_samples`")
  stage1_cfg = configlib.load_snapshot(os.path.dirname(os.path.abspath(loaded.config.data.stage1_dir)))
  data_cfg = stage1_cfg.data

  def whole(split):
    it = image_data.make_image_iterator(data_cfg, split=split, batch_size=500, seed=0, train=False,
                                        drop_remainder=False)
    batches = list(it)
    return (np.concatenate([b["image"] for b in batches]), np.concatenate([b["label"] for b in batches]))

  (x_tr, y_tr), (x_te, y_te) = whole(data_cfg.train_split), whole(data_cfg.eval_split)
  num_classes = int(loaded.config.model.num_classes)
  clf, clf_params = train_classifier(x_tr, y_tr, num_classes=num_classes, steps=classifier_steps,
                                                seed=seed)
  results: dict[str, Any] = {"classifier_test_accuracy": float(np.mean(predict(clf, clf_params, x_te)
                                                                        == y_te))}
  # The ceiling for samples: the held-out digits after the RQ-VAE round trip (decoded from their codes).
  eval_codes, eval_labels = code_data.load_codes(loaded.config.data.codes_dir, loaded.config.data.eval_split)
  results["classifier_reconstruction_accuracy"] = float(np.mean(
      predict(clf, clf_params, loaded.images(eval_codes)) == eval_labels))
  s = loaded.config.sample
  labels = np.repeat(np.arange(num_classes, dtype=np.int32), samples_per_class)
  history = runner.sample_codes(loaded, labels, jax.random.key(seed), batch_size=int(s.batch_size),
                                t_draft=int(s.T_draft), t_revise=int(s.T_revise), num_revisions=int(s.M),
                                draft=logits.PhaseSettings.from_config(s.draft), revise=logits.PhaseSettings.from_config(s.revise))
  for phase, codes in enumerate(history):
    name = "draft" if phase == 0 else f"revision_{phase}"
    pred = predict(clf, clf_params, loaded.images(codes))
    results[f"{name}_accuracy"] = float(np.mean(pred == labels))
  results["num_samples"] = int(len(labels))
  return results


def format_sample_results(r: Mapping[str, Any]) -> str:
  """A table: the classifier on real digits and on reconstructions (the ceiling), then on each sampling phase."""
  rows = [["real held-out digits", f"{100 * r['classifier_test_accuracy']:.1f}%"],
          ["their RQ-VAE reconstructions (ceiling)", f"{100 * r['classifier_reconstruction_accuracy']:.1f}%"]]
  rows += [[f"samples: {k[:-len('_accuracy')].replace('_', ' ')}", f"{100 * v:.1f}%"] for k, v in r.items()
           if k.endswith("_accuracy") and not k.startswith("classifier_")]
  return (f"{r['num_samples']} class-conditional samples\n"
          + reporting.table(rows, ["labelled as their class by the digit CNN", "accuracy"]))


# ------------------------------------------------------------------------------------------------ text demo
def evaluate_text_samples(workdir: str, *, num_prompts: int = 100, samples_per_prompt: int = 2, seed: int = 0,
                          classifier_steps: int = 400) -> dict[str, Any]:
  """Caption faithfulness of the text demo's samples: do they show the prompted digit with the prompted attributes?

  Prompts are `num_prompts` held-out captions (evenly spaced over the eval split, so every class appears), each
  sampled `samples_per_prompt` times with the run's `config.sample` settings. A sample's digit is judged by the CNN
  trained on the real training digits; its width / thickness / slant by the same pixel measurements and thresholds
  that wrote the captions (ctxrq_jax/data/digit_captions.py, thresholds refitted on the training digits).

  Returns, for the draft and each revision, the digit accuracy, the agreement of each attribute and of all four
  together ('all'), beside: chance (1/10 digits, 1/bins per attribute), a class-only baseline (the agreement a random
  training digit of the prompted class would get: what the class alone explains), and the ceiling (the held-out
  digits' own RQ-VAE reconstructions against their captions).
  """
  from ctxrq_jax.stage1 import encode as encode_lib  # pylint: disable=g-import-not-at-top
  if num_prompts < 1 or samples_per_prompt < 1:
    raise ValueError(f"num_prompts and samples_per_prompt must be >= 1, got {num_prompts}, {samples_per_prompt}")
  loaded = loader.Stage2Model(workdir)
  if not loaded.model.is_text:
    raise ValueError(f"{workdir} is a class-conditional run; use `evaluate samples`")
  stage1_cfg = configlib.load_snapshot(os.path.dirname(os.path.abspath(loaded.config.data.stage1_dir)))
  data_cfg = stage1_cfg.data

  def whole(split):
    it = image_data.make_image_iterator(data_cfg, split=split, batch_size=500, seed=0, train=False,
                                        drop_remainder=False)
    batches = list(it)
    return (np.concatenate([b["image"] for b in batches]), np.concatenate([b["label"] for b in batches]))

  x_tr, y_tr = whole(data_cfg.train_split)
  thresholds = digit_captions.fit_thresholds(x_tr)
  train_bins = digit_captions.attribute_bins(x_tr, thresholds)
  clf, clf_params = train_classifier(x_tr, y_tr, num_classes=len(digit_captions.DIGIT_WORDS), steps=classifier_steps,
                                     seed=seed)
  codes_dir, split = loaded.config.data.codes_dir, loaded.config.data.eval_split
  eval_captions = encode_lib.read_captions(codes_dir, split)
  eval_codes, _ = code_data.load_codes(codes_dir, split)
  num_prompts = min(num_prompts, len(eval_captions))
  chosen = np.linspace(0, len(eval_captions) - 1, num_prompts).round().astype(np.int64)
  prompts = [eval_captions[i] for i in chosen]
  targets = [digit_captions.parse_caption(p) for p in prompts]
  digits = np.array([t[0] for t in targets], np.int32)
  bins = {a: np.array([t[1][a] for t in targets], np.int32) for a in digit_captions.ATTRIBUTES}

  def judge(images: np.ndarray, rows: np.ndarray) -> dict[str, float]:
    """Agreement of images with the prompts `rows` index."""
    got = digit_captions.attribute_bins(images, thresholds)
    ok = {"digit": predict(clf, clf_params, images) == digits[rows]}
    ok.update({a: got[a] == bins[a][rows] for a in digit_captions.ATTRIBUTES})
    ok["all"] = np.logical_and.reduce(list(ok.values()))
    return {k: float(np.mean(v)) for k, v in ok.items()}

  results: dict[str, Any] = {"num_prompts": num_prompts, "samples_per_prompt": samples_per_prompt}
  results["chance"] = {"digit": 1 / len(digit_captions.DIGIT_WORDS),
                       **{a: 1 / len(w) for a, w in digit_captions.ATTRIBUTES.items()}}
  results["chance"]["all"] = float(np.prod(list(results["chance"].values())))
  # What the class alone explains: p(prompted bin | prompted class) over the training digits, averaged over prompts.
  baseline = {"digit": 1.0}
  joint = np.ones(num_prompts)
  for a in digit_captions.ATTRIBUTES:
    p = np.array([np.mean(train_bins[a][y_tr == d] == b) for d, b in zip(digits, bins[a])])
    baseline[a] = float(p.mean())
    joint *= p
  baseline["all"] = float(joint.mean())  # attributes treated as independent given the class
  results["class_only"] = baseline
  results["reconstructions"] = judge(loaded.images(eval_codes[chosen]), np.arange(num_prompts))

  rows = np.repeat(np.arange(num_prompts), samples_per_prompt)
  cond = loaded.tokenizer().encode(prompts)[rows]
  s = loaded.config.sample
  history = runner.sample_codes(loaded, cond, jax.random.key(seed), batch_size=int(s.batch_size),
                                t_draft=int(s.T_draft), t_revise=int(s.T_revise), num_revisions=int(s.M),
                                draft=logits.PhaseSettings.from_config(s.draft),
                                revise=logits.PhaseSettings.from_config(s.revise))
  for phase, codes in enumerate(history):
    results["draft" if phase == 0 else f"revision {phase}"] = judge(loaded.images(codes), rows)
  return results


def format_text_results(r: Mapping[str, Any]) -> str:
  """A table: one row per judged property, one column per reference and sampling phase."""
  columns = ["chance", "class_only", "reconstructions"] + [k for k in r if k == "draft" or k.startswith("revision")]
  names = {"chance": "chance", "class_only": "class only", "reconstructions": "reconstructions (ceiling)"}
  rows = [[prop] + [f"{100 * r[c][prop]:.1f}%" for c in columns]
          for prop in ["digit", *digit_captions.ATTRIBUTES, "all"]]
  return (f"{r['num_prompts']} held-out captions x {r['samples_per_prompt']} samples: agreement with the prompt\n"
          + reporting.table(rows, ["", *[names.get(c, c) for c in columns]]))
