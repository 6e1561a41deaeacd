"""Small helpers every model shares: dtype names from configs, parameter counts, variable shapes traced once per model,
matmuls with operands rounded to a lower precision."""

from __future__ import annotations

import functools
import math
import pathlib
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ctxrq_jax.core.config import ConfigError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
MATMUL_DTYPES = ("compute", "bfloat16", "auto")  # config.model.matmul_dtype (see `parse_matmul_dtype`)


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


def memoised_shapes(fn: Callable[..., Any]) -> Callable[..., Any]:
  """Decorator for `fn(*hashable args) -> pytree of jax.ShapeDtypeStruct` (a `jax.eval_shape` of a model's init):
  traced once per distinct arguments in a process (tracing a large model's init takes seconds; converters, artifact
  loaders and parameter tables ask again and again), each call returning its own copy of the tree's containers."""
  cached = functools.lru_cache(maxsize=32)(fn)

  @functools.wraps(fn)
  def wrapper(*args: Any, **kwargs: Any) -> Any:
    return jax.tree_util.tree_map(lambda leaf: leaf, cached(*args, **kwargs))

  return wrapper


@functools.lru_cache(maxsize=1)
def cpu_has_amx_bf16() -> bool:
  """Whether this machine's CPU lists the AMX-BF16 matrix unit (Linux /proc/cpuinfo; False where unreadable). There
  XLA:CPU multiplies bfloat16 matrices 3.5-4x faster than float32 ones (measured, docs/speed.md); without it the
  bfloat16 products are emulated and slower. Read once per process (every model built from a config asks)."""
  try:
    return "amx_bf16" in pathlib.Path("/proc/cpuinfo").read_text().split()
  except OSError:
    return False


def parse_matmul_dtype(name: Any, compute_dtype: Any) -> Optional[Any]:
  """config.model.matmul_dtype -> the dtype a model's linear layers round their operands to, or None (their compute
  dtype).

  'compute': None. 'bfloat16': bfloat16 operands (float32 accumulation and results, see `rounded_dot_general`), with
  float32 compute (with bfloat16 compute the products are bfloat16 already: None). 'auto': bfloat16 where that is
  faster, a float32 model running on a CPU with AMX-BF16 (`cpu_has_amx_bf16`), else None; on a GPU or TPU the
  backend's own float32 matmul precision applies (TF32, or one bfloat16 pass on a TPU). ConfigError otherwise.
  An explicit 'bfloat16' on a CPU without AMX is untested: XLA:CPU may emulate the products slowly (or, for a layout
  its fast path does not take, refuse bfloat16 x bfloat16 -> float32); 'auto' never picks it there.
  """
  if name not in MATMUL_DTYPES:
    raise ConfigError(f"model.matmul_dtype must be one of {', '.join(MATMUL_DTYPES)}, got {name!r}")
  if name == "compute" or jnp.dtype(compute_dtype) != jnp.float32:
    return None
  if name == "auto" and not (jax.default_backend() == "cpu" and cpu_has_amx_bf16()):
    return None
  return jnp.bfloat16


def rounded_dot_general(dtype: Optional[Any]) -> Callable[..., jax.Array]:
  """A `lax.dot_general` for the linear layers (flax `Dense(dot_general=...)`, `jnp.einsum(_dot_general=...)`):
  `lax.dot_general` itself when `dtype` is None; else one whose operands are rounded to `dtype` and whose products
  accumulate and come out in float32 (what a TPU does with float32 operands at its default precision).

  Gradients: both the same way, as a TPU computes them: the activations' gradient (the lhs) from the incoming
  gradient and the weights rounded to `dtype`, the weights' gradient (the rhs: a contraction over the batch and
  length axes) from the activations and the incoming gradient rounded to `dtype`, float32 accumulation and results.
  Operands without batch dimensions only (as these layers have); `precision` and `preferred_element_type` are
  ignored (float32 result).
  """
  if dtype is None:
    return jax.lax.dot_general

  def dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, precision: Any = None,
                  preferred_element_type: Any = None, **unused: Any) -> jax.Array:
    del precision, preferred_element_type, unused
    (lc, rc), (lb, rb) = dimension_numbers
    if len(lb) or len(rb):
      raise ValueError(f"rounded_dot_general takes no batch dimensions, got {dimension_numbers}")
    dims = ((tuple(int(i) for i in lc), tuple(int(i) for i in rc)), ((), ()))
    return _rounded_dot(lhs, rhs, dims, jnp.dtype(dtype))

  return dot_general


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _rounded_dot(lhs: jax.Array, rhs: jax.Array, dims: Any, dtype: Any) -> jax.Array:
  return jax.lax.dot_general(lhs.astype(dtype), rhs.astype(dtype), dims, preferred_element_type=jnp.float32)


