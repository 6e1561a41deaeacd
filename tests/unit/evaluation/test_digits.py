"""The digit judge (ctxrq_jax/evaluation/digits.py): known values of its Fréchet distance and precision/recall."""

import types

import numpy as np
import pytest

from ctxrq_jax.evaluation import digits


@pytest.fixture(scope="module")
def judge_and_data():
  # Two classes of 16x16 "digits": a bright vertical or horizontal bar at a random offset, plus noise.
  rng = np.random.default_rng(0)
  n = 160
  labels = np.arange(n, dtype=np.int32) % 2
  images = np.full((n, 16, 16, 1), -1.0, np.float32)
  for i, (c, o) in enumerate(zip(labels, rng.integers(2, 14, n))):
    if c:
      images[i, o - 1:o + 1, :] = 1.0
    else:
      images[i, :, o - 1:o + 1] = 1.0
  images += rng.normal(0, 0.1, images.shape).astype(np.float32)
  judge = digits.DigitJudge.train(images, labels, num_classes=2, steps=30, seed=0)
  return judge, images, labels


@pytest.mark.xdist_group("digits_judge")  # the tests of `judge_and_data` in one worker: one judge
def test_the_reference_itself_scores_perfectly(judge_and_data):
  judge, images, labels = judge_and_data
  m = judge.score(images, labels)
  assert abs(m["fd"]) < 1e-6 * max(1.0, float(np.trace(judge.reference_stats.sigma)))
  assert m["precision"] == 1.0 and m["recall"] == 1.0
  assert m["accuracy"] > 0.9  # bars are easy


@pytest.mark.xdist_group("digits_judge")
def test_collapse_keeps_precision_and_accuracy_but_loses_recall_and_distance(judge_and_data):
  # The failure a class-accuracy-only judge cannot see: one prototype per class, repeated.
  judge, images, labels = judge_and_data
  collapsed = np.concatenate([np.repeat(images[:1], 80, 0), np.repeat(images[1:2], 80, 0)])
  collapsed_labels = np.repeat(labels[:2], 80)
  full, col = judge.score(images, labels), judge.score(collapsed, collapsed_labels)
  assert col["precision"] == 1.0 and col["accuracy"] >= full["accuracy"] - 0.05
  assert col["recall"] < 0.2 < full["recall"]
  assert col["fd"] > full["fd"] + 1.0


@pytest.mark.xdist_group("digits_judge")
def test_balanced_sets_and_bad_input(judge_and_data):
  judge, images, labels = judge_and_data
  np.testing.assert_array_equal(digits.balanced_labels(3, 2), [0, 0, 1, 1, 2, 2])
  pick = digits.balanced_subset(labels, 2, 3)
  np.testing.assert_array_equal(labels[pick], [0, 0, 0, 1, 1, 1])
  with pytest.raises(ValueError, match="only 80 held-out examples of class 0"):
    digits.balanced_subset(labels, 2, 81)
  with pytest.raises(ValueError, match="samples_per_class must be >= 1"):
    digits.balanced_labels(10, 0)
  with pytest.raises(ValueError, match="one label each"):
    judge.score(images[:4], labels[:3])


def test_known_distances_and_size_checks():
  np.testing.assert_array_equal(digits.evenly_spaced(10, 4), [0, 3, 6, 9])
  assert len(set(digits.evenly_spaced(500, 500))) == 500
  with pytest.raises(ValueError, match="cannot pick 5 distinct indices out of 4"):
    digits.evenly_spaced(4, 5)


# ------------------------------------------------------------------------------------------------ evaluate_text_samples
class _ScriptedRun:
  """Stands in for a text-to-image stage-2 run (`loader.Stage2Model`): the 'RQ-VAE' decodes code map i (every code
  equal to i) into held-out digit i exactly, the 'tokenizer' gives prompt j the token j, and the 'sampler' draws for
  prompt j: the first held-out digit (draft: a collapsed sampler), then prompt j's own held-out digit (revision 1)."""

  def __init__(self, config, held_out, prompt_index):
    self.config, self.held_out, self.prompt_index = config, held_out, prompt_index
    self.model = types.SimpleNamespace(is_text=True)

  def images(self, codes):
    return self.held_out[np.asarray(codes).reshape(len(codes), -1)[:, 0]]

  def tokenizer(self):
    return types.SimpleNamespace(encode=lambda prompts: np.arange(len(prompts), dtype=np.int32)[:, None])

  def sample_codes(self, loaded, cond, rng, **kwargs):
    del rng, kwargs
    assert loaded is self
    own = self.prompt_index[np.asarray(cond)[:, 0]]
    return np.stack([np.zeros_like(own), own])[:, :, None, None] * np.ones((1, 1, 16, 2), np.int64)


