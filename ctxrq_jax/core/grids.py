"""PNG image grids: what people look at after a run."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from ctxrq_jax.core import paths


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


def _save_png(path: str, img: Image.Image) -> str:
  """Writes `img` as a PNG at `path` (local or a bucket), atomically: a reader never sees half a PNG."""
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  target = paths.path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  paths.write_bytes(target, buf.getvalue())
  return path


def save_grid(path: str, images: np.ndarray, ncols: int, scale: int = 1) -> str:
  """Writes a PNG grid of [B, H, W, C] images (C = 1 or 3); `scale` enlarges small images (nearest)."""
  grid = make_grid(images, ncols)
  if grid.shape[-1] == 1:
    grid = grid[..., 0]
  img = Image.fromarray(grid)
  if scale > 1:
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
  return _save_png(path, img)


def _wrap(draw, text: str, font, width: int, max_lines: int) -> list[str]:
  """Greedy word wrap of `text` into at most `max_lines` lines of at most `width` pixels (the last one cut with
  "...": ASCII, which every font can draw)."""
  lines, line = [], ""
  for word in text.split():
    candidate = f"{line} {word}".strip()
    if draw.textlength(candidate, font=font) <= width or not line:
      line = candidate
    else:
      lines.append(line)
      line = word
  if line:
    lines.append(line)
  if len(lines) > max_lines:
    lines = lines[:max_lines]
    lines[-1] = lines[-1].rstrip() + "..." if draw.textlength(lines[-1] + "...", font=font) <= width else lines[-1]
  return [ln if draw.textlength(ln, font=font) <= width else ln[:max(1, width // 6)] for ln in lines]


def captioned_grid(images: np.ndarray, captions: list[str], ncols: int, scale: int = 1, pad: int = 2,
                   max_lines: int = 3) -> np.ndarray:
  """Tiles [B, H, W, C] images row-major with each caption written under its image -> uint8 RGB [rows, cols, 3].

  Images are enlarged `scale` times (nearest); captions are word-wrapped to the image width (at most `max_lines`
  lines, black on white, PIL's built-in font, so nothing is read from disk; without FreeType that is a Latin-1 bitmap
  font, and other characters are drawn as '?').
  """
  from PIL import ImageDraw  # pylint: disable=g-import-not-at-top
  from PIL import ImageFont  # pylint: disable=g-import-not-at-top

  images = to_uint8(images)
  if images.ndim != 4:
    raise ValueError(f"expected images [B, H, W, C], got shape {images.shape}")
  if len(captions) != len(images):
    raise ValueError(f"{len(captions)} captions for {len(images)} images")
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  b, h, w, _ = images.shape
  h, w = h * scale, w * scale
  font = ImageFont.load_default()
  if not isinstance(font, ImageFont.FreeTypeFont):
    # Pillow built without FreeType gives its bitmap font, which measures and draws Latin-1 only (anything else
    # raises UnicodeEncodeError): other characters are drawn as '?' rather than losing the whole preview.
    captions = [str(c).encode("latin-1", "replace").decode("latin-1") for c in captions]
  probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  line_height = int(probe.textbbox((0, 0), "Ag", font=font)[3]) + 2
  wrapped = [_wrap(probe, str(c), font, w, max_lines) for c in captions]
  text_h = line_height * max(1, max(len(lines) for lines in wrapped))
  ncols = max(1, min(ncols, b))
  nrows = -(-b // ncols)
  cell_h = h + text_h + pad
  canvas = Image.new("RGB", (ncols * (w + pad) + pad, nrows * (cell_h + pad) + pad), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  for i in range(b):
    r, col = divmod(i, ncols)
    x, y = pad + col * (w + pad), pad + r * (cell_h + pad)
    img = Image.fromarray(images[i])
    canvas.paste(img.resize((w, h), Image.NEAREST) if scale > 1 else img, (x, y))
    for j, line in enumerate(wrapped[i]):
      draw.text((x, y + h + pad + j * line_height), line, fill=(0, 0, 0), font=font)
  return np.asarray(canvas)


def save_captioned_grid(path: str, images: np.ndarray, captions: list[str], ncols: int, scale: int = 1) -> str:
  """Writes `captioned_grid` as a PNG (atomically); returns the path."""
  grid = captioned_grid(images, captions, ncols, scale)
  return _save_png(path, Image.fromarray(grid))
