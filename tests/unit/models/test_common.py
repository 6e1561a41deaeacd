"""Helpers every model shares (ctxrq_jax/models/common.py): dtype names, parameter counts, memoised variable
shapes, rounded matmuls."""

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


def test_memoised_shapes_trace_once_per_arguments_and_hand_out_copies():
  traced = []

  @common.memoised_shapes
  def shapes(n, width=2):
    traced.append((n, width))
    return jax.eval_shape(lambda: {"w": jnp.zeros((n, width)), "boxed": nn.LogicallyPartitioned(
        jnp.zeros((width,)), names=("mlp",))})

  first = shapes(3)
  first["w"] = None  # a caller's edit stays its own
  again = shapes(3)
  assert traced == [(3, 2)] and again["w"].shape == (3, 2) and again["boxed"].names == ("mlp",)
  assert shapes(4)["w"].shape == (4, 2) and shapes(4, width=5)["w"].shape == (4, 5)
  assert traced == [(3, 2), (4, 2), (4, 5)]


def test_model_shapes_equal_a_fresh_eval_shape_of_init():
  from ctxrq_jax.models import rqvae  # pylint: disable=g-import-not-at-top
  from tests import helpers  # pylint: disable=g-import-not-at-top
  model = rqvae.RQVAE.from_config(helpers.tiny_stage1_config().model)
  fresh = jax.eval_shape(lambda: rqvae.init_variables(model, jax.random.key(0)))
  assert rqvae.abstract_variables(model) == fresh == rqvae.abstract_variables(model)


@pytest.mark.parametrize("spec,lhs_shape,rhs_shape", [
    ("btw,wn->btn", (2, 3, 8), (8, 5)),  # a Dense layer
    ("btw,wihd->btihd", (2, 3, 8), (8, 3, 2, 4)),  # the fused QKV projection
    ("bthd,hdw->btw", (2, 3, 2, 4), (2, 4, 8)),  # the attention output projection
    ("bwt,nw->btn", (2, 8, 3), (5, 8)),  # contracted axes not last / first: the gradient's axes are put back
    ("tw,wn->tn", (5, 8), (8, 6)),  # 2-D, an odd length: f = 1 in `_transposed`
    ("btw,wn->btn", (4, 36, 40), (40, 9)),  # the weights' gradient through the transposed incoming gradient
    ("bwt,nw->btn", (2, 8, 3), (9, 8)),  # an [out, in] kernel, K <= N: the gradient's axes put back after the product
    ("tw,nw->tn", (64, 32), (64, 32)),
])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_rounded_dot_general_is_the_product_of_rounded_operands_and_its_gradients(spec, lhs_shape, rhs_shape, jit):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x, w = jax.random.normal(k1, lhs_shape), jax.random.normal(k2, rhs_shape)
  bf = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)  # noqa: E731
  dot = common.rounded_dot_general(jnp.bfloat16)
  product = lambda a, b: jnp.einsum(spec, a, b, _dot_general=dot)  # noqa: E731
  maybe_jit = jax.jit if jit else (lambda f: f)
  out = maybe_jit(product)(x, w)
  exact = jnp.einsum(spec, bf(x), bf(w), precision="highest")
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, exact, rtol=1e-5, atol=1e-5)  # float32 accumulation of the rounded operands
  assert not np.allclose(out, jnp.einsum(spec, x, w, precision="highest"), rtol=1e-5, atol=1e-5)
  # Gradients: both from rounded operands (the incoming gradient and the weights; the activations and the incoming
  # gradient), accumulated in float32. Compiled, the weights' gradient runs through the transposed copy.
  g = jax.random.normal(k3, out.shape)
  dx, dw = maybe_jit(lambda a, b, c: jax.vjp(product, a, b)[1](c))(x, w, g)
  want_dx = jax.vjp(lambda a: jnp.einsum(spec, a, bf(w), precision="highest"), x)[1](bf(g))[0]
  want_dw = jax.vjp(lambda b: jnp.einsum(spec, bf(x), b, precision="highest"), w)[1](bf(g))[0]
  np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-5)
  assert not np.allclose(dw, jax.vjp(lambda b: jnp.einsum(spec, x, b, precision="highest"), w)[1](g)[0],
                         rtol=1e-5, atol=1e-5)
  assert common.rounded_dot_general(None) is jax.lax.dot_general


def test_parse_matmul_dtype(monkeypatch):
  assert common.parse_matmul_dtype("compute", jnp.float32) is None
  assert common.parse_matmul_dtype("bfloat16", jnp.float32) is jnp.bfloat16
  assert common.parse_matmul_dtype("bfloat16", jnp.bfloat16) is None  # bfloat16 compute multiplies in bfloat16
  monkeypatch.setattr(common, "cpu_has_amx_bf16", lambda: True)
  assert common.parse_matmul_dtype("auto", jnp.float32) is jnp.bfloat16
  assert common.parse_matmul_dtype("auto", jnp.bfloat16) is None
  monkeypatch.setattr(common, "cpu_has_amx_bf16", lambda: False)
  assert common.parse_matmul_dtype("auto", jnp.float32) is None
  with pytest.raises(ConfigError, match="model.matmul_dtype must be one of compute, bfloat16, auto, got 'bf16'"):
    common.parse_matmul_dtype("bf16", jnp.float32)
