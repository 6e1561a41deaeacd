"""A small CNN digit classifier: the judge of the demo's class-conditional samples (ctxrq_jax/evaluation/digits.py)."""

from __future__ import annotations


import flax.linen as nn
import jax


class DigitCNN(nn.Module):
  """[B, H, W, C] in [-1, 1] -> logits [B, num_classes]."""

  num_classes: int = 10
  width: int = 32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i, f in enumerate((self.width, 2 * self.width)):
      x = nn.relu(nn.Conv(f, (3, 3), name=f"conv{i}")(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(128, name="hidden")(x))
    return nn.Dense(self.num_classes, name="out")(x)
