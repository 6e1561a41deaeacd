"""The demo's samples judged the way the field judges generative models, in the feature space of a digit CNN.

A `DigitJudge` is a small CNN (`models/digit_cnn.py`) trained on the real training digits. Its 128-d hidden layer
plays the part Inception's pool features play for ImageNet: every image set is scored by

  * Fréchet distance to the training digits' features (float64, `frechet.frechet_distance`),
  * improved precision and recall against them (k = 3 nearest neighbours, `frechet.precision_recall`),
  * class accuracy (the fraction the CNN labels as the conditioning class),

so a sampler that collapses onto a few prototypical digits shows up as low recall and a high distance, however
accurate its digits are. `evaluate_samples` scores the held-out real digits (the floor at this sample size), their
RQ-VAE reconstructions (the ceiling for any stage-2 model on these codes) and the draft and each revision of one
Draft-and-Revise run, all with the same number of images, since the Fréchet distance is biased by sample size.

`evaluate_text_samples` judges the text demo: the digit by the same classifier, and the captioned width, thickness
and slant by the pixel measurements that wrote the captions; and, in the same table as the class demo's, the Fréchet
distance, precision and recall of its samples beside held-out digits and their reconstructions.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ctxrq_jax.core import config as configlib
from ctxrq_jax.core import paths
from ctxrq_jax.core import reporting
from ctxrq_jax.data import code_captions
from ctxrq_jax.data import codes as code_data
from ctxrq_jax.data import digit_captions
from ctxrq_jax.data import images as image_data
from ctxrq_jax.evaluation import frechet
from ctxrq_jax.models.digit_cnn import DigitCNN
from ctxrq_jax.sampling import loader
from ctxrq_jax.sampling import logits
from ctxrq_jax.sampling import runner

METRICS = ("fd", "precision", "recall", "accuracy")  # the columns of every table below


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


def classify(model: DigitCNN, params: Any, images: np.ndarray, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
  """(predicted class ids int32 [M], features float32 [M, F]) of images [M, H, W, C] in [-1, 1]."""
  chex.assert_rank(images, 4)
  fn = jax.jit(lambda p, x: (lambda lg, h: (jnp.argmax(lg, axis=-1), h))(*model.apply({"params": p}, x, True)))
  preds, feats = [], []
  for i in range(0, len(images), batch_size):
    pred, h = fn(params, jnp.asarray(images[i:i + batch_size]))
    preds.append(np.asarray(pred, np.int32))
    feats.append(np.asarray(h, np.float32))
  if not preds:
    return np.zeros((0,), np.int32), np.zeros((0, model.hidden), np.float32)
  return np.concatenate(preds), np.concatenate(feats)


def predict(model: DigitCNN, params: Any, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
  """Predicted class ids int32 [M] for images [M, H, W, C] in [-1, 1]."""
  return classify(model, params, images, batch_size)[0]


@dataclasses.dataclass
class DigitJudge:
  """A trained digit CNN and its features of the reference set (the real training digits).

  Attributes:
    model, params: the CNN.
    reference: float32 [R, F] features of the reference images.
    reference_radii: float32 [R] distance of each reference point to its k-th nearest reference neighbour.
    reference_stats: their mean and covariance.
    k: the neighbourhood size of precision/recall.
  """

  model: DigitCNN
  params: Any
  reference: np.ndarray
  reference_radii: np.ndarray
  reference_stats: frechet.FeatureStats
  k: int = frechet.PR_NEIGHBOURS

  @classmethod
  def train(cls, images: np.ndarray, labels: np.ndarray, *, num_classes: int, steps: int = 400, seed: int = 0,
            k: int = frechet.PR_NEIGHBOURS) -> "DigitJudge":
    """Trains the CNN on `images` [R, H, W, C] in [-1, 1] with `labels` [R] and takes them as the reference set."""
    model, params = train_classifier(images, labels, num_classes=num_classes, steps=steps, seed=seed)
    _, feats = classify(model, params, images)
    return cls(model, params, feats, frechet.manifold_radii(feats, k=k), frechet.FeatureStats.from_features(feats),
               k)

  def score(self, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """{'fd', 'precision', 'recall', 'accuracy'} of images [M, H, W, C] in [-1, 1] meant to show digits `labels` [M]."""
    chex.assert_rank(images, 4)
    if len(images) != len(labels) or len(images) < 2:
      raise ValueError(f"need at least 2 images with one label each, got {len(images)} images, {len(labels)} labels")
    pred, feats = classify(self.model, self.params, images)
    return self.score_classified(pred, feats, labels)

  def score_classified(self, pred: np.ndarray, feats: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """`score` of images already classified: predictions int [M] and features float32 [M, F] from `classify`."""
    chex.assert_rank(feats, 2)
    if len(pred) != len(labels) or len(feats) != len(labels) or len(labels) < 2:
      raise ValueError(f"need at least 2 images with one label each, got {len(feats)} images, {len(labels)} labels")
    stats = frechet.FeatureStats.from_features(feats)
    pr = frechet.precision_recall(self.reference, feats, k=self.k, reference_radii=self.reference_radii)
    return {"fd": frechet.stats_distance(stats, self.reference_stats), "precision": pr.precision,
            "recall": pr.recall, "accuracy": float(np.mean(pred == np.asarray(labels)))}


def load_split(data_cfg: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
  """A whole image split: (images float32 [M, H, W, C] in [-1, 1], labels int32 [M]), in source order."""
  it = image_data.make_image_iterator(data_cfg, split=split, batch_size=500, seed=0, train=False,
                                      drop_remainder=False)
  batches = list(it)
  return (np.concatenate([b["image"] for b in batches]), np.concatenate([b["label"] for b in batches]))


def balanced_labels(num_classes: int, per_class: int) -> np.ndarray:
  """int32 [num_classes * per_class]: `per_class` of each class, in class order (as `sample` draws them)."""
  if per_class < 1:
    raise ValueError(f"samples_per_class must be >= 1, got {per_class}")
  return np.repeat(np.arange(num_classes, dtype=np.int32), per_class)


def balanced_subset(labels: np.ndarray, num_classes: int, per_class: int) -> np.ndarray:
  """Indices of the first `per_class` examples of each class (all classes must have that many)."""
  idx = []
  for c in range(num_classes):
    where = np.flatnonzero(labels == c)[:per_class]
    if len(where) < per_class:
      raise ValueError(f"only {len(where)} held-out examples of class {c}; samples_per_class={per_class} needs "
                       f"{per_class} (lower it to compare sample sets of equal size)")
    idx.append(where)
  return np.concatenate(idx)


class SampleEvaluator:
  """Scores Draft-and-Revise runs of one stage-2 run on the embedded digits (or any labelled image data set).

  Builds the judge from the stage-1 run's training split and scores the reference rows once: the held-out digits
  and their RQ-VAE reconstructions, `per_class` of each class, the size every sample set is scored at.
  """

  def __init__(self, workdir: str, *, per_class: int, classifier_steps: int = 400, seed: int = 0):
    self.loaded = loader.Stage2Model(workdir)
    if self.loaded.model.is_text:
      raise ValueError(f"{workdir} is a text-to-image run; use `evaluate text_samples`")
    stage1_cfg = configlib.load_snapshot(str(paths.path(self.loaded.config.data.stage1_dir).parent))
    data_cfg = stage1_cfg.data
    self.num_classes = int(self.loaded.config.model.num_classes)
    self.per_class = int(per_class)
    self.labels = balanced_labels(self.num_classes, self.per_class)
    x_tr, y_tr = load_split(data_cfg, data_cfg.train_split)
    self.judge = DigitJudge.train(x_tr, y_tr, num_classes=self.num_classes, steps=classifier_steps, seed=seed)
    x_te, y_te = load_split(data_cfg, data_cfg.eval_split)
    eval_codes, eval_labels = code_data.load_codes(self.loaded.config.data.codes_dir, self.loaded.config.data.eval_split)
    if not np.array_equal(eval_labels, y_te):
      raise ValueError(f"the code split {self.loaded.config.data.eval_split!r} does not hold the stage-1 run's "
                       f"held-out images in order; re-encode it")
    pick = balanced_subset(y_te, self.num_classes, self.per_class)
    self.reference_rows = {
        "real held-out digits": self.judge.score(x_te[pick], y_te[pick]),
        "RQ-VAE reconstructions": self.judge.score(self.loaded.images(eval_codes[pick]), y_te[pick]),
    }

  def sample(self, rng: jax.Array, *, t_draft: int, t_revise: int, num_revisions: int,
             draft: logits.PhaseSettings, revise: logits.PhaseSettings, batch_size: Optional[int] = None,
             labels: Optional[np.ndarray] = None) -> np.ndarray:
    """Draft-and-Revise codes for `labels` (default `self.labels`): int32 [M+1, len(labels), N, D] (draft, then
    each revision)."""
    return runner.sample_codes(self.loaded, self.labels if labels is None else labels, rng,
                               batch_size=int(batch_size or self.loaded.config.sample.batch_size), t_draft=t_draft,
                               t_revise=t_revise, num_revisions=num_revisions, draft=draft, revise=revise)

  def score_phases(self, history: np.ndarray) -> dict[str, dict[str, float]]:
    """{'draft' / 'revision m': metrics} of a history [M+1, len(labels), N, D] from `sample`."""
    chex.assert_rank(history, 4)
    return {phase_name(p): self.judge.score(self.loaded.images(codes), self.labels)
            for p, codes in enumerate(history)}


def phase_name(phase: int) -> str:
  return "draft" if phase == 0 else f"revision {phase}"


def evaluate_samples(workdir: str, *, samples_per_class: int = 50, seed: int = 0,
                     classifier_steps: int = 400) -> dict[str, Any]:
  """The digit judge's table for one Draft-and-Revise run with the run's `config.sample` settings.

  Returns {'num_samples', 'num_reference', 'settings', 'rows': {name: {'fd', 'precision', 'recall',
  'accuracy'}}} with rows for the held-out digits, their reconstructions, the draft and each revision.
  """
  ev = SampleEvaluator(workdir, per_class=samples_per_class, classifier_steps=classifier_steps, seed=seed)
  return score_run(ev, seed=seed)


def score_run(ev: SampleEvaluator, *, seed: int = 0) -> dict[str, Any]:
  """`evaluate_samples` with an evaluator already built (its judge and reference rows are reused)."""
  s = ev.loaded.config.sample
  settings = dict(t_draft=int(s.T_draft), t_revise=int(s.T_revise), num_revisions=int(s.M),
                  draft=logits.PhaseSettings.from_config(s.draft), revise=logits.PhaseSettings.from_config(s.revise))
  history = ev.sample(jax.random.key(seed), **settings)
  rows = dict(ev.reference_rows)
  rows.update({f"samples: {k}": v for k, v in ev.score_phases(history).items()})
  return {"num_samples": int(len(ev.labels)), "num_reference": int(len(ev.judge.reference)),
          "settings": describe_settings(**settings), "rows": rows}


def describe_settings(*, t_draft: int, t_revise: int, num_revisions: int, draft: logits.PhaseSettings,
                      revise: logits.PhaseSettings) -> str:
  """One line, e.g. 'T_draft 16, T_revise 2, M 2; draft temperature 1, guidance 0; revise temperature 0.8, ...'."""
  def phase(p):
    extra = (f", top-k {p.top_k}" if p.top_k else "") + (f", top-p {p.top_p:g}" if p.top_p < 1 else "")
    return f"temperature {p.temperature:g}, guidance {p.guidance_scale:g}{extra}"
  return (f"T_draft {t_draft}, T_revise {t_revise}, M {num_revisions}; draft {phase(draft)}; "
          f"revise {phase(revise)}")


def metric_cells(m: Mapping[str, float]) -> list[str]:
  """FD, precision, recall, accuracy of one row, formatted."""
  return [f"{m['fd']:.2f}", f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{100 * m['accuracy']:.1f}%"]


METRIC_HEADER = ["FD ↓", "precision ↑", "recall ↑", "accuracy ↑"]


def format_sample_results(r: Mapping[str, Any]) -> str:
  """The judge's table: real held-out digits (floor), reconstructions (ceiling), then each sampling phase."""
  return (f"{r['num_samples']} images per row ({r['settings']}); digit-CNN features, reference: the "
          f"{r['num_reference']} training digits\n" + metric_table(r["rows"]))


