"""Contextual RQ-Transformer (Draft-and-Revise, §3.2.2, eq. 6-9).

A bidirectional *spatial* transformer reads the condition tokens and the masked map of code stacks and returns one
context vector per spatial position; a causal *depth* transformer turns each context vector into the D logits of the
code stack at that position, teacher-forced on the codes of the shallower depths:

  u_n    = PE_N(n) + { sum_d input_mlp(e(S_nd))   if m_n = 0                          (eq. 6)
                     { input_mlp(e_[MASK])        if m_n = 1
  h      = LN(f_spatial([c_1 .. c_L, u_1 .. u_N]))[L:]                                (eq. 7)
  v_nd   = PE_D(d) + { h_n                                    d = 1                   (eq. 8)
                     { head_mlp(sum_{d' < d} e(S_nd'))        d > 1
  p_nd   = head(LN(f_depth(v_n1 .. v_nd)))                                            (eq. 9)

The condition c_1 .. c_L has its own embedding table and positions and sits in front of the code stacks, so the
spatial transformer attends bidirectionally over [condition; stacks]. Two kinds (the `num_classes` field):
  class label   num_classes = C >= 1, L = 1, ids in [0, C); the null condition (classifier-free guidance) is the
                extra id C.
  caption       num_classes = 0, L BPE tokens (32 for CC-3M) of a cond_vocab_size vocabulary with [PAD] = 0
                (ctxrq_jax/data/tokenizer.py); the null condition is the empty caption, all [PAD].

`e` is the frozen RQ-VAE codebook, passed in as an input (never a parameter; gradients are stopped). The [MASK]
embedding lives in the code-embedding space R^{n_z} as in eq. 6 and goes through the same `input_mlp` as real codes.
With D = 1 the depth transformer sees a single token per position, so attention reduces to its value/output
projections and the whole depth stack is a per-position MLP with LayerNorm: the model is then a plain bidirectional
transformer (the paper's remark under eq. 9).

Blocks are pre-LN (LayerNorm eps 1e-5), attention through `jax.nn.dot_product_attention` with one fused QKV
projection, MLP 4x with GELU, dropout on the embeddings and on both residual branches (attention probabilities are not
dropped: `dot_product_attention` has no dropout). Embeddings and linear kernels are initialised N(0, 0.02), biases 0,
as the reference RQ-Transformer. One output head is shared across depths.

Logical axis names (for `nn.logical_to_mesh_sharding` with the rules in `config.sharding_rules`):
  parameters
    'embed'  model width W (embeddings, LayerNorms, every kernel's W side)
    'mlp'    MLP hidden width mlp_ratio * W
    'heads'  attention heads
    'kv'     per-head width W / num_heads
    'vocab'  code vocabulary K (output head) and the condition vocabulary (condition embedding)
    'code'   RQ-VAE code-embedding width n_z (input_mlp, head_mlp, [MASK] embedding)
    None     small axes that stay replicated (the q/k/v axis of the fused projection, position tables)
  activations
    'batch'  batch (for the depth transformer: batch x positions, flattened)
    'length' condition + spatial sequence
    'depth'  code depth D
    'embed', 'mlp', 'heads', 'kv', 'vocab' as above
Flax gives a mesh axis to at most one dimension per array, taking rules in order, so `embed -> fsdp` on an activation
whose batch already uses `fsdp` simply leaves the width replicated. No module uses `nn.DenseGeneral` (its initialiser
sees a flattened kernel, which breaks logical partitioning under an ambient mesh), so the model traces and compiles
inside `jax.set_mesh(mesh)` + `nn.logical_axis_rules(rules)` with an `AxisType.Auto` mesh (tested on one device).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ctxrq_jax.core.config import ConfigError
from ctxrq_jax.data.tokenizer import EMPTY_CAPTION_ID
from ctxrq_jax.models import common

Array = jax.Array
Dtype = Any
# Keys and values [B, T, H, Dh] of the tokens an attention layer has seen (incremental decoding).
KVCache = tuple[Array, Array]
# One KVCache per depth-transformer layer.
DepthCache = tuple[KVCache, ...]

_LN_EPS = 1e-5
_INIT_STD = 0.02
_SQRT_HALF = 0.7071067811865476  # 1 / sqrt(2)


def _normal(names: tuple[Optional[str], ...]) -> Callable[..., Any]:
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=_INIT_STD), names)


def _zeros(names: tuple[Optional[str], ...]) -> Callable[..., Any]:
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def _ones(names: tuple[Optional[str], ...]) -> Callable[..., Any]:
  return nn.with_logical_partitioning(nn.initializers.ones_init(), names)


def gelu(x: Array) -> Array:
  """Exact GELU, x * Phi(x) = x (1 + erf(x / sqrt 2)) / 2 (torch's `F.gelu`, the reference's activation), elementwise.

  Written with `erf` rather than `jax.nn.gelu(approximate=False)`, whose erfc form XLA:CPU expands into branches:
  forward + backward of a [5408, 128] -> 512 -> 128 MLP took 49.6 ms with it, 24.2 ms with this form and 20.2 ms
  with no activation at all (2-core CPU; 2-4% of the demo's training step). Within 1.1e-6 of float64 over
  [-10, 10] (tests/unit/models/test_transformer.py).
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * _SQRT_HALF))  # Python floats: keeps x's dtype


