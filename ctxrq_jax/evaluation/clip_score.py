"""CLIP score as the paper reports it (Table 2, CC-3M: 0.26): the cosine similarity of OpenAI CLIP ViT-B/32's image
embedding of each generated image and text embedding of its caption, averaged over the images; not multiplied by
100 and not clipped at 0.

  config, params = clip_convert.load_variables("ViT-B-32.pt")          # or a converted directory
  embedder = clip_score.CLIPEmbedder(config, params)
  tokenizer = clip_tokenizer.CLIPTokenizer("bpe_simple_vocab_16e6.txt.gz")
  results = clip_score.evaluate(embedder, tokenizer, "samples.npz")

Images go through CLIP's own preprocessing (`data/clip_images.py`: PIL bicubic resize of the shorter side to 224,
centre crop, CLIP mean/std) and captions through CLIP's tokenizer (`data/clip_tokenizer.py`, 77 tokens).

Which caption belongs to which image (`read_captions`):
  * a text-to-image samples file as `sample --prompts` writes it (`sampling/runner.py`): `arr_0` uint8 [N, H, W, 3],
    `prompts` str [P] and `labels` int [N], image i showing prompts[labels[i]];
  * `prompts` str [N] without `labels`: image i shows prompts[i];
  * any `arr_0` file with a captions file of N lines, line i the caption of image i (e.g. real validation images
    and their captions, the score's real-data reference).
Images stream from the npz in batches; each distinct caption is embedded once.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ctxrq_jax.core import paths
from ctxrq_jax.core import reporting
from ctxrq_jax.data import clip_images
from ctxrq_jax.data import clip_tokenizer
from ctxrq_jax.evaluation import inception_features
from ctxrq_jax.models import clip

BATCH_SIZE = 64
NORM_EPSILON = 1e-12  # torch F.normalize's


def cosine_similarities(image_embeddings: jax.Array, text_embeddings: jax.Array) -> jax.Array:
  """[N, E], [N, E] -> [N] float32: the cosine of each (image, text) pair (each side divided by max(norm, 1e-12))."""
  chex.assert_rank([image_embeddings, text_embeddings], 2)
  chex.assert_equal_shape([image_embeddings, text_embeddings])
  a = image_embeddings.astype(jnp.float32)
  b = text_embeddings.astype(jnp.float32)
  a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), NORM_EPSILON)
  b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), NORM_EPSILON)
  return jnp.sum(a * b, axis=-1)


def clip_score(image_embeddings: jax.Array, text_embeddings: jax.Array) -> jax.Array:
  """[N, E], [N, E] -> scalar: the mean cosine similarity of the N pairs (the paper's CLIP score)."""
  return jnp.mean(cosine_similarities(image_embeddings, text_embeddings))


class CLIPEmbedder:
  """Images and token ids -> CLIP embeddings (numpy float32 [N, E]), `batch_size` rows per jitted call, split over
  this host's devices (the weights replicated); the last chunk is padded and trimmed, so each tower compiles once.

  Args:
    config: the architecture (`clip_convert.load_variables` returns it with the weights).
    params: {'params': ...} of clip.CLIP(config).
    batch_size: rows per call; a multiple of the number of local devices.
  """

  def __init__(self, config: clip.CLIPConfig, params: Mapping[str, Any], *, batch_size: int = BATCH_SIZE):
    devices = np.asarray(jax.local_devices())
    if batch_size < 1 or batch_size % len(devices):
      raise ValueError(f"batch_size must be a positive multiple of the {len(devices)} local devices, got {batch_size}")
    mesh = jax.sharding.Mesh(devices, ("data",))
    self._batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    self.params = jax.device_put({"params": params["params"]},
                                 jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    self.config, self.batch_size = config, int(batch_size)
    model = clip.CLIP(config)
    self._image_fn = jax.jit(lambda p, crops: model.apply(p, clip_images.normalize(crops),
                                                          method=clip.CLIP.encode_image))
    self._text_fn = jax.jit(lambda p, tokens: model.apply(p, tokens, method=clip.CLIP.encode_text))

  def _batched(self, fn: Callable, rows: np.ndarray) -> np.ndarray:
    out = []
    for i in range(0, len(rows), self.batch_size):
      chunk = rows[i:i + self.batch_size]
      pad = self.batch_size - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
      out.append(np.asarray(fn(self.params, jax.device_put(chunk, self._batch_sharding)))[:self.batch_size - pad])
    return np.concatenate(out) if out else np.zeros((0, self.config.embed_dim), np.float32)

  def image_embeddings(self, images: Any) -> np.ndarray:
    """uint8 images [N, H, W, 3] (any size; CLIP-preprocessed here) -> [N, E]."""
    images = inception_features.check_images(images)
    return self._batched(self._image_fn, clip_images.resize_and_crop_batch(images, self.config.image_size))

  def text_embeddings(self, tokens: Any) -> np.ndarray:
    """int [N, context_length] (`CLIPTokenizer.encode`) -> [N, E]."""
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2 or tokens.shape[1] != self.config.context_length:
      raise ValueError(f"tokens must be [N, {self.config.context_length}], got {list(tokens.shape)}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
      raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}), got [{tokens.min()}, {tokens.max()}]")
    return self._batched(self._text_fn, tokens)


def read_captions(samples_path: str | os.PathLike, captions_file: Optional[str] = None
                  ) -> tuple[list[str], np.ndarray]:
  """(distinct captions [P], index [N] into them): the caption of each image of `samples_path` (module docstring).

  Raises:
    ValueError naming the file and what is missing or inconsistent.
  """
  samples_path = os.fspath(samples_path)
  shape, _ = inception_features.npz_array_info(samples_path, inception_features.IMAGES_KEY)
  n = shape[0]
  if captions_file is not None:
    if not paths.path(captions_file).exists():
      raise ValueError(f"captions file {captions_file} does not exist")
    lines = paths.path(captions_file).read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
      lines.pop()
    if len(lines) != n:
      raise ValueError(f"{captions_file} has {len(lines)} lines but {samples_path} has {n} images (one caption per "
                       "line, line i for image i)")
    distinct = list(dict.fromkeys(lines))
    position = {c: i for i, c in enumerate(distinct)}
    return distinct, np.asarray([position[c] for c in lines], np.int64)
  keys = inception_features.npz_keys(samples_path)
  if "prompts" not in keys:
    raise ValueError(f"{samples_path} has no 'prompts' (a text-to-image samples file from `sample --prompts`); for "
                     f"other images pass their captions with --captions_file (keys: {keys})")
  with np.load(paths.local_copy(samples_path)) as z:
    prompts = [str(p) for p in np.asarray(z["prompts"]).reshape(-1)]
    labels = np.asarray(z["labels"]).reshape(-1).astype(np.int64) if "labels" in keys else None
  if labels is None:
    if len(prompts) != n:
      raise ValueError(f"{samples_path}: {len(prompts)} prompts for {n} images and no 'labels' to say which is whose")
    labels = np.arange(n)
  if len(labels) != n:
    raise ValueError(f"{samples_path}: {len(labels)} labels for {n} images")
  if n and (labels.min() < 0 or labels.max() >= len(prompts)):
    raise ValueError(f"{samples_path}: labels index prompts outside [0, {len(prompts)})")
  return prompts, labels


def evaluate(embedder: CLIPEmbedder, tokenizer: clip_tokenizer.CLIPTokenizer, samples_path: str | os.PathLike, *,
             captions_file: Optional[str] = None, progress: Optional[Callable[[int], Any]] = None
             ) -> dict[str, float | int]:
  """The CLIP score of the images of `samples_path` against their captions.

  Returns:
    {'clip_score': mean cosine, 'std': the cosines' standard deviation, 'num_images': N, 'num_captions': distinct
    captions}; `progress(images_done)` is called after each batch.
  """
  if tokenizer.context_length != embedder.config.context_length:
    raise ValueError(f"the tokenizer's context length {tokenizer.context_length} is not the model's "
                     f"{embedder.config.context_length}")
  captions, index = read_captions(samples_path, captions_file)
  text = embedder.text_embeddings(tokenizer.encode(captions))
  cosines, done = [], 0
  for batch in inception_features.iter_npz_batches(samples_path, batch_size=embedder.batch_size):
    images = embedder.image_embeddings(batch)
    texts = text[index[done:done + len(batch)]]
    cosines.append(np.asarray(cosine_similarities(jnp.asarray(images), jnp.asarray(texts))))
    done += len(batch)
    if progress is not None:
      progress(done)
  if not done:
    raise ValueError(f"{samples_path} has no images")
  cos = np.concatenate(cosines).astype(np.float64)
  return {"clip_score": float(cos.mean()), "std": float(cos.std()), "num_images": int(done),
          "num_captions": len(captions)}


def format_results(results: Mapping[str, Any], *, samples: str) -> str:
  rows = [["CLIP score (mean cosine)", f"{results['clip_score']:.4f}"],
          ["std over images", f"{results['std']:.4f}"],
          ["images (N)", str(results["num_images"])],
          ["distinct captions", str(results["num_captions"])]]
  return f"samples {samples}\n" + reporting.table(rows, ["metric", "value"])
