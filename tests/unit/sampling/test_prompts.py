"""Text-to-image sampling (ctxrq_jax/sampling/runner.py): prompts in, Draft-and-Revise images out with each prompt
written under its images; the empty caption as the unconditional branch; inpainting with a prompt."""

import json
import logging
import os
import re
import types

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from ctxrq_jax.core import config as configlib
from ctxrq_jax.core import grids
from ctxrq_jax.core import sharding
from ctxrq_jax.data import code_captions
from ctxrq_jax.data import codes as codes_lib
from ctxrq_jax.data import tokenizer as tokenizer_lib
from ctxrq_jax.models import artifact as artifact_lib
from ctxrq_jax.models import rqvae
from ctxrq_jax.models import transformer
from ctxrq_jax.sampling import decoder
from ctxrq_jax.sampling import editing
from ctxrq_jax.sampling import loader
from ctxrq_jax.sampling import logits
from ctxrq_jax.sampling import runner
from tests import helpers

CAPTIONS = [f"a {c} {t}" for c in ("red", "blue", "green", "black") for t in ("dog", "bus", "house")]


def test_read_prompts(tmp_path):
  path = tmp_path / "prompts.txt"
  path.write_text("a dog on a beach\n\n  a red bus \n")
  assert runner.read_prompts("a cat; ;a tree", str(path)) == ["a cat", "a tree", "a dog on a beach", "a red bus"]
  with pytest.raises(ValueError, match="no prompts"):
    runner.read_prompts(" ; ")
  with pytest.raises(ValueError, match="does not exist"):
    runner.read_prompts(None, str(tmp_path / "missing.txt"))
  # Lines end at "\n" only, as `evaluate clip --captions_file` counts them: NEL (\x85), U+2028, \v or \x1c inside a
  # raw caption do not make more prompts; whitespace inside a prompt becomes single spaces.
  path.write_bytes("a dog\x85on grass\r\nthe\u2028red\x0bbus\x1c\n\u2029\n".encode("utf-8"))
  assert runner.read_prompts(None, str(path)) == ["a dog on grass", "the red bus"]
  assert runner.read_prompts(" a\tcat  on\x85a mat ;") == ["a cat on a mat"]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
  """A stand-in for a loaded text-to-image run: its tokenizer (trained on CAPTIONS, L = 8) is all these tests use."""
  tok_dir = str(tmp_path_factory.mktemp("bpe"))
  tokenizer_lib.train_tokenizer(CAPTIONS * 2, tok_dir, vocab_size=60)
  tok = tokenizer_lib.CaptionTokenizer.from_directory(tok_dir, context_length=8)
  return types.SimpleNamespace(model=types.SimpleNamespace(is_text=True), workdir="run", tokenizer=lambda: tok)


def test_prompts_without_tokens_are_refused_and_long_ones_reported(text_run, caplog):
  tok = text_run.tokenizer()
  labels, cond = runner.prompt_conditions(text_run, ["a red dog", "a blue bus"], 2)
  assert labels.tolist() == [0, 0, 1, 1]
  np.testing.assert_array_equal(cond, np.repeat(tok.encode(["a red dog", "a blue bus"]), 2, axis=0))
  # A zero-width space or a control character survives `str.strip` but not the tokenizer: all [PAD], the null
  # condition, which would sample unconditionally with guidance doing nothing.
  for bad in ("\u200b", "\x00\x01"):
    with pytest.raises(ValueError, match=f"prompt {re.escape(repr(bad))} has no tokens"):
      runner.prompt_conditions(text_run, ["a red dog", bad], 1)
    with pytest.raises(ValueError, match=f"prompt {re.escape(repr(bad))} has no tokens"):
      editing.condition(text_run, prompt=bad)
  long = " ".join(["a red dog"] * 14)  # 40 words, cut to 8 tokens
  with caplog.at_level(logging.WARNING, logger=tokenizer_lib.__name__):
    _, cond = runner.prompt_conditions(text_run, ["a red dog", long], 1)
    np.testing.assert_array_equal(editing.condition(text_run, prompt=long), cond[1])
  assert "1 of 2 prompt(s) are longer than 8 tokens and were truncated to their first 8" in caplog.text
  assert "1 of 1 prompt(s) are longer than 8 tokens" in caplog.text