def _layer_norm(dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=_LN_EPS, dtype=dtype, param_dtype=param_dtype, scale_init=_ones(("embed",)),
                      bias_init=_zeros(("embed",)), name=name)


class Attention(nn.Module):
  """Multi-head self-attention over [B, T, W] with a fused QKV projection.

  Attributes:
    num_heads: number of heads H; the width W must be divisible by H.
    causal: if true, token t attends only to tokens <= t.
    length_axis: logical name of the sequence axis of the activations ('length' or 'depth').
    matmul_dtype: None, or the dtype the projections' operands are rounded to (`common.rounded_dot_general`).
  """
  num_heads: int
  causal: bool
  length_axis: str
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  matmul_dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x: Array, cache: Optional[KVCache] = None) -> Array | tuple[Array, KVCache]:
    """[B, T, W] -> [B, T, W].

    With `cache` = (keys, values), each [B, T0, H, Dh], of the T0 tokens before (T0 may be 0), `x` [B, 1, W] is the
    next token: it attends to the cached tokens and itself (what causal attention gives the last token), and the
    result is (y [B, 1, W], cache with T0 + 1 tokens). Incremental decoding of a causal stack costs one token-pass
    per token instead of re-running the whole prefix.
    """
    width = x.shape[-1]
    head_dim = width // self.num_heads
    # Explicit einsum kernels rather than nn.DenseGeneral: its initialiser sees a flattened 2-D shape, which breaks
    # logical partitioning of the 4-D kernel under a mesh.
    qkv_kernel = self.param("qkv_kernel", _normal(("embed", None, "heads", "kv")),
                            (width, 3, self.num_heads, head_dim), self.param_dtype)
    qkv_bias = self.param("qkv_bias", _zeros((None, "heads", "kv")), (3, self.num_heads, head_dim), self.param_dtype)
    out_kernel = self.param("out_kernel", _normal(("heads", "kv", "embed")), (self.num_heads, head_dim, width),
                            self.param_dtype)
    out_bias = self.param("out_bias", _zeros(("embed",)), (width,), self.param_dtype)
    x, qkv_kernel, qkv_bias, out_kernel, out_bias = nn.dtypes.promote_dtype(
        x, qkv_kernel, qkv_bias, out_kernel, out_bias, dtype=self.dtype)

    dot_general = common.rounded_dot_general(self.matmul_dtype)
    qkv = jnp.einsum("btw,wihd->btihd", x, qkv_kernel, _dot_general=dot_general) + qkv_bias  # [B, T, 3, H, Dh]
    names = ("batch", self.length_axis, "heads", "kv")
    q, k, v = (nn.with_logical_constraint(qkv[:, :, i], names) for i in range(3))
    if cache is not None:
      if x.shape[1] != 1:
        raise ValueError(f"a cached attention step takes one token, got {x.shape[1]}")
      k = jnp.concatenate([cache[0].astype(k.dtype), k], axis=1)  # [B, T0 + 1, H, Dh]
      v = jnp.concatenate([cache[1].astype(v.dtype), v], axis=1)
      y = jax.nn.dot_product_attention(q, k, v)  # the new token is last: nothing to mask
    else:
      y = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal)  # [B, T, H, Dh]
    y = nn.with_logical_constraint(y, names)
    y = jnp.einsum("bthd,hdw->btw", y, out_kernel, _dot_general=dot_general) + out_bias
    return y if cache is None else (y, (k, v))


