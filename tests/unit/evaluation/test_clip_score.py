"""CLIP score: the pure function on known values, the caption layouts of a samples file, and the whole evaluation on
a tiny random CLIP against the same numbers computed by hand."""

from __future__ import annotations

import dataclasses
import gzip

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxrq_jax.data import clip_images
from ctxrq_jax.data import clip_tokenizer
from ctxrq_jax.evaluation import clip_score
from ctxrq_jax.models import clip
from ctxrq_jax.models import clip_convert


def test_known_values():
  image = jnp.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
  text = jnp.array([[2.0, 0.0], [1.0, 1.0], [-3.0, -4.0]])
  np.testing.assert_allclose(clip_score.cosine_similarities(image, text), [1.0, 2 ** -0.5, -1.0], rtol=1e-6)
  # The mean itself: not x100 and not clipped at 0 (the -1 counts).
  np.testing.assert_allclose(clip_score.clip_score(image, text), (1.0 + 2 ** -0.5 - 1.0) / 3, rtol=1e-6)
  np.testing.assert_allclose(clip_score.cosine_similarities(jnp.zeros((1, 2)), text[:1]), [0.0])


def _samples(path, images, **arrays):
  np.savez(path, arr_0=images, **arrays)
  return str(path)


def test_caption_layouts(tmp_path):
  images = np.zeros((4, 8, 8, 3), np.uint8)
  # sample --prompts: prompts [P], labels [N] (runner.write_samples_npz also stores codes and cond).
  p = _samples(tmp_path / "a.npz", images, prompts=np.array(["a cat", "a dog"]), labels=np.array([0, 0, 1, 1]),
               cond=np.zeros((4, 3), np.int32))
  captions, index = clip_score.read_captions(p)
  assert [captions[i] for i in index] == ["a cat", "a cat", "a dog", "a dog"]
  p = _samples(tmp_path / "b.npz", images, prompts=np.array(["w", "x", "y", "z"]))
  captions, index = clip_score.read_captions(p)
  assert [captions[i] for i in index] == ["w", "x", "y", "z"]
  f = tmp_path / "captions.txt"
  f.write_text("one\ntwo\none\nthree\n", encoding="utf-8")
  captions, index = clip_score.read_captions(_samples(tmp_path / "c.npz", images), str(f))
  assert captions == ["one", "two", "three"] and index.tolist() == [0, 1, 0, 2]
  with pytest.raises(ValueError, match="--captions_file"):
    clip_score.read_captions(tmp_path / "c.npz")
  f.write_text("one\ntwo\n", encoding="utf-8")
  with pytest.raises(ValueError, match="2 lines but .* 4 images"):
    clip_score.read_captions(tmp_path / "c.npz", str(f))
  with pytest.raises(ValueError, match="labels index prompts outside"):
    clip_score.read_captions(_samples(tmp_path / "d.npz", images, prompts=np.array(["a"]), labels=np.arange(4)))


def test_evaluate_end_to_end(tmp_path):
  """7 images of an odd size through a random tiny CLIP in batches of 4 (the last one padded): the same score as CLIP's
  preprocessing, tokenizer and towers applied by hand, each image against its own prompt."""
  vocab = tmp_path / clip_tokenizer.VOCAB_FILENAME
  with gzip.open(vocab, "wt", encoding="utf-8") as f:
    f.write("#version: 0.2\nc a\nca t</w>\nd o\ndo g</w>\n")
  tokenizer = clip_tokenizer.CLIPTokenizer(vocab, context_length=clip.TINY.context_length)
  config = dataclasses.replace(clip.TINY, vocab_size=tokenizer.vocab_size)
  params = clip_convert.convert_state_dict(clip_convert.random_state_dict(config, seed=0), config)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (7, 40, 52, 3), dtype=np.uint8)
  prompts = ["a cat", "a dog on a mat", "cat & dog!"]
  labels = np.array([0, 1, 2, 0, 1, 2, 2])
  path = _samples(tmp_path / "samples.npz", images, prompts=np.array(prompts), labels=labels)
  done = []
  embedder = clip_score.CLIPEmbedder(config, params, batch_size=4)
  results = clip_score.evaluate(embedder, tokenizer, path, progress=done.append)
  assert done == [4, 7]
  x = clip_images.preprocess(images, size=config.image_size)
  image_emb, text_emb = map(np.asarray, jax.jit(clip.CLIP(config).apply)(params, jnp.asarray(x),
                                                                          jnp.asarray(tokenizer.encode(prompts))))
  a = image_emb / np.linalg.norm(image_emb, axis=-1, keepdims=True)
  b = text_emb[labels] / np.linalg.norm(text_emb[labels], axis=-1, keepdims=True)
  want = np.sum(a * b, axis=-1)
  assert results["num_images"] == 7 and results["num_captions"] == 3
  np.testing.assert_allclose(results["clip_score"], want.mean(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(results["std"], want.std(), rtol=1e-4, atol=1e-6)
  assert f"{results['clip_score']:.4f}" in clip_score.format_results(results, samples=path)
  # Captions from a file give the same numbers.
  captions = tmp_path / "captions.txt"
  captions.write_text("\n".join(prompts[i] for i in labels) + "\n", encoding="utf-8")
  plain = _samples(tmp_path / "plain.npz", images)
  again = clip_score.evaluate(embedder, tokenizer, plain, captions_file=str(captions))
  np.testing.assert_allclose(again["clip_score"], results["clip_score"], rtol=1e-6)
  with pytest.raises(ValueError, match="context length"):
    clip_score.evaluate(embedder, clip_tokenizer.CLIPTokenizer(vocab), path)
