"""Stage-1 RQ-VAE (encoder, residual quantizer, decoder) in Flax linen, with the reference architecture.

The convolutional encoder/decoder follow the taming-transformers layout used by the released PyTorch RQ-VAE.

Naming rule (so a converter maps PyTorch keys mechanically): take the PyTorch key, replace every
`<list>.<index>` by `<list>_<index>` for the lists `down`, `up`, `block`, `attn`, and `.` by `/`; the leaf
`weight` becomes `kernel` for convolutions (OIHW -> HWIO, 1x1 convs included) and `scale` for GroupNorms, `bias`
stays `bias`. Examples:

  encoder.down.0.block.1.conv1.weight  <->  params/encoder/down_0/block_1/conv1/kernel
  encoder.down.5.attn.0.q.bias         <->  params/encoder/down_5/attn_0/q/bias
  encoder.mid.attn_1.norm.weight       <->  params/encoder/mid/attn_1/norm/scale
  decoder.up.3.upsample.conv.weight    <->  params/decoder/up_3/upsample/conv/kernel
  quant_conv.weight                    <->  params/quant_conv/kernel

As in PyTorch, the decoder's `up_{i}` is indexed by resolution level (up_0 works at the highest resolution) even
though the decoder runs them from the last level down. The quantizer lives in the variable collection `quantizer`
(not `params`): `codebook` [K, n_z] (the reference's `quantizer.codebooks.0.weight` without its padding row; the
codebook is shared, so codebooks 1..3 repeat it), `cluster_size_ema` [K] and `embed_ema` [K, n_z].
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ctxrq_jax.core import config as configlib
from ctxrq_jax.models import common
from ctxrq_jax.models import rq

Dtype = Any
# Matmul precision of the convolutions and attention: None (the backend's default: one bf16 pass on TPU, TF32 on
# recent GPUs, as the reference trains) or 'highest' (float32; `load_artifact` uses it for encoding, decoding and
# evaluation, so codes and pixels follow the released float32 model on every backend).
Precision = Any



def _conv(
    features: int, kernel: int, dtype: Dtype, name: str | None = None, stride: int = 1, padding: Any = "SAME",
    precision: Precision = None,
) -> nn.Conv:
  return nn.Conv(
      features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype, param_dtype=jnp.float32,
      precision=precision, name=name,
  )


def _norm(groups: int, dtype: Dtype, name: str) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=groups, epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32, name=name)


class ResnetBlock(nn.Module):
  """Pre-activation residual block: (GroupNorm, SiLU, 3x3 conv) x2 with dropout; 1x1 `nin_shortcut` if needed.

  [B, H, W, C_in] -> [B, H, W, out_channels].
  """

  out_channels: int
  dropout: float = 0.0
  norm_groups: int = 32
  dtype: Dtype = jnp.float32
  precision: Precision = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    h = nn.silu(_norm(self.norm_groups, self.dtype, "norm1")(x))
    h = _conv(self.out_channels, 3, self.dtype, "conv1", precision=self.precision)(h)
    h = nn.silu(_norm(self.norm_groups, self.dtype, "norm2")(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = _conv(self.out_channels, 3, self.dtype, "conv2", precision=self.precision)(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, self.dtype, "nin_shortcut", precision=self.precision)(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head spatial self-attention with 1x1-conv q/k/v/proj_out and a residual. [B, H, W, C] -> same."""

  norm_groups: int = 32
  dtype: Dtype = jnp.float32
  precision: Precision = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hh, ww, c = x.shape
    p = self.precision
    h = _norm(self.norm_groups, self.dtype, "norm")(x)
    q = _conv(c, 1, self.dtype, "q", precision=p)(h).reshape(b, hh * ww, c)
    k = _conv(c, 1, self.dtype, "k", precision=p)(h).reshape(b, hh * ww, c)
    v = _conv(c, 1, self.dtype, "v", precision=p)(h).reshape(b, hh * ww, c)
    logits = jnp.einsum("bqc,bkc->bqk", q, k, precision=p).astype(jnp.float32) * (c**-0.5)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)  # softmax in fp32 for low-precision dtypes
    h = jnp.einsum("bqk,bkc->bqc", weights, v, precision=p).reshape(b, hh, ww, c)
    return x + _conv(c, 1, self.dtype, "proj_out", precision=p)(h)


