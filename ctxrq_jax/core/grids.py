"""PNG image grids: what people look at after a run."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[B, H, W, C] float in [-1, 1] (or uint8) -> uint8 [B, H, W, C]."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  return np.clip(np.round((images.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, ncols: int, pad: int = 2, pad_value: int = 255) -> np.ndarray:
  """Tiles [B, H, W, C] images row-major into one uint8 [rows*(H+pad)+pad, ncols*(W+pad)+pad, C] array."""
  images = to_uint8(images)
  if images.ndim != 4:
    raise ValueError(f"expected images [B, H, W, C], got shape {images.shape}")
  b, h, w, c = images.shape
  ncols = max(1, min(ncols, b))
  nrows = -(-b // ncols)
  grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), pad_value, np.uint8)
  for i in range(b):
    r, col = divmod(i, ncols)
    y, x = pad + r * (h + pad), pad + col * (w + pad)
    grid[y:y + h, x:x + w] = images[i]
  return grid


def save_grid(path: str, images: np.ndarray, ncols: int, scale: int = 1) -> str:
  """Writes a PNG grid of [B, H, W, C] images (C = 1 or 3); `scale` enlarges small images (nearest)."""
  grid = make_grid(images, ncols)
  if grid.shape[-1] == 1:
    grid = grid[..., 0]
  img = Image.fromarray(grid)
  if scale > 1:
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.png"
  img.save(tmp)
  os.replace(tmp, path)  # atomic: a reader never sees half a PNG
  return path
