"""The Flax CLIP against open_clip's torch CLIP (random weights, no download), and OpenAI's checkpoint layout through
the converter: every ViT-B/32 key consumed, files and artifacts round-tripped, errors that name the keys."""

from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxrq_jax.models import clip
from ctxrq_jax.models import clip_convert as conv
from tests import clip_reference as ref

CFG = clip.TINY


def _tokens(cfg, rng):
  """Rows as the tokenizer writes them (SOT ... EOT, 0-padded), of several lengths, one filling the context, one
  holding the largest id twice (the first is the pooled position, as torch's argmax takes)."""
  sot, eot = cfg.vocab_size - 2, cfg.vocab_size - 1
  rows = np.zeros((4, cfg.context_length), np.int32)
  for i, n in enumerate([3, cfg.context_length, 6, 5]):
    rows[i, :n] = rng.integers(1, sot, n)
    rows[i, 0], rows[i, n - 1] = sot, eot
  rows[3, 2] = eot
  return rows


_APPLY = jax.jit(clip.CLIP(CFG).apply)  # one function, compiled once for the file


def _embed(params, images, tokens):
  return _APPLY(params, jnp.asarray(images), jnp.asarray(tokens))


def test_tiny_clip_matches_open_clip():
  torch = pytest.importorskip("torch")
  model = ref.build_torch_clip(CFG, seed=1)
  params = conv.convert_state_dict(model.state_dict(), CFG)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(3, CFG.image_size, CFG.image_size, 3)).astype(np.float32)
  tokens = _tokens(CFG, rng)
  image_emb, text_emb = _embed(params, images, tokens)
  with torch.no_grad():
    want_image = model.encode_image(ref.nchw(images)).numpy()
    want_text = model.encode_text(torch.from_numpy(tokens).long()).numpy()
  # Measured: max abs difference 1.4e-6 (image and text) on embeddings of magnitude ~3; cosines within 1.2e-7.
  np.testing.assert_allclose(np.asarray(image_emb), want_image, rtol=0, atol=1e-5 * np.abs(want_image).max())
  np.testing.assert_allclose(np.asarray(text_emb), want_text, rtol=0, atol=1e-5 * np.abs(want_text).max())
  unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
  np.testing.assert_allclose(unit(np.asarray(image_emb)) @ unit(np.asarray(text_emb)).T,
                             unit(want_image) @ unit(want_text).T, rtol=0, atol=1e-6)
  # The embeddings depend on what they should: a changed token after EOT changes nothing, one before it does.
  later, earlier = tokens.copy(), tokens.copy()
  later[0, 5], earlier[0, 1] = 7, 7
  _, t_later = _embed(params, images, later)
  _, t_earlier = _embed(params, images, earlier)
  np.testing.assert_allclose(np.asarray(t_later[0]), np.asarray(text_emb[0]), atol=1e-6)
  assert np.abs(np.asarray(t_earlier[0]) - np.asarray(text_emb[0])).max() > 1e-3


def test_vit_b32_key_set_is_open_clips():
  """open_clip's ViT-B-32 (OpenAI layout, QuickGELU; built on torch's meta device, so no weights are drawn): the
  same keys and shapes as our plan, and its state dict, OpenAI's scalars beside it, passes the converter's check with
  nothing missing or left over and reads back as ViT-B/32. (The conversion itself is checked on the tiny model.)"""
  torch = pytest.importorskip("torch")
  open_clip = ref.import_open_clip()
  with torch.device("meta"):  # what create_model("ViT-B-32", pretrained=None, quick_gelu=True) builds, minus the init
    model = open_clip.model.CLIP(**open_clip.get_model_config("ViT-B-32"), quick_gelu=True)
  sd = model.state_dict()
  theirs = {k: tuple(v.shape) for k, v in sd.items()}
  assert conv.reference_state_dict_shapes(clip.VIT_B_32) == theirs
  assert len(theirs) == 302
  n_params = sum(int(np.prod(s)) for s in theirs.values())
  assert n_params == sum(int(np.prod(a.shape)) for a in jax.tree.leaves(clip.abstract_params(clip.VIT_B_32)))
  assert n_params == 151_277_313
  sd.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
  assert conv.config_from_state_dict(sd) == clip.VIT_B_32
  assert conv.check_state_dict(sd) == clip.VIT_B_32
  del sd["visual.proj"]
  with pytest.raises(conv.CLIPConversionError, match="missing"):
    conv.check_state_dict(sd, clip.VIT_B_32)