def metric_table(rows: Mapping[str, Mapping[str, float]]) -> str:
  """One line per image set: FD, precision, recall, accuracy."""
  return reporting.table([[name, *metric_cells(m)] for name, m in rows.items()], ["image set", *METRIC_HEADER])


def evenly_spaced(n: int, m: int) -> np.ndarray:
  """int64 [m]: m distinct indices evenly spaced over [0, n), first and last included (m <= n)."""
  if not 1 <= m <= n:
    raise ValueError(f"cannot pick {m} distinct indices out of {n}")
  return np.linspace(0, n - 1, m).round().astype(np.int64)


# ------------------------------------------------------------------------------------------------ text demo
def evaluate_text_samples(workdir: str, *, num_prompts: int = 100, samples_per_prompt: int = 2, seed: int = 0,
                          classifier_steps: int = 400) -> dict[str, Any]:
  """The text demo's samples judged two ways: caption faithfulness, and as a distribution beside the real digits.

  Prompts are `num_prompts` held-out captions (evenly spaced over the eval split, so every class appears), each
  sampled `samples_per_prompt` times with the run's `config.sample` settings.

  Faithfulness (keys 'chance', 'class_only', 'reconstructions', 'draft', 'revision m'; each {'digit', 'width',
  'thickness', 'slant', 'all'}): a sample's digit is judged by the CNN trained on the real training digits; its
  width / thickness / slant by the same pixel measurements and thresholds that wrote the captions
  (ctxrq_jax/data/digit_captions.py, thresholds refitted on the training digits). Beside the phases: chance (1/10
  digits, 1/bins per attribute), a class-only baseline (the agreement a random training digit of the prompted class
  would get: what the class alone explains), and the ceiling (the prompts' own held-out digits' RQ-VAE
  reconstructions against their captions).

  Distribution ('rows': {image set: {'fd', 'precision', 'recall', 'accuracy'}}, as `evaluate_samples` reports the
  class demo): every image set in the same CNN's features against the training digits, at the size of the sample set
  (M = num_prompts x samples_per_prompt, since the Fréchet distance is biased by size): M real held-out digits evenly
  spaced over the eval split (the floor), their RQ-VAE reconstructions (the ceiling), then the draft and each
  revision; accuracy is the fraction labelled as the digit of their caption.
  """
  if num_prompts < 1 or samples_per_prompt < 1:
    raise ValueError(f"num_prompts and samples_per_prompt must be >= 1, got {num_prompts}, {samples_per_prompt}")
  loaded = loader.Stage2Model(workdir)
  if not loaded.model.is_text:
    raise ValueError(f"{workdir} is a class-conditional run; use `evaluate samples`")
  stage1_cfg = configlib.load_snapshot(str(paths.path(loaded.config.data.stage1_dir).parent))
  data_cfg = stage1_cfg.data
  codes_dir, split = loaded.config.data.codes_dir, loaded.config.data.eval_split
  eval_captions = code_captions.read_captions(codes_dir, split)
  num_prompts = min(num_prompts, len(eval_captions))
  num_samples = num_prompts * samples_per_prompt
  if num_samples > len(eval_captions):
    raise ValueError(f"{num_prompts} prompts x {samples_per_prompt} samples = {num_samples} samples, more than the "
                     f"{len(eval_captions)} held-out digits they are compared with at equal size; lower them")

  x_tr, y_tr = load_split(data_cfg, data_cfg.train_split)
  x_te, y_te = load_split(data_cfg, data_cfg.eval_split)
  if len(x_te) != len(eval_captions):
    raise ValueError(f"the code split {split!r} holds {len(eval_captions)} captions, the stage-1 run's held-out split "
                     f"{len(x_te)} images; re-encode it")
  thresholds = digit_captions.fit_thresholds(x_tr)
  train_bins = digit_captions.attribute_bins(x_tr, thresholds)
  cnn = DigitJudge.train(x_tr, y_tr, num_classes=len(digit_captions.DIGIT_WORDS), steps=classifier_steps, seed=seed)
  eval_codes, _ = code_data.load_codes(codes_dir, split)
  chosen = evenly_spaced(len(eval_captions), num_prompts)
  prompts = [eval_captions[i] for i in chosen]
  targets = [digit_captions.parse_caption(p) for p in prompts]
  digits = np.array([t[0] for t in targets], np.int32)
  bins = {a: np.array([t[1][a] for t in targets], np.int32) for a in digit_captions.ATTRIBUTES}

  def judge(images: np.ndarray, rows: np.ndarray) -> tuple[dict[str, float], dict[str, float]]:
    """(agreement of images with the prompts `rows` index, their FD / precision / recall / accuracy)."""
    pred, feats = classify(cnn.model, cnn.params, images)
    got = digit_captions.attribute_bins(images, thresholds)
    ok = {"digit": pred == digits[rows]}
    ok.update({a: got[a] == bins[a][rows] for a in digit_captions.ATTRIBUTES})
    ok["all"] = np.logical_and.reduce(list(ok.values()))
    return {k: float(np.mean(v)) for k, v in ok.items()}, cnn.score_classified(pred, feats, digits[rows])

  results: dict[str, Any] = {"num_prompts": num_prompts, "samples_per_prompt": samples_per_prompt,
                             "num_samples": num_samples, "num_reference": int(len(cnn.reference))}
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
  results["reconstructions"] = judge(loaded.images(eval_codes[chosen]), np.arange(num_prompts))[0]
  real = evenly_spaced(len(eval_captions), num_samples)
  results["rows"] = {"real held-out digits": cnn.score(x_te[real], y_te[real]),
                     "RQ-VAE reconstructions": cnn.score(loaded.images(eval_codes[real]), y_te[real])}

  s = loaded.config.sample
  settings = dict(t_draft=int(s.T_draft), t_revise=int(s.T_revise), num_revisions=int(s.M),
                  draft=logits.PhaseSettings.from_config(s.draft), revise=logits.PhaseSettings.from_config(s.revise))
  results["settings"] = describe_settings(**settings)
  rows = np.repeat(np.arange(num_prompts), samples_per_prompt)
  cond = loaded.tokenizer().encode(prompts)[rows]
  history = runner.sample_codes(loaded, cond, jax.random.key(seed), batch_size=int(s.batch_size), **settings)
  for phase, codes in enumerate(history):
    results[phase_name(phase)], results["rows"][f"samples: {phase_name(phase)}"] = judge(loaded.images(codes), rows)
  return results


def format_text_results(r: Mapping[str, Any]) -> str:
  """A table: one row per judged property, one column per reference and sampling phase."""
  columns = ["chance", "class_only", "reconstructions"] + [k for k in r if k == "draft" or k.startswith("revision")]
  names = {"chance": "chance", "class_only": "class only", "reconstructions": "reconstructions (ceiling)"}
  rows = [[prop] + [f"{100 * r[c][prop]:.1f}%" for c in columns]
          for prop in ["digit", *digit_captions.ATTRIBUTES, "all"]]
  return (f"{r['num_prompts']} held-out captions x {r['samples_per_prompt']} samples ({r['settings']}): agreement "
          f"with the prompt\n" + reporting.table(rows, ["", *[names.get(c, c) for c in columns]])
          + f"\n\n{r['num_samples']} images per row; digit-CNN features, reference: the {r['num_reference']} training "
          f"digits; accuracy: labelled as the prompted digit\n" + metric_table(r["rows"]))
