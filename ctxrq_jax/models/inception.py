"""The FID Inception-v3 (pytorch-fid's `fid_inception_v3`) in Flax: the network behind FID, sFID, Inception Score
and precision/recall numbers in the image-generation literature.

The network is torchvision's Inception-v3 skeleton as pytorch-fid patches it to reproduce the 2015-12-05 TensorFlow
graph: 1008 classes, no auxiliary head, convolutions without bias followed by BatchNorm (eps 1e-3) and ReLU, and four
replaced block types:

  Mixed_5b/5c/5d  FIDInceptionA    pool branch: 3x3 average pool, stride 1, pad 1, padding NOT counted
  Mixed_6b..6e    FIDInceptionC    pool branch: as A
  Mixed_7b        FIDInceptionE_1  pool branch: as A
  Mixed_7c        FIDInceptionE_2  pool branch: 3x3 MAX pool, stride 1, pad 1
  stem, Mixed_6a (InceptionB), Mixed_7a (InceptionD): torchvision's, unchanged.

Module and parameter names follow the PyTorch module tree (`Mixed_5b/branch1x1/conv/kernel` is
`Mixed_5b.branch1x1.conv.weight`), so `inception_convert` maps the released weights key for key.

Layout is NHWC. The network takes float32 images already resized (299x299 for the released weights) and normalised
to the range the weights expect, [-1, 1]; `ctxrq_jax.evaluation.inception_features` does that from uint8 images.
BatchNorm always runs in inference mode: a pure function of `params` (scale, bias) and `batch_stats` (mean, var).

Outputs (`FIDInceptionV3.__call__`), for an input [B, H, W, 3] with H, W >= 75:
  pool             [B, 2048]  global average pool of Mixed_7c (FID, precision/recall)
  logits           [B, 1008]  fc(pool) with bias (pytorch-fid's `fc`)
  logits_unbiased  [B, 1008]  pool @ fc.kernel without the bias: what the ADM evaluator feeds its softmax for the
                              Inception Score (the TF graph's `softmax/logits/MatMul`)
  spatial          [B, h, w, 192] (only with `spatial=True`) Mixed_6d.branch1x1's output (after its ReLU), which is
                              the TF graph's `mixed_6/conv`; sFID uses its first 7 channels. h = w = 17 at 299x299.
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from ctxrq_jax.models import common

NUM_CLASSES = 1008
POOL_FEATURES = 2048
SPATIAL_CHANNELS = 192  # Mixed_6d.branch1x1
MIN_SIZE = 75  # the smallest input whose Mixed_7 blocks still have a 1x1 map
BN_EPSILON = 1e-3

# Convolutions and the final matmul run at full float32 precision: on GPUs and TPUs the default precision would use
# TF32 / bfloat16 passes, which moves FID in the second decimal.
DEFAULT_PRECISION = lax.Precision.HIGHEST


def avg_pool_3x3_exclude_pad(x: jax.Array) -> jax.Array:
  """3x3 average pool, stride 1, padding 1, averaging only the in-image taps (torch `count_include_pad=False`).

  Args:
    x: [B, H, W, C].

  Returns:
    [B, H, W, C]; a constant input stays exactly constant, borders and corners included (a corner averages 4 taps,
    an edge 6, the interior 9).
  """
  chex.assert_rank(x, 4)
  window, strides = (1, 3, 3, 1), (1, 1, 1, 1)
  padding = ((0, 0), (1, 1), (1, 1), (0, 0))
  sums = lax.reduce_window(x, jnp.zeros((), x.dtype), lax.add, window, strides, padding)
  ones = jnp.ones((1, x.shape[1], x.shape[2], 1), x.dtype)
  counts = lax.reduce_window(ones, jnp.zeros((), x.dtype), lax.add, window, strides, padding)
  return sums / counts


def max_pool_3x3(x: jax.Array, stride: int) -> jax.Array:
  """3x3 max pool: stride 2 without padding (torch `MaxPool2d(3, 2)`, floor mode) or stride 1 with padding 1
  (`max_pool2d(x, 3, 1, 1)`, padding never wins)."""
  if stride == 2:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
  return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


class BasicConv2d(nn.Module):
  """conv (no bias) -> BatchNorm (inference, eps 1e-3) -> ReLU; torchvision's `BasicConv2d`.

  [B, H, W, Cin] -> [B, H', W', features] with H' = (H + 2 * padding[0] - kernel[0]) // strides[0] + 1.
  """

  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: tuple[int, int] = (0, 0)
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    (ph, pw) = self.padding
    x = nn.Conv(self.features, self.kernel_size, strides=self.strides, padding=((ph, ph), (pw, pw)),
                use_bias=False, precision=self.precision, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name="bn")(x)
    return nn.relu(x)


class FIDInceptionA(nn.Module):
  """Mixed_5b/5c/5d: [B, H, W, C] -> [B, H, W, 224 + pool_features]."""

  pool_features: int
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda *a, **k: BasicConv2d(*a, precision=self.precision, **k)  # noqa: E731
    b1 = conv(64, (1, 1), name="branch1x1")(x)
    b5 = conv(48, (1, 1), name="branch5x5_1")(x)
    b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = conv(self.pool_features, (1, 1), name="branch_pool")(avg_pool_3x3_exclude_pad(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a (grid reduction): [B, H, W, C] -> [B, (H - 3) // 2 + 1, (W - 3) // 2 + 1, 480 + C]."""

  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda *a, **k: BasicConv2d(*a, precision=self.precision, **k)  # noqa: E731
    b3 = conv(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
    bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = conv(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, max_pool_3x3(x, 2)], axis=-1)