def test_errors_name_missing_unexpected_and_misshaped_keys():
  rng = np.random.default_rng(0)
  sd = {k: rng.normal(size=s).astype(np.float32) for k, s in conv.reference_state_dict_shapes(CFG).items()}
  conv.convert_state_dict(sd, CFG)
  bad = dict(sd)
  del bad["visual.ln_post.bias"]
  bad["visual.extra"] = np.zeros(3, np.float32)
  bad["text_projection"] = np.zeros((3, 3), np.float32)
  with pytest.raises(conv.CLIPConversionError) as e:
    conv.convert_state_dict(bad, CFG)
  for what in ("missing keys: visual.ln_post.bias", "unexpected keys: visual.extra", "text_projection: (3, 3)"):
    assert what in str(e.value)
  with pytest.raises(conv.CLIPConversionError, match="missing visual.proj"):  # e.g. a ResNet CLIP
    conv.config_from_state_dict({k: v for k, v in sd.items() if k != "visual.proj"})
  with pytest.raises(FileNotFoundError, match=r"ViT-B-32\.pt .*openaipublic"):
    conv.require_weights_file("/nonexistent/dir")


def test_files_and_artifacts(tmp_path, monkeypatch):
  torch = pytest.importorskip("torch")
  model = ref.build_torch_clip(CFG, seed=2)
  direct = conv.convert_state_dict(model.state_dict(), CFG)
  # OpenAI stores most weights in float16: read as float32.
  half = conv.convert_state_dict({k: v.half() for k, v in model.state_dict().items()}, CFG)
  for a, b in zip(jax.tree.leaves(direct), jax.tree.leaves(half)):
    assert b.dtype == np.float32
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-3)
  # OpenAI's format is a TorchScript archive; a traced model is one (it adds the causal mask buffer attn_mask).
  archive = tmp_path / conv.WEIGHTS_FILENAME
  x = torch.zeros(1, 3, CFG.image_size, CFG.image_size)
  torch.jit.trace_module(model, {"encode_image": (x,)}, check_trace=False).save(str(archive))
  plain = tmp_path / "plain.pt"
  torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, plain)
  with pytest.raises(conv.CLIPConversionError, match="SHA-256"):  # not OpenAI's file
    conv.load_torch_state_dict(archive)
  for source in (archive, tmp_path, plain):
    config, got = conv.load_variables(source, check_hash=False, config=CFG)
    assert config == CFG
    for a, b in zip(jax.tree.leaves(direct), jax.tree.leaves(got)):
      np.testing.assert_array_equal(a, b)
  # Without a config the shapes give one with OpenAI's 64-wide heads.
  assert conv.load_variables(archive, check_hash=False)[0] == dataclasses.replace(CFG, vision_heads=1, text_heads=1)
  conv.convert_file(archive, tmp_path / "art", check_hash=False, config=CFG)
  config, loaded = conv.load_variables(tmp_path / "art")
  assert config == CFG
  for a, b in zip(jax.tree.leaves(direct), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(a, np.asarray(b))
  with pytest.raises(FileExistsError):
    conv.save_artifact(tmp_path / "art", CFG, direct)
  with pytest.raises(ValueError, match="not CLIP's"):
    conv.save_artifact(tmp_path / "art2", clip.dataclasses.replace(CFG, embed_dim=16), direct)
  not_weights = tmp_path / "junk.pt"
  not_weights.write_bytes(b"not a torch file")
  with pytest.raises(conv.CLIPConversionError, match="could not be read"):
    conv.load_torch_state_dict(not_weights, check_hash=False)
  monkeypatch.setitem(sys.modules, "torch", None)  # torch absent: the message says what to install
  with pytest.raises(conv.CLIPConversionError, match=r"pip install 'ctxrq_jax\[torch\]'"):
    conv.load_torch_state_dict(archive, check_hash=False)
