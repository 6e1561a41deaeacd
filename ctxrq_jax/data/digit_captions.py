"""Captions for the embedded digits from their class and from what can be measured on their pixels, for the offline
text-to-image demo: "a wide thick rightward seven".

Three attributes, each measured on a digit image [H, W, 1] in [-1, 1] (the stage-1 preprocessing, so real digits,
their reconstructions and generated samples are measured alike) with pure numpy over the whole batch:
  width      the ink's horizontal spread: twice the ink-weighted standard deviation of x, in pixels
  thickness  ink mass per bounding-box row: sum of ink intensity / the height of the rows holding a pixel above
             `ink_level` (a thick stroke lays more ink per row)
  slant      the second-moment shear of the ink: cov(x, y) / var(y) with y growing downwards, so a digit whose top
             leans to the right has a negative covariance; reported as -cov / var (positive = right-leaning)
Each attribute is binned by thresholds taken from quantiles of the training digits (`fit_thresholds`): two bins for
width and thickness (at the median) and three for slant (at the terciles), so chance agreement is 1/2, 1/2 and 1/3.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# name -> words of its bins, in increasing order of the measurement.
ATTRIBUTES = {
    "width": ("narrow", "wide"),
    "thickness": ("thin", "thick"),
    "slant": ("leftward", "upright", "rightward"),
}
INK_LEVEL = 0.25  # a pixel is ink when its intensity in [0, 1] exceeds this


def measure(images: np.ndarray, ink_level: float = INK_LEVEL) -> dict[str, np.ndarray]:
  """images float [B, H, W, 1] in [-1, 1] -> {'width', 'thickness', 'slant'}: float64 [B] each (see module doc).

  A blank image measures width 0, thickness 0 and slant 0.
  """
  images = np.asarray(images, np.float64)
  if images.ndim != 4 or images.shape[-1] != 1:
    raise ValueError(f"expected grey images [B, H, W, 1], got shape {images.shape}")
  ink = np.clip((images[..., 0] + 1.0) / 2.0, 0.0, 1.0)  # [B, H, W] in [0, 1]
  inked_rows = (ink > ink_level).any(axis=2)  # [B, H]
  rows = np.arange(ink.shape[1])
  first = np.where(inked_rows.any(1), np.argmax(inked_rows, axis=1), 0)
  last = np.where(inked_rows.any(1), ink.shape[1] - 1 - np.argmax(inked_rows[:, ::-1], axis=1), -1)
  height = (last - first + 1).astype(np.float64)
  mass = ink.sum(axis=(1, 2))
  thickness = np.where(height > 0, mass / np.maximum(height, 1.0), 0.0)
  total = np.maximum(mass, 1e-9)
  y, x = np.meshgrid(rows.astype(np.float64), np.arange(ink.shape[2], dtype=np.float64), indexing="ij")
  my = (ink * y).sum(axis=(1, 2)) / total
  mx = (ink * x).sum(axis=(1, 2)) / total
  dy, dx = y[None] - my[:, None, None], x[None] - mx[:, None, None]
  cov = (ink * dx * dy).sum(axis=(1, 2)) / total
  var = (ink * dy * dy).sum(axis=(1, 2)) / total
  slant = np.where(var > 1e-9, -cov / np.maximum(var, 1e-9), 0.0)
  width = 2.0 * np.sqrt((ink * dx * dx).sum(axis=(1, 2)) / total)
  return {"width": width, "thickness": thickness, "slant": slant}


@dataclasses.dataclass(frozen=True)
class Thresholds:
  """Bin edges per attribute (len(words) - 1 increasing values each)."""
  edges: Mapping[str, tuple[float, ...]]

  def to_json(self) -> dict[str, list[float]]:
    return {k: list(v) for k, v in self.edges.items()}

  @classmethod
  def from_json(cls, raw: Mapping[str, list[float]]) -> Thresholds:
    missing = set(ATTRIBUTES) - set(raw)
    if missing:
      raise ValueError(f"thresholds lack attributes {sorted(missing)}")
    return cls({k: tuple(float(x) for x in raw[k]) for k in ATTRIBUTES})


def fit_thresholds(images: np.ndarray) -> Thresholds:
  """Quantile bin edges of the attributes over `images` (the training digits): equal-count bins."""
  values = measure(images)
  edges = {}
  for name, words in ATTRIBUTES.items():
    qs = np.linspace(0, 1, len(words) + 1)[1:-1]
    edges[name] = tuple(float(q) for q in np.quantile(values[name], qs))
  return Thresholds(edges)


def attribute_bins(images: np.ndarray, thresholds: Thresholds) -> dict[str, np.ndarray]:
  """images [B, H, W, 1] -> {attribute: int32 [B] bin index into ATTRIBUTES[attribute]}."""
  values = measure(images)
  return {name: np.searchsorted(np.asarray(thresholds.edges[name]), values[name], side="right").astype(np.int32)
          for name in ATTRIBUTES}


def captions(labels: np.ndarray, bins: Mapping[str, np.ndarray]) -> list[str]:
  """'a {width} {thickness} {slant} {digit}' for each label [B] and attribute bins."""
  labels = np.asarray(labels)
  words = {name: np.asarray(ATTRIBUTES[name])[np.asarray(bins[name])] for name in ATTRIBUTES}
  return [f"a {w} {t} {sl} {DIGIT_WORDS[int(y)]}"
          for y, w, t, sl in zip(labels, words["width"], words["thickness"], words["slant"])]


def parse_caption(caption: str) -> tuple[int, dict[str, int]]:
  """Inverse of `captions` for one caption: (digit, {attribute: bin}); ValueError on anything else."""
  parts = caption.split()
  if len(parts) != 5 or parts[0] != "a":
    raise ValueError(f"not a digit caption: {caption!r}")
  try:
    digit = DIGIT_WORDS.index(parts[4])
    bins = {name: ATTRIBUTES[name].index(word) for name, word in zip(ATTRIBUTES, parts[1:4])}
  except ValueError as e:
    raise ValueError(f"not a digit caption: {caption!r}") from e
  return digit, bins


__all__ = ["ATTRIBUTES", "DIGIT_WORDS", "Thresholds", "attribute_bins", "captions", "fit_thresholds", "measure",
           "parse_caption"]