class Block(nn.Module):
  """Pre-LN transformer block: x + Drop(Attn(LN(x))), then x + Drop(MLP(LN(x)))."""
  num_heads: int
  mlp_ratio: int
  dropout: float
  causal: bool
  length_axis: str
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  matmul_dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x: Array, train: bool, cache: Optional[KVCache] = None) -> Array | tuple[Array, KVCache]:
    """[B, T, W] -> [B, T, W]; `train` enables dropout (needs the 'dropout' rng).

    With a key/value `cache` (see `Attention`), x is one new token [B, 1, W] and the result is (x, cache).
    """
    width = x.shape[-1]
    act = ("batch", self.length_axis, "embed")
    x = nn.with_logical_constraint(x, act)
    y = _layer_norm(self.dtype, self.param_dtype, "ln_attn")(x)
    y = Attention(self.num_heads, self.causal, self.length_axis, self.dtype, self.param_dtype, self.matmul_dtype,
                  name="attn")(y, cache)
    if cache is not None:
      y, cache = y
    x = x + nn.Dropout(self.dropout)(y, deterministic=not train)
    y = _layer_norm(self.dtype, self.param_dtype, "ln_mlp")(x)
    dot_general = common.rounded_dot_general(self.matmul_dtype)
    y = nn.Dense(self.mlp_ratio * width, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=_normal(("embed", "mlp")), bias_init=_zeros(("mlp",)), name="fc_in",
                 dot_general=dot_general)(y)
    y = nn.with_logical_constraint(gelu(y), ("batch", self.length_axis, "mlp"))
    y = nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=_normal(("mlp", "embed")), bias_init=_zeros(("embed",)), name="fc_out",
                 dot_general=dot_general)(y)
    x = x + nn.Dropout(self.dropout)(y, deterministic=not train)
    x = nn.with_logical_constraint(x, act)
    return x if cache is None else (x, cache)


