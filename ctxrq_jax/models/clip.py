"""CLIP (Radford et al. 2021), the ViT image tower and the causal text tower, as OpenAI released them: the network of
the CLIP score (cosine similarity of the ViT-B/32 image and text embeddings), read from OpenAI's checkpoint by
`clip_convert.py`.

Image tower (`encode_image`), images already preprocessed (`data/clip_images.py`) to float [B, S, S, 3]:
  conv1 (patch P, stride P, no bias) -> [B, G*G, W] patches in row-major order, G = S / P
  [class_embedding; patches] + positional_embedding [G*G + 1, W] -> ln_pre -> L pre-LN residual blocks
  -> ln_post on the class token -> @ proj [W, E]                                   -> [B, E]
Text tower (`encode_text`), token ids int [B, T] (`data/clip_tokenizer.py`; T = context length, 0-padded):
  token_embedding [V, W] + positional_embedding [T, W] -> L causal pre-LN residual blocks -> ln_final
  -> the features at the end-of-text token (the largest id of each row, the first if it repeats)
  -> @ text_projection [W, E]                                                     -> [B, E]
Residual block: x + attn(ln_1(x)); x + mlp(ln_2(x)), attention with a packed q/k/v projection (`in_proj`, torch's
`nn.MultiheadAttention` layout), the MLP c_fc (4W) -> QuickGELU (x * sigmoid(1.702 x), what OpenAI trained with)
-> c_proj. LayerNorm epsilon 1e-5 (torch's default).

The embeddings are not normalised here; the CLIP score normalises them (`evaluation/clip_score.py`).
Matmuls and the patch convolution run at `precision` (HIGHEST by default, so GPUs and TPUs do not round to
TF32/bfloat16 passes and the score matches the float32 reference).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ctxrq_jax.models import common

LN_EPSILON = 1e-5
QUICK_GELU_ALPHA = 1.702
DEFAULT_PRECISION = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Architecture of a ViT CLIP. Attention heads are not stored in OpenAI's checkpoint; OpenAI's models use
  width // 64."""

  embed_dim: int
  image_size: int
  patch_size: int
  vision_width: int
  vision_layers: int
  vision_heads: int
  context_length: int
  vocab_size: int
  text_width: int
  text_layers: int
  text_heads: int

  def __post_init__(self):
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
    for width, heads, tower in ((self.vision_width, self.vision_heads, "vision"),
                                (self.text_width, self.text_heads, "text")):
      if width % heads:
        raise ValueError(f"{tower} width {width} is not divisible by its {heads} heads")

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  def to_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "CLIPConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    if set(d) != names:
      raise ValueError(f"CLIP config keys {sorted(d)} are not {sorted(names)}")
    return cls(**{k: int(v) for k, v in d.items()})


# OpenAI's ViT-B/32 (open_clip `model_configs/ViT-B-32.json`; heads = width // 64).
VIT_B_32 = CLIPConfig(embed_dim=512, image_size=224, patch_size=32, vision_width=768, vision_layers=12,
                      vision_heads=12, context_length=77, vocab_size=49408, text_width=512, text_layers=12,
                      text_heads=8)
# The same kinds of layer at a size the tests run in milliseconds.
TINY = CLIPConfig(embed_dim=32, image_size=32, patch_size=16, vision_width=64, vision_layers=2, vision_heads=4,
                  context_length=12, vocab_size=100, text_width=48, text_layers=2, text_heads=4)
CONFIGS = {"ViT-B/32": VIT_B_32, "tiny": TINY}


def quick_gelu(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(QUICK_GELU_ALPHA * x)


class MultiheadAttention(nn.Module):
  """Self-attention with torch `nn.MultiheadAttention`'s packed projection: in_proj [W, 3W] (q, k, v in that
  order), out_proj [W, W]. x [B, T, W] -> [B, T, W]; `causal` masks each position's future."""

  width: int
  heads: int
  causal: bool
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, w = x.shape
    dh = w // self.heads
    qkv = nn.Dense(3 * w, precision=self.precision, name="in_proj")(x)
    q, k, v = (a.reshape(b, t, self.heads, dh) for a in jnp.split(qkv, 3, axis=-1))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * (dh ** -0.5), k, precision=self.precision)
    if self.causal:
      mask = jnp.tril(jnp.ones((t, t), bool))
      logits = jnp.where(mask, logits, -jnp.inf)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=self.precision).reshape(b, t, w)
    return nn.Dense(w, precision=self.precision, name="out_proj")(out)


class ResidualAttentionBlock(nn.Module):
  """x [B, T, W] -> x + attn(ln_1(x)) -> that + mlp(ln_2(that)), MLP W -> 4W -> QuickGELU -> W."""

  width: int
  heads: int
  causal: bool
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.LayerNorm(epsilon=LN_EPSILON, name="ln_1")(x)
    x = x + MultiheadAttention(self.width, self.heads, self.causal, self.precision, name="attn")(h)
    h = nn.LayerNorm(epsilon=LN_EPSILON, name="ln_2")(x)
    h = nn.Dense(4 * self.width, precision=self.precision, name="c_fc")(h)
    h = nn.Dense(self.width, precision=self.precision, name="c_proj")(quick_gelu(h))
    return x + h


