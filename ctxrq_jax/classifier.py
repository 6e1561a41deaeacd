"""A small CNN digit classifier trained on the embedded set, to score class-conditional samples.

Used by `python -m ctxrq_jax.evaluate samples`: the fraction of generated digits that the classifier assigns to
their conditioning class is a cheap stand-in for FID/IS-style fidelity on MNIST.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


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


def _batches(images: np.ndarray, labels: np.ndarray, batch_size: int, rng: np.random.Generator):
  while True:
    order = rng.permutation(len(images))
    for i in range(0, len(order) - batch_size + 1, batch_size):
      idx = order[i:i + batch_size]
      yield images[idx], labels[idx]


def train_classifier(train_images: np.ndarray, train_labels: np.ndarray, *, num_classes: int, steps: int = 400,
                     batch_size: int = 128, lr: float = 2e-3, seed: int = 0) -> tuple[DigitCNN, Any]:
  """Trains `DigitCNN` with Adam on images [M, H, W, C] in [-1, 1]; returns (model, params)."""
  if len(train_images) < batch_size:
    raise ValueError(f"need at least batch_size={batch_size} training images, got {len(train_images)}")
  model = DigitCNN(num_classes=num_classes)
  params = model.init(jax.random.key(seed), jnp.zeros((1, *train_images.shape[1:])))["params"]
  tx = optax.adam(lr)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  it = _batches(train_images, train_labels, batch_size, np.random.default_rng(seed))
  for _ in range(steps):
    x, y = next(it)
    params, opt_state, _ = step(params, opt_state, jnp.asarray(x), jnp.asarray(y))
  return model, params


def predict(model: DigitCNN, params: Any, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
  """Predicted class ids int32 [M] for images [M, H, W, C] in [-1, 1]."""
  fn = jax.jit(lambda p, x: jnp.argmax(model.apply({"params": p}, x), axis=-1))
  out = [np.asarray(fn(params, jnp.asarray(images[i:i + batch_size]))) for i in range(0, len(images), batch_size)]
  return np.concatenate(out).astype(np.int32) if out else np.zeros((0,), np.int32)