class ContextualRQTransformer(nn.Module):
  """Bidirectional spatial transformer + causal depth transformer over RQ code stacks (see the module docstring).

  Attributes:
    vocab_size: codebook size K.
    code_depth: code depth D.
    num_positions: spatial positions N = h * w (raster order).
    embed_dim: RQ-VAE code-embedding width n_z (the codebook is [K, n_z]).
    width: transformer width W.
    num_heads: attention heads (W must be divisible by it).
    spatial_layers: blocks of the bidirectional spatial transformer.
    depth_layers: blocks of the causal depth transformer.
    mlp_ratio: MLP hidden width / W.
    dropout: dropout rate on embeddings and residual branches (training only).
    num_classes: number of classes; class c is condition id c, id `num_classes` means "no condition". 0 means
      caption conditioning (the null condition is then the empty caption, all [PAD] = 0).
    cond_length: condition tokens L per example (1 for a class label; e.g. 32 for BPE text).
    cond_vocab_size: condition vocabulary; None -> num_classes + 1 (classes plus the null id). Required for
      captions (the tokenizer's vocabulary size, [PAD] included).
    dtype: compute dtype (e.g. jnp.bfloat16); logits are always returned in float32.
    param_dtype: parameter dtype (float32).
    remat: rematerialise each block in the backward pass (saves activation memory).
    matmul_dtype: None (the linear layers multiply in `dtype`), or the dtype their operands are rounded to, with
      float32 accumulation and results (`common.rounded_dot_general`; config.model.matmul_dtype, resolved by
      `common.parse_matmul_dtype`). Attention scores and probabilities stay in `dtype`.
  """
  vocab_size: int
  code_depth: int
  num_positions: int
  embed_dim: int
  width: int
  num_heads: int
  spatial_layers: int
  depth_layers: int
  mlp_ratio: int = 4
  dropout: float = 0.0
  num_classes: int = 1000
  cond_length: int = 1
  cond_vocab_size: Optional[int] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  matmul_dtype: Optional[Dtype] = None

  @property
  def cond_vocab(self) -> int:
    """Size of the condition vocabulary (classes + null id unless given)."""
    return self.num_classes + 1 if self.cond_vocab_size is None else self.cond_vocab_size

  @property
  def is_text(self) -> bool:
    """True when the condition is a caption (num_classes 0), False for a class label."""
    return self.num_classes == 0

  @property
  def null_cond_id(self) -> int:
    """Condition id meaning "no condition" (classifier-free guidance and condition dropout): the extra id
    num_classes for class labels, [PAD] (the empty caption) for captions."""
    return EMPTY_CAPTION_ID if self.is_text else self.num_classes

  def setup(self):
    _check_fields(self)
    dt, pdt = self.dtype, self.param_dtype
    block_cls = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
    dot_general = common.rounded_dot_general(self.matmul_dtype)
    dense = lambda feats, names, name, bias=True: nn.Dense(  # noqa: E731
        feats, use_bias=bias, dtype=dt, param_dtype=pdt, kernel_init=_normal(names),
        bias_init=_zeros((names[-1],)), name=name, dot_general=dot_general)

    # Spatial transformer (eq. 6-7).
    self.input_mlp = dense(self.width, ("code", "embed"), "input_mlp")
    self.mask_embed = self.param("mask_embed", _normal(("code",)), (self.embed_dim,), pdt)
    self.cond_embed = nn.Embed(self.cond_vocab, self.width, dtype=dt, param_dtype=pdt,
                               embedding_init=_normal(("vocab", "embed")), name="cond_embed")
    self.cond_pos = self.param("cond_pos", _normal((None, "embed")), (self.cond_length, self.width), pdt)
    self.spatial_pos = self.param("spatial_pos", _normal((None, "embed")), (self.num_positions, self.width), pdt)
    self.spatial_drop = nn.Dropout(self.dropout)
    self.spatial_blocks = [
        block_cls(self.num_heads, self.mlp_ratio, self.dropout, False, "length", dt, pdt, self.matmul_dtype,
                  name=f"spatial_{i}")
        for i in range(self.spatial_layers)]
    self.spatial_ln = _layer_norm(dt, pdt, "spatial_ln")

    # Depth transformer (eq. 8-9).
    self.head_mlp = dense(self.width, ("code", "embed"), "head_mlp")
    self.depth_pos = self.param("depth_pos", _normal((None, "embed")), (self.code_depth, self.width), pdt)
    self.depth_drop = nn.Dropout(self.dropout)
    self.depth_blocks = [
        block_cls(self.num_heads, self.mlp_ratio, self.dropout, True, "depth", dt, pdt, self.matmul_dtype,
                  name=f"depth_{i}")
        for i in range(self.depth_layers)]
    self.depth_ln = _layer_norm(dt, pdt, "depth_ln")
    # Logits accumulate and come out in float32 even under bfloat16 compute (softmax over K = 16384 codes).
    self.head = nn.Dense(self.vocab_size, use_bias=False, dtype=dt, param_dtype=pdt,
                         kernel_init=_normal(("embed", "vocab")), name="head",
                         dot_general=(dot_general if self.matmul_dtype is not None else
                                      functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32)))

  def _check_codebook(self, codebook: Array) -> Array:
    if codebook.shape != (self.vocab_size, self.embed_dim):
      raise ValueError(f"codebook must be [K={self.vocab_size}, n_z={self.embed_dim}], got {codebook.shape}")
    # The codebook is a frozen input of stage 2: no gradient flows into it.
    return jax.lax.stop_gradient(codebook)

  def spatial(self, codes: Array, mask: Array, cond: Array, codebook: Array, *, train: bool = False) -> Array:
    """Bidirectional spatial transformer (eq. 6-7).

    Args:
      codes: int32 [B, N, D]; values at masked positions are never read (any value is fine there).
      mask: bool [B, N], True where the code stack is replaced by [MASK].
      cond: int32 [B, L] condition tokens (a class id is L = 1).
      codebook: float [K, n_z], the frozen RQ-VAE codebook.
      train: enables dropout.

    Returns:
      h: [B, N, W] context vectors of the N image positions (after the final LayerNorm), in `dtype`.
    """
    b = codes.shape[0]
    chex.assert_shape(codes, (b, self.num_positions, self.code_depth))
    chex.assert_shape(mask, (b, self.num_positions))
    chex.assert_shape(cond, (b, self.cond_length))
    chex.assert_type([codes, cond], int)
    codebook = self._check_codebook(codebook)

    # Masked positions may hold placeholder ids: zero them so the gather never reads out of range.
    safe = jnp.where(mask[..., None], 0, codes)
    e = jnp.take(codebook, safe, axis=0)  # [B, N, D, n_z]
    x_code = self.input_mlp(e).sum(axis=2)  # [B, N, W]
    x_mask = self.input_mlp(self.mask_embed)  # [W]
    x_img = jnp.where(mask[..., None], x_mask.astype(x_code.dtype), x_code)
    x_img = x_img + self.spatial_pos.astype(self.dtype)
    x_cond = self.cond_embed(cond) + self.cond_pos.astype(self.dtype)  # [B, L, W]
    x = jnp.concatenate([x_cond.astype(self.dtype), x_img.astype(self.dtype)], axis=1)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    x = self.spatial_drop(x, deterministic=not train)
    for block in self.spatial_blocks:
      x = block(x, train)
    h = self.spatial_ln(x)[:, self.cond_length:]
    return nn.with_logical_constraint(h, ("batch", "length", "embed"))

  def depth(self, h: Array, codes: Array, codebook: Array, *, train: bool = False, at: Optional[int] = None) -> Array:
    """Causal depth transformer (eq. 8-9), teacher-forced on `codes`.

    Args:
      h: [B, M, W] context vectors (M positions, any subset of the N, e.g. only the masked ones).
      codes: int32 [B, M, D]; the logits at (1-based) depth d read only the codes at depths < d, codes[..., :d-1]
        (the last depth is never read), so codes not sampled yet may hold any placeholder (e.g. -1).
      codebook: float [K, n_z], the frozen RQ-VAE codebook.
      train: enables dropout.
      at: a static 0-based depth index for sampling: only the causal prefix of depths 0..at is run and only the
        logits of depth `at` go through the output head (the same values as `depth(...)[:, :, at]`).

    Returns:
      logits: float32 [B, M, D, K], or [B, M, K] with `at`.
    """
    b, m = h.shape[:2]
    dd = self.code_depth
    chex.assert_shape(h, (b, m, self.width))
    chex.assert_shape(codes, (b, m, dd))
    chex.assert_type(codes, int)
    codebook = self._check_codebook(codebook)
    if at is not None and not (isinstance(at, (int, np.integer)) and 0 <= at < dd):
      raise ValueError(f"depth index `at` must be an int in [0, {dd}), got {at!r}")

    # Depth d > 1 gets the partial RQ sum of the shallower codes; the last code is dropped before the gather.
    # Clipping keeps placeholders at not-yet-sampled depths finite: a NaN there would leak into shallower depths
    # through the zero-weighted (causally masked) attention values.
    shallow = jnp.clip(codes[..., :dd - 1], 0, self.vocab_size - 1)
    e = jnp.take(codebook, shallow, axis=0)  # [B, M, D-1, n_z]
    partial = self.head_mlp(jnp.cumsum(e, axis=2))  # [B, M, D-1, W]
    v = jnp.concatenate([h[:, :, None, :].astype(self.dtype), partial.astype(self.dtype)], axis=2)
    v = v + self.depth_pos.astype(self.dtype)
    length = dd if at is None else at + 1  # causal: depths after `at` cannot change its logits
    v = v[:, :, :length].reshape(b * m, length, self.width)
    v = nn.with_logical_constraint(v, ("batch", "depth", "embed"))
    v = self.depth_drop(v, deterministic=not train)
    for block in self.depth_blocks:
      v = block(v, train)
    if at is not None:
      logits = self.head(self.depth_ln(v[:, at])).astype(jnp.float32)
      return nn.with_logical_constraint(logits.reshape(b, m, self.vocab_size), ("batch", "length", "vocab"))
    logits = self.head(self.depth_ln(v)).astype(jnp.float32)
    logits = logits.reshape(b, m, dd, self.vocab_size)
    return nn.with_logical_constraint(logits, ("batch", "length", "depth", "vocab"))

  def depth_step(self, h: Array, codes: Array, codebook: Array, cache: Optional[DepthCache], *,
                 at: int) -> tuple[Array, DepthCache]:
    """One depth of the causal depth transformer with a key/value cache across depths (sampling, no dropout).

    Running at = 0, 1, .., D-1 in turn, each call feeding the cache the previous one returned, costs D token-passes
    per position (re-running the prefix 0..at for each depth, as `depth(..., at=at)` does, costs D(D+1)/2), and
    `logits(z)` equals `depth(h, codes, codebook)[:, :, at]` up to float round-off (attention over the cached keys
    instead of a causally masked square).

    Args:
      h: [B, M, W] context vectors of the M positions.
      codes: int32 [B, M, D]; only codes[..., :at] (the codes sampled so far) are read.
      codebook: float [K, n_z], the frozen RQ-VAE codebook.
      cache: what the call at depth `at - 1` returned; None at at = 0.
      at: static 0-based depth.

    Returns:
      (z [B, M, W]: the depth transformer's output at depth `at` after its final LayerNorm, in `dtype`;
       cache: per depth layer (keys, values) [B * M, at + 1, H, W / H]). Logits are `logits(z)`.
    """
    b, m = h.shape[:2]
    dd = self.code_depth
    chex.assert_shape(h, (b, m, self.width))
    chex.assert_shape(codes, (b, m, dd))
    chex.assert_type(codes, int)
    codebook = self._check_codebook(codebook)
    if not (isinstance(at, (int, np.integer)) and 0 <= at < dd):
      raise ValueError(f"depth index `at` must be an int in [0, {dd}), got {at!r}")
    if (cache is None) != (at == 0) or (cache is not None and len(cache) != self.depth_layers):
      raise ValueError(f"depth_step at={at} needs the cache of depth {at - 1} ({self.depth_layers} layers); "
                       f"pass None at depth 0")
    if at == 0:
      v = h.astype(self.dtype)
      head_dim = self.width // self.num_heads
      empty = jnp.zeros((b * m, 0, self.num_heads, head_dim), self.dtype)
      cache = tuple((empty, empty) for _ in range(self.depth_layers))
    else:  # the partial RQ sum of the codes sampled so far, as in `depth`
      shallow = jnp.clip(codes[..., :at], 0, self.vocab_size - 1)
      e = jnp.take(codebook, shallow, axis=0)  # [B, M, at, n_z]
      v = self.head_mlp(jnp.cumsum(e, axis=2)[:, :, at - 1]).astype(self.dtype)
    v = (v + self.depth_pos[at].astype(self.dtype)).reshape(b * m, 1, self.width)
    v = nn.with_logical_constraint(v, ("batch", "depth", "embed"))
    new_cache = []
    for block, layer_cache in zip(self.depth_blocks, cache):
      v, layer_cache = block(v, False, layer_cache)
      new_cache.append(layer_cache)
    z = self.depth_ln(v[:, 0]).reshape(b, m, self.width)
    return nn.with_logical_constraint(z, ("batch", "length", "embed")), tuple(new_cache)

  def logits(self, z: Array) -> Array:
    """The output head shared across depths: [..., W] depth features -> float32 [..., K] logits.

    It is linear without a bias, so classifier-free guidance can be applied to the features:
    logits((1 + s) z_c - s z_u) = (1 + s) logits(z_c) - s logits(z_u), one head matmul instead of two.
    """
    return self.head(z).astype(jnp.float32)

  def __call__(self, codes: Array, mask: Array, cond: Array, codebook: Array, *, train: bool = False) -> Array:
    """Logits of every code stack given the masked map: [B, N, D] codes -> float32 [B, N, D, K].

    The depth inputs are teacher-forced from `codes`, so this is the training forward pass of eq. 11 (the loss reads
    only the masked positions; see `masking.masked_nll`).
    """
    h = self.spatial(codes, mask, cond, codebook, train=train)
    return self.depth(h, codes, codebook, train=train)


