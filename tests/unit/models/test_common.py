"""Helpers every model shares (ctxrq_jax/models/common.py): dtype names and parameter counts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxrq_jax.core.config import ConfigError
from ctxrq_jax.models import common


def test_parse_dtype():
  assert common.parse_dtype("float32") is jnp.float32
  assert common.parse_dtype("bfloat16") is jnp.bfloat16
  assert jnp.dtype(common.parse_dtype(np.float16)) == jnp.float16  # a dtype passes through
  with pytest.raises(ConfigError, match=r"model.param_dtype must be one of \['bfloat16', 'float16', 'float32'\], "
                                        r"got 'fp8'"):
    common.parse_dtype("fp8", "param_dtype")


def test_count_params_arrays_shapes_and_boxed_leaves():
  tree = {"a": np.zeros((3, 4)), "b": {"c": jax.ShapeDtypeStruct((5,), jnp.float32)},
          "d": nn.LogicallyPartitioned(jnp.zeros((2, 2)), names=("embed", "mlp"))}
  assert common.count_params(tree) == 12 + 5 + 4
  assert common.count_params({}) == 0
