"""CLIP's image preprocessing (OpenAI's `preprocess`, open_clip's inference transform for OpenAI models), on uint8
RGB images of any size:

  1. resize the shorter side to S (224) with PIL's bicubic filter (antialiased, as PIL always is when shrinking), the
     longer side to int(S * long / short) (torchvision `Resize(S)` on a PIL image);
  2. centre crop S x S, the offsets int(round((H - S) / 2)) and int(round((W - S) / 2)) (torchvision `CenterCrop`;
     Python's round, halves to even);
  3. x / 255, minus MEAN, over STD, per channel (torchvision `ToTensor` + `Normalize`).

Steps 1-2 run on the host in PIL (`resize_and_crop`, uint8 in and out, so the device receives S x S uint8 crops);
step 3 is `normalize`, a pure function run inside the jitted CLIP call. `preprocess` is the three together.
"""

from __future__ import annotations

from typing import Any

import chex
import jax.numpy as jnp
import numpy as np
from PIL import Image

IMAGE_SIZE = 224
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def resized_size(height: int, width: int, size: int = IMAGE_SIZE) -> tuple[int, int]:
  """(new_h, new_w) with the shorter side `size` and the longer int(size * long / short), as torchvision computes."""
  short, long = min(height, width), max(height, width)
  new_long = int(size * long / short)
  return (size, new_long) if height <= width else (new_long, size)


def resize_and_crop(image: Any, size: int = IMAGE_SIZE) -> np.ndarray:
  """One image (uint8 [H, W, 3] array, or a PIL image of any mode) -> uint8 [size, size, 3] (steps 1-2)."""
  if not isinstance(image, Image.Image):
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
      raise ValueError(f"an image must be uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
    image = Image.fromarray(image, "RGB")
  image = image.convert("RGB")
  w, h = image.size
  new_h, new_w = resized_size(h, w, size)
  if (new_h, new_w) != (h, w):
    image = image.resize((new_w, new_h), Image.BICUBIC)
  top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
  out = np.asarray(image.crop((left, top, left + size, top + size)), np.uint8)
  chex.assert_shape(out, (size, size, 3))
  return out


def resize_and_crop_batch(images: Any, size: int = IMAGE_SIZE) -> np.ndarray:
  """uint8 [B, H, W, 3] (or a sequence of images of different sizes) -> uint8 [B, size, size, 3]."""
  return np.stack([resize_and_crop(im, size) for im in images]) if len(images) else np.zeros((0, size, size, 3),
                                                                                              np.uint8)


def normalize(crops: Any) -> Any:
  """uint8 [B, S, S, 3] -> float32 [B, S, S, 3]: x / 255, then (x - MEAN) / STD per channel (step 3). Works on
  numpy and jax arrays (jax in, jax out)."""
  chex.assert_rank(crops, 4)
  chex.assert_axis_dimension(crops, -1, 3)
  xp = jnp if not isinstance(crops, np.ndarray) else np
  x = crops.astype(xp.float32) / xp.float32(255.0)
  return (x - xp.asarray(MEAN, xp.float32)) / xp.asarray(STD, xp.float32)


def preprocess(images: Any, size: int = IMAGE_SIZE) -> np.ndarray:
  """uint8 images [B, H, W, 3] -> float32 [B, size, size, 3], CLIP's input (steps 1-3)."""
  return normalize(resize_and_crop_batch(images, size))