def test_captioned_grid_without_freetype(monkeypatch):
  """Pillow built without FreeType gives a bitmap font that measures and draws Latin-1 only: a CJK caption, or the
  ellipsis of a caption cut to 3 lines, must still draw (as '?'), not fail after the sampling."""
  from PIL import ImageFont  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(ImageFont, "load_default", ImageFont.load_default_imagefont)
  images = np.full((2, 8, 8, 3), 255, np.uint8)
  grid = grids.captioned_grid(images, ["東京 " * 30, "a caf\u00e9 " + "long words " * 40], ncols=2, scale=4)
  assert grid.shape[0] > 2 + 8 * 4 and (grid[2 + 8 * 4:] < 128).any()


def test_captioned_grid_writes_text_under_each_image():
  images = np.full((3, 8, 8, 1), 255, np.uint8)  # white images: every dark pixel is caption text
  grid = grids.captioned_grid(images, ["a red bus", "", "a dog"], ncols=3, scale=4)
  cell = 8 * 4
  below = grid[2 + cell:, :, 0]
  columns = [below[:, 2 + i * (cell + 2):2 + i * (cell + 2) + cell] for i in range(3)]
  assert (columns[0] < 128).any() and (columns[2] < 128).any() and not (columns[1] < 128).any()
  assert (grid[2:2 + cell, 2:2 + cell] == 255).all()  # the image itself is untouched
  with pytest.raises(ValueError, match="2 captions for 3 images"):
    grids.captioned_grid(images, ["a", "b"], ncols=3)