def _check_fields(model: ContextualRQTransformer) -> None:
  positive = ("vocab_size", "code_depth", "num_positions", "embed_dim", "width", "num_heads", "spatial_layers",
              "depth_layers", "mlp_ratio", "cond_length")
  for name in positive:
    value = getattr(model, name)
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"ContextualRQTransformer.{name} must be a positive integer, got {value!r}")
  if isinstance(model.num_classes, bool) or not isinstance(model.num_classes, (int, np.integer)) or (
      model.num_classes < 0):
    raise ValueError(f"ContextualRQTransformer.num_classes must be a positive integer (0 for captions), got "
                     f"{model.num_classes!r}")
  if model.is_text and (model.cond_vocab_size is None or model.cond_vocab_size < 2):
    raise ValueError(f"caption conditioning (num_classes 0) needs cond_vocab_size >= 2 (the tokenizer's vocabulary), "
                     f"got {model.cond_vocab_size!r}")
  if model.width % model.num_heads:
    raise ValueError(f"width {model.width} is not divisible by num_heads {model.num_heads}")
  if not 0.0 <= model.dropout < 1.0:
    raise ValueError(f"dropout must be in [0, 1), got {model.dropout}")
  if model.cond_vocab <= model.null_cond_id:
    raise ValueError(f"cond_vocab_size {model.cond_vocab} leaves no room for the null condition id "
                     f"{model.null_cond_id} (= num_classes)")


