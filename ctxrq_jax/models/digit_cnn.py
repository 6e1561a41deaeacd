"""A small CNN digit classifier: the judge of the demo's class-conditional samples (ctxrq_jax/evaluation/digits.py)."""

from __future__ import annotations

import flax.linen as nn
import jax


class DigitCNN(nn.Module):
  """[B, H, W, C] in [-1, 1] -> logits [B, num_classes], or (logits, features [B, 128]) with `features=True`.

  The features (the ReLU hidden layer) are the space in which the demo's Fréchet distance and precision/recall are
  measured, as Inception's pool features are for ImageNet.
  """

  num_classes: int = 10
  width: int = 32
  hidden: int = 128

  @nn.compact
  def __call__(self, x: jax.Array, features: bool = False):
    for i, f in enumerate((self.width, 2 * self.width)):
      x = nn.relu(nn.Conv(f, (3, 3), name=f"conv{i}")(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    h = nn.relu(nn.Dense(self.hidden, name="hidden")(x))
    logits = nn.Dense(self.num_classes, name="out")(h)
    return (logits, h) if features else logits