@pytest.mark.slow  # ~30 s on a loaded 2-core CPU: the sampler and the RQ-VAE decoder compile
def test_sample_prompts_end_to_end(tmp_path, monkeypatch):
  # Stage 1: the tiny RQ-VAE (16x16x1 images, 4x4x2 codes, K 16, n_z 8) with random weights.
  s1 = helpers.tiny_stage1_config()
  model1 = rqvae.RQVAE.from_config(s1.model)
  variables = jax.jit(rqvae.init_variables, static_argnums=0)(model1, jax.random.key(0))
  artifact = str(tmp_path / "rqvae")
  artifact_lib.save_artifact(artifact, s1.model, variables)
  # A tokenizer and a caption code dataset on that codebook.
  tok_dir = str(tmp_path / "bpe")
  tokenizer_lib.train_tokenizer(CAPTIONS * 2, tok_dir, vocab_size=60)
  tok = tokenizer_lib.CaptionTokenizer.from_directory(tok_dir, context_length=8)
  rng = np.random.default_rng(0)
  codes_dir = str(tmp_path / "codes")
  with codes_lib.CodeDatasetWriter(codes_dir, code_shape=(4, 4, 2), codebook=np.asarray(
      variables["quantizer"]["codebook"]), num_classes=0, cond_length=8, cond_vocab_size=tok.vocab_size,
                                   source={code_captions.FINGERPRINT_KEY: tok.fingerprint}) as w:
    w.write("train", rng.integers(0, 16, (8, 4, 4, 2)), tok.encode(CAPTIONS[:8], train=True))
    w.write("validation", rng.integers(0, 16, (4, 4, 4, 2)), tok.encode(CAPTIONS[8:]))
  # Stage 2: a configs/cc3m.py:tiny run on those codes, with freshly initialised parameters in place of a
  # checkpoint (restoring a run's parameters is the class-conditional path, tested in test_inference_restore.py).
  config = configlib.load_config_file("cc3m", "tiny")
  with config.unlocked():
    config.data.update(codes_dir=codes_dir, stage1_dir=artifact, tokenizer_dir=tok_dir, code_shape=(4, 4, 2),
                       vocab_size=16, embed_dim=8)
    config.model.update(spatial_layers=1, depth_layers=1)  # one layer per stack: smaller programs to compile
  workdir = str(tmp_path / "stage2")
  configlib.save_snapshot(config, workdir)
  model = transformer.from_run_config(config)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), *transformer.init_inputs(model)))["params"]
  monkeypatch.setattr(loader, "restore_params", lambda *a, **k: (params, 7, "params"))

  loaded = loader.Stage2Model(workdir)
  assert loaded.model.is_text
  # --tokenizer_dir naming another tokenizer of the same size is refused before any prompt is tokenized.
  # (Here: the same files with the ids of "dog" and "bus" swapped.)
  vocab_file, merges_file = tok.files
  vocab = json.loads(open(vocab_file).read())
  vocab["dog</w>"], vocab["bus</w>"] = vocab["bus</w>"], vocab["dog</w>"]
  other_dir = tmp_path / "other_bpe"
  other_dir.mkdir()
  (other_dir / os.path.basename(vocab_file)).write_text(json.dumps(vocab))
  (other_dir / os.path.basename(merges_file)).write_text(open(merges_file).read())
  loaded.tokenizer_dir = str(other_dir)
  with pytest.raises(ValueError, match="is not the one .* was encoded with"):
    loaded.tokenizer()
  loaded.tokenizer_dir = None
  # Codes re-encoded in place with another tokenizer agree with it, but the model trained on the ids of the one its
  # run recorded.
  tokenizer_lib.record_trained_tokenizer(workdir, "e" * 64, config.data.codes_dir)
  with pytest.raises(ValueError, match="tokenized with another tokenizer .* than the one the stage-2 model"):
    loaded.tokenizer()
  os.remove(os.path.join(workdir, tokenizer_lib.TRAINED_TOKENIZER_FILE))
  # A stage-1 artifact other than the one that encoded the codes (another codebook) would decode other images.
  other_variables = jax.jit(rqvae.init_variables, static_argnums=0)(model1, jax.random.key(1))
  artifact_lib.save_artifact(str(tmp_path / "other_rqvae"), s1.model, other_variables)
  mismatched = config.copy_and_resolve_references()
  with mismatched.unlocked():
    mismatched.data.stage1_dir = str(tmp_path / "other_rqvae")
  configlib.save_snapshot(mismatched, str(tmp_path / "mismatched"))
  with pytest.raises(ValueError, match="is not the RQ-VAE that encoded"):
    loader.Stage2Model(str(tmp_path / "mismatched"))
  np.testing.assert_array_equal(decoder.null_cond(loaded.model, np.ones((2, 8), np.int32)), np.zeros((2, 8)))
  prompts = ["a red dog", "a green house"]
  revise = logits.PhaseSettings(temperature=0.8, guidance_scale=1.5)
  kwargs = dict(batch_size=4, t_draft=4, t_revise=2, num_revisions=1, draft=logits.PhaseSettings(), revise=revise)
  out = str(tmp_path / "samples")
  paths = runner.sample_prompts(loaded, prompts, out, per_prompt=2, rng=jax.random.key(0), **kwargs)
  with np.load(paths["samples_npz"]) as f:
    assert f["arr_0"].shape == (4, 16, 16, 3) and f["arr_0"].dtype == np.uint8
    assert list(f["prompts"]) == prompts and f["labels"].tolist() == [0, 0, 1, 1]
    np.testing.assert_array_equal(f["cond"], np.repeat(tok.encode(prompts), 2, axis=0))
    assert f["codes"].shape == (4, 4, 4, 2)
  grid = np.asarray(Image.open(paths["samples_png"]))
  assert grid.shape[0] > 2 * (2 + 16 * 8)  # two rows of 8x-enlarged images plus caption lines under each
  assert os.path.isfile(paths["phases_png"])
  # Same seed, same prompts: the same images (deterministic tokenization, keyed sampling).
  again = runner.sample_prompts(loaded, prompts, str(tmp_path / "again"), per_prompt=2, rng=jax.random.key(0),
                                **kwargs)
  with np.load(paths["samples_npz"]) as a, np.load(again["samples_npz"]) as b:
    np.testing.assert_array_equal(a["codes"], b["codes"])
  # Inpainting with a prompt: the stacks outside the region come back unchanged. (A 15-position region gathers as
  # many positions per step as the whole map, so the sampler's compiled program is reused.)
  with np.load(paths["samples_npz"]) as f:
    codes = f["codes"].reshape(4, 16, 2)
  region = np.ones((4, 16), bool)
  region[:, 6] = False
  cond = jax.device_put(np.repeat(tok.encode(["a blue bus", "a black dog"]), 2, axis=0),
                        sharding.batch_sharding(loaded.mesh))
  filled, _ = decoder.inpaint(loaded.model, loaded.params, loaded.codebook, codes, region, cond, jax.random.key(1),
                              t_draft=4, t_revise=2, num_revisions=1, draft=logits.PhaseSettings(), revise=revise,
                              return_history=True)
  np.testing.assert_array_equal(np.asarray(filled)[~region], codes[~region])
  assert (np.asarray(filled)[region] != codes[region]).any()
  with pytest.raises(ValueError, match="class-conditional run"):
    loaded.model = loaded.model.clone(num_classes=3, cond_vocab_size=None, cond_length=1)
    runner.sample_prompts(loaded, prompts, out, per_prompt=1, rng=jax.random.key(0), **kwargs)
