"""Small helpers every model shares: dtype names from configs, parameter counts."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ctxrq_jax.core.config import ConfigError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def parse_dtype(name: Any, key: str = "dtype") -> Any:
  """'float32' / 'bfloat16' / 'float16' (or a dtype) -> jnp dtype; ConfigError naming `key` otherwise."""
  if isinstance(name, str):
    if name not in DTYPES:
      raise ConfigError(f"model.{key} must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]
  return jnp.dtype(name).type


def count_params(tree: Any) -> int:
  """Number of scalars in a pytree of arrays / ShapeDtypeStructs (logically boxed leaves are unboxed)."""
  return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(nn.meta.unbox(tree))))
