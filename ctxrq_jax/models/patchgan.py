"""PatchGAN discriminator for stage-1 training (its losses are in ctxrq_jax/stage1/losses.py).

The discriminator follows the taming-transformers NLayerDiscriminator layout: a 4x4 stride-2 conv + LeakyReLU(0.2),
then n_layers - 1 blocks of 4x4 stride-2 conv (width ndf * min(2^n, 8)) + norm + LeakyReLU, one 4x4 stride-1 block,
and a 4x4 stride-1 conv to one logit per patch (padding 1 everywhere).

Norm: the reference uses BatchNorm. We use GroupNorm (or none) instead: it keeps no running statistics, so the
discriminator is a pure function of (params, images) with no mutable `batch_stats` to thread through the train
state, behaves the same in training and evaluation, and needs no cross-device statistics synchronisation. Conv
weights are drawn from N(0, 0.02) as in the reference.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class PatchGANDiscriminator(nn.Module):
  """Images [B, H, W, C] -> patch logits [B, H', W', 1] (float32).

  Attributes:
    ndf: width of the first layer.
    n_layers: number of stride-2 convolutions.
    norm: 'group' (GroupNorm with `norm_groups` groups) or 'none'.
    norm_groups: groups of the GroupNorm; must divide every hidden width.
    dtype: compute dtype.
  """

  ndf: int = 64
  n_layers: int = 3
  norm: str = "group"
  norm_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4:
      raise ValueError(f"discriminator expects images [B, H, W, C], got shape {tuple(x.shape)}")
    if self.norm not in ("group", "none"):
      raise ValueError(f"discriminator norm must be 'group' or 'none', got {self.norm!r}")
    if self.n_layers < 1:
      raise ValueError(f"discriminator n_layers must be >= 1, got {self.n_layers}")
    init = nn.initializers.normal(0.02)

    def conv(h, features, stride, use_bias, name):
      return nn.Conv(
          features, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)), use_bias=use_bias,
          kernel_init=init, dtype=self.dtype, param_dtype=jnp.float32, name=name,
      )(h)

    def norm_act(h, name):
      if self.norm == "group":
        h = nn.GroupNorm(num_groups=self.norm_groups, epsilon=1e-5, dtype=self.dtype, param_dtype=jnp.float32,
                         name=name)(h)
      return nn.leaky_relu(h, 0.2)

    use_bias = self.norm == "none"  # a norm's own bias makes the conv bias redundant
    h = nn.leaky_relu(conv(x.astype(self.dtype), self.ndf, 2, True, "conv_0"), 0.2)
    for n in range(1, self.n_layers + 1):
      stride = 2 if n < self.n_layers else 1
      h = conv(h, self.ndf * min(2**n, 8), stride, use_bias, f"conv_{n}")
      h = norm_act(h, f"norm_{n}")
    h = conv(h, 1, 1, True, f"conv_{self.n_layers + 1}")
    return h.astype(jnp.float32)
