"""Captions of the embedded digits from their class and measured pixels (ctxrq_jax/data/digit_captions.py)."""

import numpy as np
import pytest

from ctxrq_jax.data import digit_captions as dc


def _canvas(n=1, size=32):
  return -np.ones((n, size, size, 1))


def _line(img, top, bottom, width, lean=0):
  """Draws a vertical stroke `width` pixels wide from row top to bottom, shifted `lean` columns right at the top."""
  for r in range(top, bottom):
    shift = round(lean * (bottom - r) / (bottom - top))
    img[r, 14 + shift:14 + shift + width, 0] = 1.0
  return img


def test_measurements_follow_the_strokes():
  imgs = _canvas(5)
  _line(imgs[0], 6, 26, 2)  # thin, upright
  _line(imgs[1], 6, 26, 5)  # thick, upright
  _line(imgs[2], 6, 26, 2, lean=8)  # top to the right: right-leaning
  _line(imgs[3], 6, 26, 2, lean=-8)  # left-leaning
  m = dc.measure(imgs)
  assert m["thickness"][1] > 2 * m["thickness"][0]
  assert m["slant"][2] > 0.2 > abs(m["slant"][0]) and m["slant"][3] < -0.2
  assert m["width"][2] > m["width"][0] and m["width"][1] > m["width"][0]
  assert m["width"][4] == m["thickness"][4] == m["slant"][4] == 0  # blank
  with pytest.raises(ValueError, match="grey images"):
    dc.measure(np.zeros((2, 8, 8, 3)))


def test_thresholds_bins_captions_and_parsing():
  rng = np.random.default_rng(0)
  imgs = _canvas(60)
  for i, img in enumerate(imgs):
    _line(img, 4 + i % 5, 26, 1 + i % 4, lean=int(rng.integers(-8, 9)))
  th = dc.fit_thresholds(imgs)
  assert [len(th.edges[a]) for a in dc.ATTRIBUTES] == [1, 1, 2]
  assert dc.Thresholds.from_json(th.to_json()) == th
  bins = dc.attribute_bins(imgs, th)
  counts = np.bincount(bins["slant"], minlength=3)
  assert counts.min() >= 15  # tercile edges: near-equal bins
  labels = np.arange(60) % 10
  caps = dc.captions(labels, bins)
  assert caps[7].startswith("a ") and caps[7].endswith(" seven")
  for caption, y, i in zip(caps, labels, range(60)):
    digit, parsed = dc.parse_caption(caption)
    assert digit == y and parsed == {a: int(bins[a][i]) for a in dc.ATTRIBUTES}
  with pytest.raises(ValueError, match="not a digit caption"):
    dc.parse_caption("a wide thick rightward eleven")
  with pytest.raises(ValueError, match="lack attributes"):
    dc.Thresholds.from_json({"width": [1.0]})
