"""CLIP's image preprocessing against open_clip's inference transform for OpenAI models (PIL bicubic, centre crop,
CLIP mean/std), on images of odd sizes."""

from __future__ import annotations

import numpy as np
from PIL import Image
import pytest

from ctxrq_jax.data import clip_images
from tests import clip_reference as ref


def test_equals_open_clips_transform():
  ref.import_open_clip()
  from open_clip.transform import image_transform  # pylint: disable=g-import-not-at-top
  transform = image_transform(224, is_train=False)  # its defaults: OpenAI's mean/std, bicubic, shortest side
  rng = np.random.default_rng(0)
  for h, w in [(256, 256), (225, 301), (500, 97), (224, 224), (100, 80), (227, 400), (64, 64)]:
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    got = clip_images.preprocess(image[None])[0]
    want = transform(Image.fromarray(image)).numpy().transpose(1, 2, 0)
    assert got.shape == (224, 224, 3) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want, err_msg=f"{h}x{w}")


def test_sizes_and_normalisation():
  assert clip_images.resized_size(256, 256) == (224, 224)
  assert clip_images.resized_size(225, 301) == (224, int(224 * 301 / 225))
  assert clip_images.resized_size(500, 97) == (int(224 * 500 / 97), 224)
  white = np.full((1, 2, 2, 3), 255, np.uint8)
  np.testing.assert_allclose(clip_images.normalize(white)[0, 0, 0],
                             (1 - np.array(clip_images.MEAN)) / np.array(clip_images.STD), rtol=1e-6)
  with pytest.raises(ValueError, match="uint8"):
    clip_images.resize_and_crop(np.zeros((4, 4, 3), np.float32))