def check_inputs(model: ContextualRQTransformer, *, codes: Any = None, mask: Any = None, cond: Any = None,
                 codebook: Any = None) -> None:
  """Host-side validation of concrete inputs before anything is compiled; raises ValueError naming the problem.

  Any argument may be omitted (e.g. the sampler checks only `cond` and `codebook`). Checks shapes against the model
  fields, dtypes, codes in [0, K), cond ids in [0, cond_vocab), mask boolean and consistent batch sizes.

  Args:
    model: the (unbound) model whose fields define the expected shapes.
    codes: int [B, N, D].
    mask: bool [B, N].
    cond: int [B, L].
    codebook: float [K, n_z].
  """
  batch = {}
  if codes is not None:
    codes = np.asarray(codes)
    want = (model.num_positions, model.code_depth)
    if codes.ndim != 3 or codes.shape[1:] != want:
      raise ValueError(f"codes must be [B, N={want[0]}, D={want[1]}], got shape {codes.shape}")
    if not np.issubdtype(codes.dtype, np.integer):
      raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
    if codes.size and (codes.min() < 0 or codes.max() >= model.vocab_size):
      raise ValueError(f"codes must lie in [0, {model.vocab_size}), got range [{codes.min()}, {codes.max()}]")
    batch["codes"] = codes.shape[0]
  if mask is not None:
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.shape[1] != model.num_positions:
      raise ValueError(f"mask must be [B, N={model.num_positions}], got shape {mask.shape}")
    if mask.dtype != np.bool_:
      raise ValueError(f"mask must be boolean, got dtype {mask.dtype}")
    batch["mask"] = mask.shape[0]
  if cond is not None:
    cond = np.asarray(cond)
    if cond.ndim != 2 or cond.shape[1] != model.cond_length:
      raise ValueError(f"cond must be [B, L={model.cond_length}], got shape {cond.shape}")
    if not np.issubdtype(cond.dtype, np.integer):
      raise ValueError(f"cond must be integers, got dtype {cond.dtype}")
    if cond.size and (cond.min() < 0 or cond.max() >= model.cond_vocab):
      bad = cond[(cond < 0) | (cond >= model.cond_vocab)]
      if model.is_text:
        raise ValueError(f"caption token ids must lie in [0, {model.cond_vocab}); got out-of-range ids "
                         f"{np.unique(bad)[:8].tolist()}")
      raise ValueError(f"condition ids must lie in [0, {model.cond_vocab}) ({model.num_classes} classes + null id "
                       f"{model.null_cond_id}); got out-of-range ids {np.unique(bad)[:8].tolist()}")
    batch["cond"] = cond.shape[0]
  if codebook is not None:
    codebook = np.asarray(codebook)
    if codebook.shape != (model.vocab_size, model.embed_dim):
      raise ValueError(f"codebook must be [K={model.vocab_size}, n_z={model.embed_dim}], got {codebook.shape}")
    if not np.issubdtype(codebook.dtype, np.floating):
      raise ValueError(f"codebook must be floating point, got dtype {codebook.dtype}")
    if not np.all(np.isfinite(codebook)):
      raise ValueError("codebook contains non-finite values")
  if len(set(batch.values())) > 1:
    raise ValueError(f"inconsistent batch sizes: {batch}")


