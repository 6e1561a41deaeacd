"""The digit judge (ctxrq_jax/evaluation/digits.py): known values of its Fréchet distance and precision/recall."""

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


def test_the_reference_itself_scores_perfectly(judge_and_data):
  judge, images, labels = judge_and_data
  m = judge.score(images, labels)
  assert abs(m["fd"]) < 1e-6 * max(1.0, float(np.trace(judge.reference_stats.sigma)))
  assert m["precision"] == 1.0 and m["recall"] == 1.0
  assert m["accuracy"] > 0.9  # bars are easy


def test_collapse_keeps_precision_and_accuracy_but_loses_recall_and_distance(judge_and_data):
  # The failure a class-accuracy-only judge cannot see: one prototype per class, repeated.
  judge, images, labels = judge_and_data
  collapsed = np.concatenate([np.repeat(images[:1], 80, 0), np.repeat(images[1:2], 80, 0)])
  collapsed_labels = np.repeat(labels[:2], 80)
  full, col = judge.score(images, labels), judge.score(collapsed, collapsed_labels)
  assert col["precision"] == 1.0 and col["accuracy"] >= full["accuracy"] - 0.05
  assert col["recall"] < 0.2 < full["recall"]
  assert col["fd"] > full["fd"] + 1.0


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