class Downsample(nn.Module):
  """Pad bottom/right by one, then 3x3 stride-2 VALID conv (the reference's asymmetric padding). Halves H, W."""

  dtype: Dtype = jnp.float32
  precision: Precision = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv(x.shape[-1], 3, self.dtype, "conv", stride=2, padding="VALID", precision=self.precision)(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2, then 3x3 conv. Doubles H, W."""

  dtype: Dtype = jnp.float32
  precision: Precision = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv(x.shape[-1], 3, self.dtype, "conv", precision=self.precision)(x)


class _Level(nn.Module):
  """One resolution level: `num_blocks` ResnetBlocks (`block_{j}`), each followed by `attn_{j}` if `use_attn`,
  then `downsample`/`upsample` if `resample` is set. Named `down_{i}` / `up_{i}` by its parent."""

  out_channels: int
  num_blocks: int
  use_attn: bool
  resample: str | None  # None, "down" or "up"
  dropout: float
  norm_groups: int
  dtype: Dtype
  precision: Precision = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    p = self.precision
    for j in range(self.num_blocks):
      x = ResnetBlock(self.out_channels, self.dropout, self.norm_groups, self.dtype, p, name=f"block_{j}")(x, train)
      if self.use_attn:
        x = AttnBlock(self.norm_groups, self.dtype, p, name=f"attn_{j}")(x)
    if self.resample == "down":
      x = Downsample(self.dtype, p, name="downsample")(x)
    elif self.resample == "up":
      x = Upsample(self.dtype, p, name="upsample")(x)
    return x


class _Mid(nn.Module):
  """block_1 -> attn_1 -> block_2 at constant width."""

  dropout: float
  norm_groups: int
  dtype: Dtype
  precision: Precision = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    c, p = x.shape[-1], self.precision
    x = ResnetBlock(c, self.dropout, self.norm_groups, self.dtype, p, name="block_1")(x, train)
    x = AttnBlock(self.norm_groups, self.dtype, p, name="attn_1")(x)
    return ResnetBlock(c, self.dropout, self.norm_groups, self.dtype, p, name="block_2")(x, train)


class Encoder(nn.Module):
  """[B, R, R, C_in] -> [B, R / 2^(L-1), R / 2^(L-1), z_channels], L = len(ch_mult)."""

  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  resolution: int
  z_channels: int
  dropout: float = 0.0
  norm_groups: int = 32
  dtype: Dtype = jnp.float32
  precision: Precision = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    levels, p = len(self.ch_mult), self.precision
    h = _conv(self.ch, 3, self.dtype, "conv_in", precision=p)(x)
    res = self.resolution
    for i, mult in enumerate(self.ch_mult):
      h = _Level(
          self.ch * mult, self.num_res_blocks, res in self.attn_resolutions, "down" if i != levels - 1 else None,
          self.dropout, self.norm_groups, self.dtype, p, name=f"down_{i}",
      )(h, train)
      if i != levels - 1:
        res //= 2
    h = _Mid(self.dropout, self.norm_groups, self.dtype, p, name="mid")(h, train)
    h = nn.silu(_norm(self.norm_groups, self.dtype, "norm_out")(h))
    return _conv(self.z_channels, 3, self.dtype, "conv_out", precision=p)(h)


class Decoder(nn.Module):
  """[B, r, r, z_channels] -> [B, r 2^(L-1), r 2^(L-1), out_channels]; level i has num_res_blocks + 1 blocks."""

  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  resolution: int
  out_channels: int
  dropout: float = 0.0
  norm_groups: int = 32
  dtype: Dtype = jnp.float32
  precision: Precision = None

  @nn.compact
  def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
    levels, p = len(self.ch_mult), self.precision
    h = _conv(self.ch * self.ch_mult[-1], 3, self.dtype, "conv_in", precision=p)(z)
    h = _Mid(self.dropout, self.norm_groups, self.dtype, p, name="mid")(h, train)
    res = self.resolution // 2 ** (levels - 1)
    for i in reversed(range(levels)):
      h = _Level(
          self.ch * self.ch_mult[i], self.num_res_blocks + 1, res in self.attn_resolutions,
          "up" if i != 0 else None, self.dropout, self.norm_groups, self.dtype, p, name=f"up_{i}",
      )(h, train)
      if i != 0:
        res *= 2
    h = nn.silu(_norm(self.norm_groups, self.dtype, "norm_out")(h))
    return _conv(self.out_channels, 3, self.dtype, "conv_out", precision=p)(h)


class RQVAE(nn.Module):
  """Residual-quantized VAE. Images [B, R, R, C] float in [-1, 1]; latents [B, h, w, n_z]; codes int32 [B, h, w, D].

  Use `RQVAE.from_config(cfg.model)`. Convolutions run in `dtype`; quantization always in float32.
  """

  resolution: int
  in_channels: int
  out_channels: int
  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  z_channels: int
  embed_dim: int
  codebook_size: int
  code_depth: int
  dropout: float = 0.0
  norm_groups: int = 32
  dtype: Dtype = jnp.float32
  quant_chunk_size: int = rq.DEFAULT_CHUNK_SIZE
  precision: Precision = None  # of the convolutions and attention (see `Precision`); the trainer keeps the default

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict | Mapping[str, Any]) -> "RQVAE":
    """Builds the model from the `model` section of an RQ-VAE config (validated; ConfigError names the key)."""
    g = lambda key: cfg[key]
    try:
      kwargs = dict(
          resolution=int(g("resolution")), in_channels=int(g("in_channels")), out_channels=int(g("out_channels")),
          ch=int(g("ch")), ch_mult=tuple(int(m) for m in g("ch_mult")), num_res_blocks=int(g("num_res_blocks")),
          attn_resolutions=tuple(int(r) for r in g("attn_resolutions")), z_channels=int(g("z_channels")),
          embed_dim=int(g("embed_dim")), codebook_size=int(g("codebook_size")), code_depth=int(g("code_depth")),
          dropout=float(g("dropout")), norm_groups=int(g("norm_groups")), dtype=common.parse_dtype(str(g("dtype"))),
          quant_chunk_size=int(g("quant_chunk_size")),
      )
    except (KeyError, AttributeError) as e:
      raise configlib.ConfigError(f"model config is missing key {e}") from e
    req = configlib.require
    req(len(kwargs["ch_mult"]) >= 1, "model.ch_mult must not be empty")
    req(all(m > 0 for m in kwargs["ch_mult"]), "model.ch_mult entries must be positive")
    down = 2 ** (len(kwargs["ch_mult"]) - 1)
    req(kwargs["resolution"] % down == 0,
        f"model.resolution {kwargs['resolution']} is not divisible by 2^(len(ch_mult)-1) = {down}")
    widths = [kwargs["ch"] * m for m in kwargs["ch_mult"]]
    req(all(w % kwargs["norm_groups"] == 0 for w in widths),
        f"model.norm_groups {kwargs['norm_groups']} must divide every level width {widths}")
    req(kwargs["num_res_blocks"] >= 1, "model.num_res_blocks must be >= 1")
    req(kwargs["codebook_size"] >= 2, "model.codebook_size must be >= 2")
    req(kwargs["code_depth"] >= 1, "model.code_depth must be >= 1")
    req(0.0 <= kwargs["dropout"] < 1.0, "model.dropout must be in [0, 1)")
    req(kwargs["quant_chunk_size"] >= 1, "model.quant_chunk_size must be >= 1")
    for key in ("in_channels", "out_channels", "ch", "z_channels", "embed_dim"):
      req(kwargs[key] >= 1, f"model.{key} must be >= 1")
    return cls(**kwargs)

  @property
  def latent_size(self) -> int:
    """h = w = resolution / 2^(len(ch_mult) - 1)."""
    return self.resolution // 2 ** (len(self.ch_mult) - 1)

  @property
  def code_shape(self) -> tuple[int, int, int]:
    """(h, w, D)."""
    return (self.latent_size, self.latent_size, self.code_depth)

  def setup(self):
    common = dict(
        ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
        attn_resolutions=tuple(self.attn_resolutions), resolution=self.resolution, dropout=self.dropout,
        norm_groups=self.norm_groups, dtype=self.dtype, precision=self.precision,
    )
    self.encoder = Encoder(z_channels=self.z_channels, **common)
    self.decoder = Decoder(out_channels=self.out_channels, **common)
    # setup() names submodules after their attributes: quant_conv, post_quant_conv, encoder, decoder.
    self.quant_conv = _conv(self.embed_dim, 1, self.dtype, precision=self.precision)
    self.post_quant_conv = _conv(self.z_channels, 1, self.dtype, precision=self.precision)
    shape = (self.codebook_size, self.embed_dim)
    # N(0, 1) like the reference's nn.Embedding; EMA counts 1 and sums = codebook, so smoothing is a no-op at init.
    # The stage-1 trainer re-creates the EMA statistics with `quantizer.init_cluster_size` (the reference's is 0).
    self.codebook = self.variable(
        "quantizer", "codebook", lambda: jax.random.normal(self.make_rng("params"), shape, jnp.float32))
    self.cluster_size_ema = self.variable(
        "quantizer", "cluster_size_ema", lambda: jnp.ones((self.codebook_size,), jnp.float32))
    self.embed_ema = self.variable("quantizer", "embed_ema", lambda: self.codebook.value)

  def _check_images(self, x: jax.Array) -> None:
    want = (self.resolution, self.resolution, self.in_channels)
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
      raise ValueError(
          f"RQVAE expects images [B, {want[0]}, {want[1]}, {want[2]}] (resolution {self.resolution}, "
          f"in_channels {self.in_channels}), got shape {tuple(x.shape)}")

  def encode(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x [B, R, R, C_in] -> z [B, h, w, n_z] (after quant_conv)."""
    self._check_images(x)
    return self.quant_conv(self.encoder(x.astype(self.dtype), train))

  def quantize(self, z: jax.Array, codebook_update: rq.EmaSettings | None = None,
               restart_rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Residual-quantizes z [B, h, w, n_z] with the `quantizer` codebook.

    `codebook_update`: None keeps the codebook fixed. Given, the codebook is updated after each depth as the PyTorch
    reference's training forward does (`rq.rq_quantize_updating`): the `quantizer` collection must then be mutable,
    and `restart_rng` is the key of the dead-code restarts (required when `codebook_update.restart`).

    Returns:
      z_q_st: [B, h, w, n_z] straight-through quantized latents (value = last partial sum, gradient to z).
      codes: int32 [B, h, w, D].
      commitment_loss: scalar (mean over depths, unweighted).
      partial_sums: [B, h, w, D, n_z] float32.
    """
    if z.ndim != 4 or z.shape[-1] != self.embed_dim:
      raise ValueError(f"quantize expects latents [B, h, w, {self.embed_dim}], got shape {tuple(z.shape)}")
    z32 = z.astype(jnp.float32)
    if codebook_update is None:
      codes, partial_sums = rq.rq_quantize(z32, self.codebook.value, self.code_depth, self.quant_chunk_size)
    else:
      state = rq.CodebookState(codebook=self.codebook.value, cluster_size_ema=self.cluster_size_ema.value,
                               embed_ema=self.embed_ema.value)
      if codebook_update.restart and restart_rng is None:
        raise ValueError("codebook_update with restarts needs restart_rng")
      codes, partial_sums, state = rq.rq_quantize_updating(
          z32, state, self.code_depth, codebook_update.decay, codebook_update.eps,
          restart_rng if codebook_update.restart else None, self.quant_chunk_size)
      self.codebook.value = state.codebook
      self.cluster_size_ema.value = state.cluster_size_ema
      self.embed_ema.value = state.embed_ema
    loss = rq.commitment_loss(z32, partial_sums)
    z_q = rq.straight_through(z32, partial_sums[..., -1, :])
    return z_q, codes, loss, partial_sums

  def decode(self, z_q: jax.Array, train: bool = False) -> jax.Array:
    """z_q [B, h, w, n_z] -> reconstruction [B, R, R, C_out] (float32)."""
    h = self.latent_size
    if z_q.ndim != 4 or tuple(z_q.shape[1:]) != (h, h, self.embed_dim):
      raise ValueError(f"decode expects latents [B, {h}, {h}, {self.embed_dim}], got shape {tuple(z_q.shape)}")
    x = self.decoder(self.post_quant_conv(z_q.astype(self.dtype)), train)
    return x.astype(jnp.float32)

  def decode_codes(self, codes: jax.Array) -> jax.Array:
    """codes int [B, h, w, D] -> images [B, R, R, C_out]."""
    if codes.ndim != 4 or tuple(codes.shape[1:]) != self.code_shape:
      raise ValueError(f"decode_codes expects codes [B, {', '.join(map(str, self.code_shape))}], "
                       f"got shape {tuple(codes.shape)}")
    if not jnp.issubdtype(codes.dtype, jnp.integer):
      raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
    return self.decode(rq.embed_codes(codes, self.codebook.value))

  def __call__(self, x: jax.Array, train: bool = False, codebook_update: rq.EmaSettings | None = None,
               restart_rng: jax.Array | None = None) -> dict[str, jax.Array]:
    """Full pass. Without `codebook_update` the codebook is NOT updated here: the trainer applies `rq.ema_update` to
    the returned `residuals`/`codes` (pure, outside the gradient). With it, the codebook is updated depth by depth
    during the pass (see `quantize`, which takes `restart_rng`; `apply(..., mutable=['quantizer'])`).

    Returns a dict:
      recon [B, R, R, C_out] float32; codes int32 [B, h, w, D]; z [B, h, w, n_z] float32 (pre-quantization);
      residuals [B, h, w, D, n_z] (the vector each depth quantized, for the EMA update);
      commitment_loss scalar (unweighted); mse scalar (mean squared reconstruction error).
    """
    z = self.encode(x, train)
    z_q, codes, loss, partial_sums = self.quantize(z, codebook_update, restart_rng)
    recon = self.decode(z_q, train)
    return {
        "recon": recon,
        "codes": codes,
        "z": z.astype(jnp.float32),
        "residuals": rq.residuals(z, partial_sums),
        "commitment_loss": loss,
        "mse": jnp.mean((recon - x.astype(jnp.float32)) ** 2),
    }


def codebook_state(variables: Mapping[str, Any]) -> rq.CodebookState:
  """The `quantizer` collection of RQVAE variables as an `rq.CodebookState`."""
  if "quantizer" not in variables:
    raise ValueError(f"variables have no 'quantizer' collection (have {sorted(variables)})")
  q = variables["quantizer"]
  return rq.CodebookState(codebook=q["codebook"], cluster_size_ema=q["cluster_size_ema"], embed_ema=q["embed_ema"])


def with_codebook_state(variables: Mapping[str, Any], state: rq.CodebookState) -> dict[str, Any]:
  """A copy of `variables` whose `quantizer` collection holds `state`."""
  out = dict(variables)
  out["quantizer"] = {
      "codebook": state.codebook, "cluster_size_ema": state.cluster_size_ema, "embed_ema": state.embed_ema}
  return out


def init_variables(model: RQVAE, rng: jax.Array, batch_size: int = 1) -> dict[str, Any]:
  """Initial {'params', 'quantizer'} of `model` from one dummy batch."""
  x = jnp.zeros((batch_size, model.resolution, model.resolution, model.in_channels), jnp.float32)
  variables = model.init({"params": rng}, x)
  return {"params": variables["params"], "quantizer": variables["quantizer"]}


@common.memoised_shapes
def abstract_variables(model: RQVAE) -> dict[str, Any]:
  """`init_variables(model, ...)` as ShapeDtypeStructs: nothing allocated, traced once per model in a process."""
  return jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))