MODEL_CONFIG_KEYS = ("width", "num_heads", "spatial_layers", "depth_layers", "mlp_ratio", "dropout", "num_classes",
                     "cond_length", "cond_vocab_size", "dtype", "param_dtype", "remat", "matmul_dtype")
# Keys a config saved before they existed may lack (a run's config.json), with the value that reproduces it.
OPTIONAL_MODEL_CONFIG_KEYS = {"matmul_dtype": "compute"}


def model_from_config(model_cfg: Mapping[str, Any], *, vocab_size: int, code_depth: int, num_positions: int,
                      embed_dim: int) -> ContextualRQTransformer:
  """Builds the model from a `config.model` section plus the code-dataset facts (K, D, N = h*w, n_z).

  Raises ConfigError naming unknown or missing keys of `model_cfg`.
  """
  keys = set(model_cfg.keys())
  unknown = sorted(keys - set(MODEL_CONFIG_KEYS))
  missing = sorted(set(MODEL_CONFIG_KEYS) - keys - set(OPTIONAL_MODEL_CONFIG_KEYS))
  if unknown or missing:
    raise ConfigError("; ".join(
        ([f"unknown config.model keys: {', '.join(unknown)}"] if unknown else [])
        + ([f"missing config.model keys: {', '.join(missing)}"] if missing else [])))
  kwargs = {k: model_cfg[k] if k in keys else OPTIONAL_MODEL_CONFIG_KEYS[k] for k in MODEL_CONFIG_KEYS}
  kwargs["dtype"] = common.parse_dtype(kwargs["dtype"])
  kwargs["param_dtype"] = common.parse_dtype(kwargs["param_dtype"], "param_dtype")
  kwargs["matmul_dtype"] = common.parse_matmul_dtype(kwargs["matmul_dtype"], kwargs["dtype"])
  model = ContextualRQTransformer(vocab_size=vocab_size, code_depth=code_depth, num_positions=num_positions,
                                  embed_dim=embed_dim, **kwargs)
  try:
    _check_fields(model)
  except ValueError as err:
    raise ConfigError(f"config.model: {err}") from None
  return model