@pytest.mark.slow  # 18 s on the loaded 2-core CPU: both digit splits and a 5-step judge (sampler and RQ-VAE scripted)
def test_evaluate_text_samples_end_to_end(tmp_path, monkeypatch):
  # The library function on a scripted run over the real embedded digits and a real caption code dataset, so every
  # row has a known value.
  from ctxrq_jax.core import config as configlib  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.data import codes as codes_lib  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.data import digit_captions  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.data import code_captions  # pylint: disable=g-import-not-at-top
  from tests import helpers  # pylint: disable=g-import-not-at-top

  s1 = helpers.tiny_stage1_config()
  configlib.save_snapshot(s1, str(tmp_path / "stage1"))
  x_tr, _ = digits.load_split(s1.data, s1.data.train_split)
  x_te, y_te = digits.load_split(s1.data, s1.data.eval_split)
  captions = digit_captions.captions(y_te, digit_captions.attribute_bins(x_te, digit_captions.fit_thresholds(x_tr)))
  codes_dir = tmp_path / "codes"
  n = len(x_te)
  with codes_lib.CodeDatasetWriter(str(codes_dir), code_shape=(4, 4, 2), codebook=np.ones((n, 2), np.float32),
                                   num_classes=0, cond_length=1, cond_vocab_size=n, source="test") as w:
    w.write(s1.data.eval_split, np.arange(n)[:, None, None, None] * np.ones((1, 4, 4, 2), np.int64),
            np.arange(n)[:, None])
  (codes_dir / code_captions.CAPTIONS_FILE.format(split=s1.data.eval_split)).write_text("".join(
      f"{c}\n" for c in captions))
  config = configlib.load_config_file("cc3m", "tiny")
  with config.unlocked():
    config.data.update(codes_dir=str(codes_dir), stage1_dir=str(tmp_path / "stage1" / "rqvae"),
                       eval_split=s1.data.eval_split)
  num_prompts = 40
  run = _ScriptedRun(config, x_te, digits.evenly_spaced(n, num_prompts))
  monkeypatch.setattr(digits.loader, "Stage2Model", lambda workdir: run)
  monkeypatch.setattr(digits.runner, "sample_codes", run.sample_codes)

  r = digits.evaluate_text_samples("unused", num_prompts=num_prompts, samples_per_prompt=1, classifier_steps=5)
  assert r["num_samples"] == num_prompts and r["num_reference"] == len(x_tr)
  # One sample per prompt: the M real digits are exactly the prompts' digits, which the scripted RQ-VAE reproduces
  # and revision 1 draws, so the three rows are equal; the collapsed draft loses recall and distance.
  rows = r["rows"]
  assert list(rows) == ["real held-out digits", "RQ-VAE reconstructions", "samples: draft", "samples: revision 1"]
  assert rows["RQ-VAE reconstructions"] == rows["real held-out digits"] == rows["samples: revision 1"]
  assert rows["samples: draft"]["recall"] < rows["samples: revision 1"]["recall"]
  assert rows["samples: draft"]["fd"] > rows["samples: revision 1"]["fd"] + 1.0
  # Faithfulness: the prompts' own digits match their captions' attributes exactly (same measurements, same
  # thresholds), and their digit as often as the CNN is right on them.
  assert r["revision 1"] == r["reconstructions"]
  assert all(r["revision 1"][a] == 1.0 for a in digit_captions.ATTRIBUTES)
  assert r["revision 1"]["digit"] == pytest.approx(rows["real held-out digits"]["accuracy"])
  report = digits.format_text_results(r)
  assert "agreement with the prompt" in report and "FD" in report and "samples: revision 1" in report
  # Sets of unequal size are refused: 400 prompts x 2 samples against 500 held-out digits.
  with pytest.raises(ValueError, match="800 samples, more than the 500 held-out digits"):
    digits.evaluate_text_samples("unused", num_prompts=400, samples_per_prompt=2, classifier_steps=5)