class Transformer(nn.Module):
  """`layers` residual blocks, named resblocks_0 ... (torch `transformer.resblocks.N`). [B, T, W] -> [B, T, W]."""

  width: int
  layers: int
  heads: int
  causal: bool
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.layers):
      x = ResidualAttentionBlock(self.width, self.heads, self.causal, self.precision, name=f"resblocks_{i}")(x)
    return x


class VisionTransformer(nn.Module):
  """Preprocessed images float [B, S, S, 3] -> image embeddings [B, E] (module docstring)."""

  config: CLIPConfig
  precision: Any = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    cfg = self.config
    chex.assert_shape(images, (None, cfg.image_size, cfg.image_size, 3))
    w, g = cfg.vision_width, cfg.grid_size
    x = nn.Conv(w, (cfg.patch_size, cfg.patch_size), strides=(cfg.patch_size, cfg.patch_size), padding="VALID",
                use_bias=False, precision=self.precision, name="conv1")(images)
    x = x.reshape(x.shape[0], g * g, w)
    init = nn.initializers.normal(w ** -0.5)
    cls = self.param("class_embedding", init, (w,))
    pos = self.param("positional_embedding", init, (g * g + 1, w))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, w)), x], axis=1) + pos
    x = nn.LayerNorm(epsilon=LN_EPSILON, name="ln_pre")(x)
    x = Transformer(w, cfg.vision_layers, cfg.vision_heads, False, self.precision, name="transformer")(x)
    x = nn.LayerNorm(epsilon=LN_EPSILON, name="ln_post")(x[:, 0])
    proj = self.param("proj", init, (w, cfg.embed_dim))
    return jnp.dot(x, proj, precision=self.precision)


class CLIP(nn.Module):
  """OpenAI's ViT CLIP. Parameters (Flax names; `clip_convert.py` maps each to its torch key):
    visual/{conv1, class_embedding, positional_embedding, ln_pre, transformer/resblocks_N, ln_post, proj}
    token_embedding, positional_embedding, transformer/resblocks_N, ln_final, text_projection, logit_scale
  """

  config: CLIPConfig
  precision: Any = DEFAULT_PRECISION

  def setup(self):
    cfg = self.config
    self.visual = VisionTransformer(cfg, self.precision)
    self.token_embedding = nn.Embed(cfg.vocab_size, cfg.text_width, embedding_init=nn.initializers.normal(0.02))
    self.positional_embedding = self.param("positional_embedding", nn.initializers.normal(0.01),
                                           (cfg.context_length, cfg.text_width))
    self.transformer = Transformer(cfg.text_width, cfg.text_layers, cfg.text_heads, True, self.precision)
    self.ln_final = nn.LayerNorm(epsilon=LN_EPSILON)
    self.text_projection = self.param("text_projection", nn.initializers.normal(cfg.text_width ** -0.5),
                                      (cfg.text_width, cfg.embed_dim))
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(jnp.log(1 / 0.07)), ())

  def encode_image(self, images: jax.Array) -> jax.Array:
    """float [B, S, S, 3] (CLIP-normalised, `clip_images.preprocess`) -> [B, E], not normalised."""
    out = self.visual(images)
    chex.assert_shape(out, (images.shape[0], self.config.embed_dim))
    return out

  def encode_text(self, tokens: jax.Array) -> jax.Array:
    """int [B, T] (T = context_length; SOT ... EOT then 0s) -> [B, E], not normalised."""
    cfg = self.config
    chex.assert_shape(tokens, (None, cfg.context_length))
    chex.assert_type(tokens, int)
    x = self.token_embedding(tokens) + self.positional_embedding
    x = self.ln_final(self.transformer(x))
    eot = jnp.argmax(tokens, axis=-1)  # the end-of-text token has the largest id; argmax takes its first position
    x = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
    out = jnp.dot(x, self.text_projection, precision=self.precision)
    chex.assert_shape(out, (tokens.shape[0], cfg.embed_dim))
    return out

  def __call__(self, images: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(image embeddings [B, E], text embeddings [B', E])."""
    return self.encode_image(images), self.encode_text(tokens)


def init_params(config: CLIPConfig, key: jax.Array) -> dict[str, Any]:
  """Random {'params': ...} of CLIP(config) (for tests and shapes; real weights come from `clip_convert`)."""
  model = CLIP(config)
  images = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
  tokens = jnp.zeros((1, config.context_length), jnp.int32)
  return model.init(key, images, tokens)


@common.memoised_shapes
def abstract_params(config: CLIPConfig) -> dict[str, Any]:
  """ShapeDtypeStructs of `init_params(config, ...)`, without computing anything."""
  return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
