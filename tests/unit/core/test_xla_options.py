"""Per-program XLA compiler options (ctxrq_jax/core/xla_options.py)."""

import jax
import jax.numpy as jnp
import pytest

from ctxrq_jax.core import config as configlib
from ctxrq_jax.core import xla_options


def test_options_on_a_cpu_and_the_default_list():
  assert jax.default_backend() == "cpu"
  assert xla_options.cpu_compiler_options(xla_options.DEFAULT) is None
  assert xla_options.cpu_compiler_options("") == {xla_options.YNN_FUSION_OPTION: ""}
  listed = "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
  assert xla_options.cpu_compiler_options(listed) == {xla_options.YNN_FUSION_OPTION: listed}


def test_every_accepted_value_is_one_this_xla_compiles_with():
  # What check_ynn_fusions lets through, XLA accepts (its own error would come only at the first compile).
  f = jax.jit(lambda x: x @ x, compiler_options={xla_options.YNN_FUSION_OPTION: ",".join(xla_options.YNN_FUSION_TYPES)})
  assert f(jnp.eye(4)).shape == (4, 4)
  with pytest.raises(Exception, match="not a valid enum value"):
    jax.jit(lambda x: x @ x, compiler_options={xla_options.YNN_FUSION_OPTION: "dot"})(jnp.eye(4))


@pytest.mark.parametrize("value", ["", "default", "LIBRARY_FUSION_TYPE_DOT", ",".join(xla_options.YNN_FUSION_TYPES)])
def test_accepted_values(value):
  xla_options.check_ynn_fusions(value, "train.cpu_ynn_fusions")


@pytest.mark.parametrize("value", ["dot", "LIBRARY_FUSION_TYPE_CONV", None, 0])
def test_rejected_values_name_the_key(value):
  with pytest.raises(configlib.ConfigError, match="train.cpu_ynn_fusions"):
    xla_options.check_ynn_fusions(value, "train.cpu_ynn_fusions")