def _rounded_dot_fwd(lhs: jax.Array, rhs: jax.Array, dims: Any, dtype: Any) -> tuple[jax.Array, Any]:
  return _rounded_dot(lhs, rhs, dims, dtype), (lhs, rhs)


def _rounded_dot_bwd(dims: Any, dtype: Any, res: Any, g: jax.Array) -> tuple[jax.Array, jax.Array]:
  lhs, rhs = res
  (lc, rc), _ = dims
  # The product's axes are lhs's free axes, then rhs's free axes (no batch axes). d lhs contracts g's rhs-free axes
  # with rhs's free axes; its axes come out as lhs's free axes, then rhs's contracted axes in rhs's order, which
  # stand for lhs's axes lc[rc.index(j)].
  rhs_free = tuple(i for i in range(rhs.ndim) if i not in rc)
  g_rhs_axes = tuple(range(lhs.ndim - len(lc), g.ndim))
  g_low = g.astype(dtype)
  d_lhs = jax.lax.dot_general(g_low, rhs.astype(dtype), ((g_rhs_axes, rhs_free), ((), ())),
                              preferred_element_type=jnp.float32)
  lhs_free = [i for i in range(lhs.ndim) if i not in lc]
  lc_by_rhs = [lc[rc.index(j)] for j in sorted(rc)]
  order = lhs_free + lc_by_rhs
  d_lhs = jnp.transpose(d_lhs, [order.index(i) for i in range(lhs.ndim)])
  # d rhs: lhs's contracted axes (in rhs's order) by g's rhs-free axes, summed over lhs's free axes, as one
  # [Kc, M] x [M, Nf] product of rounded operands. XLA:CPU takes its fast bfloat16 path only for a product whose lhs
  # contracts its minor axis (it multiplies any other in float32, here 2.3x slower), so the narrower operand is
  # first copied transposed by `_transposed`, which XLA does not fold into the product (docs/speed.md).
  m = math.prod(lhs.shape[i] for i in lhs_free)
  kc = math.prod(lhs.shape[i] for i in lc_by_rhs)
  nf = math.prod(rhs.shape[i] for i in rhs_free)
  a = jnp.transpose(lhs.astype(dtype), order).reshape(m, kc)
  b = g_low.reshape(m, nf)
  if kc <= nf:
    d_rhs = jax.lax.dot_general(_transposed(a), b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  else:
    d_rhs = _transposed(jax.lax.dot_general(_transposed(b), a, (((1,), (0,)), ((), ())),
                                            preferred_element_type=jnp.float32))
  rhs_order = sorted(rc) + list(rhs_free)
  d_rhs = d_rhs.reshape([rhs.shape[i] for i in rhs_order])
  if rhs_order != sorted(rhs_order):  # e.g. an [out, in] kernel: XLA would fold this transpose into the product,
    d_rhs = jax.lax.optimization_barrier(d_rhs)  # making it one that XLA:CPU refuses (BF16 x BF16 = F32)
  d_rhs = jnp.transpose(d_rhs, [rhs_order.index(i) for i in range(rhs.ndim)])
  return d_lhs.astype(lhs.dtype), d_rhs.astype(rhs.dtype)


def _transposed(x: jax.Array) -> jax.Array:
  """[M, K] -> [K, M], written as a transpose of [M / f, f, K] so that XLA's simplifier, which folds a plain
  transpose into the product's dimension numbers, leaves a copy in the row-major layout the fast path takes."""
  m, k = x.shape
  f = math.gcd(m, 16)
  return jnp.transpose(x.reshape(m // f, f, k), (2, 0, 1)).reshape(k, m)


_rounded_dot.defvjp(_rounded_dot_fwd, _rounded_dot_bwd)
