"""Config sections shared by both stages, so both name the same things the same way."""

from __future__ import annotations

import ml_collections

# Logical axis -> mesh axes, in priority order (the axis names are listed in ctxrq_jax/models/transformer.py).
# Flax gives each mesh axis to at most one dimension of an array, so activations ('batch', ..., 'embed') take fsdp
# for the batch and leave the width replicated, while parameters ('embed', 'mlp') are sharded over fsdp and tensor.
DEFAULT_SHARDING_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("code", None),
    ("length", None),
    ("depth", None),
)


def optim(*, learning_rate: float, b1: float, b2: float, weight_decay: float, warmup_steps: int, end_lr_ratio: float,
          grad_clip: float, eps: float = 1e-8, schedule: str = "cosine") -> ml_collections.ConfigDict:
  """The `optim` section (ctxrq_jax/core/optim.py): AdamW, linear warmup then `schedule`, global-norm clipping.

  schedule: 'cosine' (decays to end_lr_ratio * learning_rate at the last step) or 'constant'.
  grad_clip: maximum global gradient norm; 0 = no clipping.
  Weight decay applies to kernels only (not biases, norms, embeddings or position tables).
  """
  return ml_collections.ConfigDict(dict(learning_rate=learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                                        warmup_steps=warmup_steps, schedule=schedule, end_lr_ratio=end_lr_ratio,
                                        grad_clip=grad_clip))


def mesh(data: int = -1, fsdp: int = 1, tensor: int = 1) -> ml_collections.ConfigDict:
  """The `mesh` section: sizes of the ('data', 'fsdp', 'tensor') axes; -1 on one axis takes the remaining devices."""
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))