def from_run_config(config: Mapping[str, Any]) -> ContextualRQTransformer:
  """The model of a whole stage-2 config (its `model` section plus the code shape, K and n_z of its `data`)."""
  h, w, depth = (int(v) for v in config["data"]["code_shape"])
  return model_from_config(config["model"], vocab_size=int(config["data"]["vocab_size"]), code_depth=depth,
                           num_positions=h * w, embed_dim=int(config["data"]["embed_dim"]))


@common.memoised_shapes
def abstract_variables(model: ContextualRQTransformer, batch_size: int = 1) -> Any:
  """Shapes (and logical axis names) of the model's variables, without allocating them: `jax.eval_shape` of init."""
  codes = jax.ShapeDtypeStruct((batch_size, model.num_positions, model.code_depth), jnp.int32)
  mask = jax.ShapeDtypeStruct((batch_size, model.num_positions), jnp.bool_)
  cond = jax.ShapeDtypeStruct((batch_size, model.cond_length), jnp.int32)
  codebook = jax.ShapeDtypeStruct((model.vocab_size, model.embed_dim), jnp.float32)
  return jax.eval_shape(lambda r, *a: model.init(r, *a), jax.random.key(0), codes, mask, cond, codebook)


def init_inputs(model: ContextualRQTransformer, batch_size: int = 1) -> tuple[Array, Array, Array, Array]:
  """Dummy (codes, mask, cond, codebook) of the right shapes for `model.init`."""
  return (jnp.zeros((batch_size, model.num_positions, model.code_depth), jnp.int32),
          jnp.zeros((batch_size, model.num_positions), jnp.bool_),
          jnp.zeros((batch_size, model.cond_length), jnp.int32),
          jnp.zeros((model.vocab_size, model.embed_dim), jnp.float32))


__all__ = ["Attention", "Block", "ContextualRQTransformer", "DepthCache", "KVCache", "MODEL_CONFIG_KEYS", "abstract_variables", "check_inputs",
           "from_run_config", "init_inputs", "model_from_config"]