class FIDInceptionC(nn.Module):
  """Mixed_6b..6e: [B, H, W, C] -> [B, H, W, 768]; with `return_branch1x1` also branch1x1's output [B, H, W, 192]."""

  channels_7x7: int
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x: jax.Array, return_branch1x1: bool = False):
    conv = lambda *a, **k: BasicConv2d(*a, precision=self.precision, **k)  # noqa: E731
    c7 = self.channels_7x7
    b1 = conv(192, (1, 1), name="branch1x1")(x)
    b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
    b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = conv(192, (1, 1), name="branch_pool")(avg_pool_3x3_exclude_pad(x))
    out = jnp.concatenate([b1, b7, bd, bp], axis=-1)
    return (out, b1) if return_branch1x1 else out


class InceptionD(nn.Module):
  """Mixed_7a (grid reduction): [B, H, W, C] -> [B, (H - 3) // 2 + 1, (W - 3) // 2 + 1, 512 + C]."""

  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda *a, **k: BasicConv2d(*a, precision=self.precision, **k)  # noqa: E731
    b3 = conv(192, (1, 1), name="branch3x3_1")(x)
    b3 = conv(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
    b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = conv(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, max_pool_3x3(x, 2)], axis=-1)


class FIDInceptionE(nn.Module):
  """Mixed_7b (`pool='avg'`, FIDInceptionE_1) and Mixed_7c (`pool='max'`, FIDInceptionE_2):
  [B, H, W, C] -> [B, H, W, 2048]."""

  pool: str  # 'avg' (count_include_pad=False) or 'max'
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.pool not in ("avg", "max"):
      raise ValueError(f"FIDInceptionE.pool must be 'avg' or 'max', got {self.pool!r}")
    conv = lambda *a, **k: BasicConv2d(*a, precision=self.precision, **k)  # noqa: E731
    b1 = conv(320, (1, 1), name="branch1x1")(x)
    b3 = conv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    pooled = avg_pool_3x3_exclude_pad(x) if self.pool == "avg" else max_pool_3x3(x, 1)
    bp = conv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class _Logits(nn.Module):
  """torch `nn.Linear(2048, num_classes)`: [B, 2048] -> (pool @ kernel + bias, pool @ kernel), each [B, classes]."""

  features: int
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    unbiased = jnp.dot(x, kernel, precision=self.precision)
    return unbiased + bias, unbiased


class FIDInceptionV3(nn.Module):
  """pytorch-fid's FID Inception-v3; see the module docstring for the outputs.

  Attributes:
    num_classes: 1008 for the released weights.
    precision: matmul/conv precision (HIGHEST: true float32 on every backend).
  """

  num_classes: int = NUM_CLASSES
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x: jax.Array, *, spatial: bool = False) -> dict[str, jax.Array]:
    """x: float [B, H, W, 3] in the network's input range ([-1, 1]), H, W >= 75 (299 for FID)."""
    chex.assert_rank(x, 4)
    chex.assert_axis_dimension(x, -1, 3)
    chex.assert_type(x, float)
    if min(x.shape[1], x.shape[2]) < MIN_SIZE:
      raise ValueError(f"FID Inception needs images of at least {MIN_SIZE}x{MIN_SIZE}, got {x.shape[1:3]}")
    p = self.precision
    x = BasicConv2d(32, (3, 3), strides=(2, 2), precision=p, name="Conv2d_1a_3x3")(x)
    x = BasicConv2d(32, (3, 3), precision=p, name="Conv2d_2a_3x3")(x)
    x = BasicConv2d(64, (3, 3), padding=(1, 1), precision=p, name="Conv2d_2b_3x3")(x)
    x = max_pool_3x3(x, 2)
    x = BasicConv2d(80, (1, 1), precision=p, name="Conv2d_3b_1x1")(x)
    x = BasicConv2d(192, (3, 3), precision=p, name="Conv2d_4a_3x3")(x)
    x = max_pool_3x3(x, 2)
    x = FIDInceptionA(32, precision=p, name="Mixed_5b")(x)
    x = FIDInceptionA(64, precision=p, name="Mixed_5c")(x)
    x = FIDInceptionA(64, precision=p, name="Mixed_5d")(x)
    x = InceptionB(precision=p, name="Mixed_6a")(x)
    x = FIDInceptionC(128, precision=p, name="Mixed_6b")(x)
    x = FIDInceptionC(160, precision=p, name="Mixed_6c")(x)
    x, spatial_map = FIDInceptionC(160, precision=p, name="Mixed_6d")(x, return_branch1x1=True)
    x = FIDInceptionC(192, precision=p, name="Mixed_6e")(x)
    x = InceptionD(precision=p, name="Mixed_7a")(x)
    x = FIDInceptionE("avg", precision=p, name="Mixed_7b")(x)
    x = FIDInceptionE("max", precision=p, name="Mixed_7c")(x)
    pool = jnp.mean(x, axis=(1, 2))
    logits, unbiased = _Logits(self.num_classes, precision=p, name="fc")(pool)
    chex.assert_shape(pool, (x.shape[0], POOL_FEATURES))
    out = {"pool": pool, "logits": logits, "logits_unbiased": unbiased}
    if spatial:
      out["spatial"] = spatial_map
    return out


def init_variables(model: FIDInceptionV3, rng: jax.Array, image_size: int = MIN_SIZE) -> dict[str, Any]:
  """Random {'params', 'batch_stats'} (the shapes do not depend on `image_size`; `abstract_variables` for shapes)."""
  return dict(model.init(rng, jnp.zeros((1, image_size, image_size, 3), jnp.float32)))


@common.memoised_shapes
def abstract_variables(model: FIDInceptionV3) -> dict[str, Any]:
  """`init_variables(model, ...)` as ShapeDtypeStructs: nothing allocated, traced once per model in a process."""
  return jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))
