"""Code extraction (ctxrq_jax/stage1/encode.py) and decoding the stored codes back (models.artifact.CodeDecoder)."""

import jax
import numpy as np
import pytest

from ctxrq_jax.data import code_captions
from ctxrq_jax.data import codes as code_data
from ctxrq_jax.data import images as image_data
from ctxrq_jax.models import artifact as artifact_lib
from ctxrq_jax.models import rqvae
from ctxrq_jax.stage1 import encode
from tests import helpers


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
  """(model, variables, artifact directory) of the tiny stage-1 config's RQ-VAE with random weights, saved once for
  the tests of this module (they only read it)."""
  config = helpers.tiny_stage1_config()
  model = rqvae.RQVAE.from_config(config.model)
  variables = jax.jit(rqvae.init_variables, static_argnums=0)(model, jax.random.key(3))
  artifact = str(tmp_path_factory.mktemp("encode") / "artifact")
  artifact_lib.save_artifact(artifact, config.model, variables)
  return model, variables, artifact


def test_encode_then_decode_round_trip(tiny_artifact, tmp_path):
  config = helpers.tiny_stage1_config()
  model, variables, artifact = tiny_artifact
  meta = encode.encode_dataset(artifact, config.data, str(tmp_path / "codes"), ["test"], batch_size=32,
                               max_examples=40)
  assert meta.code_shape == (4, 4, 2) and meta.num_examples("test") == 40
  codes, labels = code_data.load_codes(str(tmp_path / "codes"), "test")
  np.testing.assert_array_equal(code_data.load_codebook(str(tmp_path / "codes")),
                                np.asarray(variables["quantizer"]["codebook"]))
  # The stored codes are exactly what the model computes on the same (eval-preprocessed) images.
  batch = next(iter(image_data.make_image_iterator(config.data, split="test", batch_size=40, seed=0, train=False)))
  np.testing.assert_array_equal(codes, np.asarray(jax.jit(model.apply)(variables, batch["image"])["codes"]))
  np.testing.assert_array_equal(labels, batch["label"])
  images = artifact_lib.CodeDecoder(artifact, batch_size=4).images(codes[:5])
  decode = jax.jit(lambda v, c: model.apply(v, c, method=rqvae.RQVAE.decode_codes))
  direct = np.clip(np.asarray(decode(variables, codes[:5])), -1, 1)
  np.testing.assert_allclose(images, direct, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="codes must lie in"):
    artifact_lib.CodeDecoder(artifact).images(np.full((1, 4, 4, 2), 99))


def test_mismatched_data_config_is_a_clear_error(tiny_artifact, tmp_path):
  config = helpers.tiny_stage1_config()
  _, _, artifact = tiny_artifact
  with config.unlocked():
    config.data.image_size = 32
  with pytest.raises(ValueError, match=r"gives 32x32x1 images but the RQ-VAE at .* expects 16x16x1"):
    encode.encode_dataset(artifact, config.data, str(tmp_path / "codes"), ["test"], max_examples=4)
  assert not (tmp_path / "codes").exists()


def test_host_ranges_split_a_pass_in_order():
  from ctxrq_jax.core import host  # pylint: disable=g-import-not-at-top
  for total in (0, 1, 5, 37):
    for count in (1, 2, 3, 8):
      ranges = [host.host_range(total, p, count) for p in range(count)]
      assert ranges[0][0] == 0 and ranges[-1][1] == total
      assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, in process order
      assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1
  assert host.host_range(37, 0, 2) == (0, 19) and host.host_range(37, 1, 2) == (19, 37)
  with pytest.raises(ValueError, match=r"process_index 2 is outside \[0, 2\)"):
    host.host_range(10, 2, 2)


@pytest.mark.slow  # ~20 s on a loaded 2-core CPU: compiles of the tiny RQ-VAE
def test_encode_captions_writes_token_conditions(tiny_artifact, tmp_path):
  from ctxrq_jax.data import captions as captions_lib  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from tests.unit.data import test_captions  # pylint: disable=g-import-not-at-top

  model, variables, artifact = tiny_artifact
  texts = [f"a {c} {t} in the park" for c in ("red", "blue", "green") for t in ("dog", "cat", "bus")]
  pairs = [(f"{i:09d}", t) for i, t in enumerate(texts)]
  (tmp_path / "train").mkdir()
  (tmp_path / "val").mkdir()
  # A caption of only a zero-width space passes `strip` but has no tokens: counted and skipped as missing.
  test_captions.write_shard(tmp_path / "train" / "00000.tar", test_captions.webdataset_members(
      pairs[:6] + [("000000009", "\u200b")], corrupt={"000000002"}))
  test_captions.write_shard(tmp_path / "val" / "00000.tar", test_captions.webdataset_members(pairs[6:]))
  tokenizer_lib.train_tokenizer(texts * 3, str(tmp_path / "bpe"), vocab_size=60)
  tok = tokenizer_lib.CaptionTokenizer.from_directory(str(tmp_path / "bpe"), context_length=6)
  sources = {split: (lambda stats, d=d: captions_lib.iter_webdataset(str(tmp_path / d / "*.tar"), stats))
             for split, d in (("train", "train"), ("validation", "val"))}
  out = str(tmp_path / "codes")
  meta, stats = encode.encode_captions(artifact, sources, out, tok, batch_size=4)
  assert stats["train"].corrupt_images == 1 and stats["train"].decoded == 5 and stats["validation"].decoded == 3
  assert stats["train"].read == 7 and stats["train"].missing_caption == 1 and stats["train"].skipped == 2
  assert meta.is_text and meta.cond_length == 6 and meta.cond_range == tok.vocab_size
  assert meta.num_examples("train") == 5 and meta.num_examples("validation") == 3
  codes, tokens = code_data.load_codes(out, "validation")
  assert tokens.shape == (3, 6)
  np.testing.assert_array_equal(tokens, tok.encode(texts[6:]))  # validation: deterministic ids
  assert code_captions.read_captions(out, "validation") == texts[6:]
  # The metadata names the tokenizer by its fingerprint; sampling checks the tokenizer it is given against it.
  assert meta.source[code_captions.FINGERPRINT_KEY] == tok.fingerprint
  assert code_captions.check_tokenizer(out, tok) == "fingerprint"
  train_texts = [texts[i] for i in (0, 1, 3, 4, 5)]
  assert code_captions.read_captions(out, "train") == train_texts
  _, train_tokens = code_data.load_codes(out, "train")
  assert tok.decode(train_tokens) == [t[:len(d)] for t, d in zip(train_texts, tok.decode(train_tokens))]
  # BPE dropout per epoch: each training record holds CAPTION_VARIANTS independent draws of the caption's dropout
  # tokenization (every one a tokenization of that caption); validation records hold the one deterministic one.
  assert meta.num_cond_variants("train") == encode.CAPTION_VARIANTS == 8 and meta.num_cond_variants("validation") == 1
  source = code_data.CodeSource(out, "train")
  drawn = np.stack([code_data.decode_record_variants(source[i], i, meta, cond_variants=8)[1] for i in range(5)])
  np.testing.assert_array_equal(drawn[:, 0], train_tokens)
  for text, draws in zip(train_texts, drawn):
    decoded = tok.decode(draws)
    assert all(text.startswith(d) for d in decoded), decoded
  # Dropout makes the draws of a caption differ (a 0.1 chance per merge; all 8 draws of all 5 captions alike is
  # vanishingly unlikely), while a tokenizer without dropout stores one tokenization.
  assert any(len({d.tobytes() for d in draws}) > 1 for draws in drawn)
  no_dropout = tokenizer_lib.CaptionTokenizer.from_directory(str(tmp_path / "bpe"), context_length=6, bpe_dropout=0.0)
  meta0, _ = encode.encode_captions(artifact, {"train": sources["train"]}, str(tmp_path / "codes0"), no_dropout,
                                    batch_size=4)
  assert meta0.num_cond_variants("train") == 1
  np.testing.assert_array_equal(code_data.load_codes(str(tmp_path / "codes0"), "train")[1],
                                no_dropout.encode(train_texts))
  # The stored codes are the model's codes of the preprocessed images (greyscale model: luma of the RGB JPEGs).
  val_stats = captions_lib.CaptionStats()
  images, _, _ = next(captions_lib.image_batches(
      captions_lib.iter_webdataset(str(tmp_path / "val" / "*.tar"), val_stats), val_stats, image_size=16,
      channels=1, batch_size=8))
  np.testing.assert_array_equal(codes, np.asarray(jax.jit(model.apply)(variables, images)["codes"]))
  batch = next(iter(code_data.make_code_iterator(out, split="validation", batch_size=3, seed=0, train=False)))
  assert sorted(batch) == ["codes", "cond"] and batch["cond"].shape == (3, 6)


def test_an_interrupted_caption_reencode_leaves_the_old_set_with_its_own_captions(tiny_artifact, tmp_path):
  # `encode captions --overwrite` published each split's captions-<split>.txt as it finished, so a replacement
  # interrupted in a later split left the old data set (still committed) beside the new run's captions.
  from ctxrq_jax.data import captions as captions_lib  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from tests.unit.data import test_captions  # pylint: disable=g-import-not-at-top
  _, _, artifact = tiny_artifact
  texts = ["old one", "old two", "old val", "new a", "new b", "new c"]
  for name, pairs in (("old", texts[:2]), ("val", texts[2:3]), ("new", texts[3:])):
    (tmp_path / name).mkdir()
    test_captions.write_shard(tmp_path / name / "00000.tar", test_captions.webdataset_members(
        [(f"{i:09d}", t) for i, t in enumerate(pairs)]))
  tokenizer_lib.train_tokenizer(texts * 3, str(tmp_path / "bpe"), vocab_size=40)
  tok = tokenizer_lib.CaptionTokenizer.from_directory(str(tmp_path / "bpe"), context_length=4, bpe_dropout=0.0)
  read = lambda d: (lambda stats: captions_lib.iter_webdataset(str(tmp_path / d / "*.tar"), stats))  # noqa: E731

  def failing(stats):
    yield from read("val")(stats)
    raise RuntimeError("preempted")

  out = str(tmp_path / "codes")
  encode.encode_captions(artifact, {"train": read("old"), "validation": read("val")}, out, tok, batch_size=2)
  before = sorted(p.name for p in (tmp_path / "codes").iterdir())
  with pytest.raises(RuntimeError, match="preempted"):
    encode.encode_captions(artifact, {"train": read("new"), "validation": failing}, out, tok, batch_size=2,
                           overwrite=True)
  assert code_captions.read_captions(out, "train") == texts[:2]
  np.testing.assert_array_equal(code_data.load_codes(out, "train")[1], tok.encode(texts[:2]))
  assert sorted(p.name for p in (tmp_path / "codes").iterdir()) == before  # nothing staged is left behind
  encode.encode_captions(artifact, {"train": read("new"), "validation": read("val")}, out, tok, batch_size=2,
                         overwrite=True)
  assert code_captions.read_captions(out, "train") == texts[3:]
  assert not any(p.name.startswith(".") for p in (tmp_path / "codes").iterdir())  # every staged file moved in place
  (tmp_path / "codes" / "captions-train.txt").write_text("new a\n")  # a captions file of another data set
  with pytest.raises(ValueError, match="holds 1 captions; the metadata gives split 'train' 3 records"):
    code_captions.read_captions(out, "train")


def test_encode_captions_stores_views_of_the_official_training_crop(tiny_artifact, tmp_path):
  from ctxrq_jax.data import captions as captions_lib  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from tests.unit.data import test_captions  # pylint: disable=g-import-not-at-top

  _, _, artifact = tiny_artifact
  texts = [f"a {c} dog" for c in ("red", "blue", "green", "black", "white")]
  test_captions.write_shard(tmp_path / "00000.tar",
                            test_captions.webdataset_members([(f"{i:09d}", t) for i, t in enumerate(texts)]))
  tokenizer_lib.train_tokenizer(texts * 3, str(tmp_path / "bpe"), vocab_size=40)
  tok = tokenizer_lib.CaptionTokenizer.from_directory(str(tmp_path / "bpe"), context_length=4, bpe_dropout=0.0)
  source = {"train": lambda stats: captions_lib.iter_webdataset(str(tmp_path / "*.tar"), stats)}
  views = ("center", "dalle", "dalle")
  meta, _ = encode.encode_captions(artifact, source, str(tmp_path / "v"), tok, batch_size=2, views=views,
                                   view_seed=7)
  assert meta.views == views and meta.source["views"] == list(views) and meta.source["view_seed"] == 7
  encode.encode_captions(artifact, source, str(tmp_path / "one"), tok, batch_size=4)
  center, _ = code_data.load_codes(str(tmp_path / "one"), "train")
  np.testing.assert_array_equal(code_data.load_codes(str(tmp_path / "v"), "train")[0], center)  # view 0
  # The random views depend on the seed and each example's key only, not on the batch size, nor on how the centre
  # view is made: 'squash', the official CC-3M evaluation's transform, for the splits not trained on (the training
  # split keeps 'crop': the official training never squashes), recorded in the metadata.
  both = {"train": source["train"], "validation": source["train"]}
  again, _ = encode.encode_captions(artifact, both, str(tmp_path / "again"), tok, batch_size=3, views=views,
                                    view_seed=7, resize="squash")
  assert again.source["resize"] == {"train": "crop", "validation": "squash"}
  assert meta.source["resize"] == {"train": "crop"}
  np.testing.assert_array_equal(code_data.load_codes(str(tmp_path / "again"), "train")[0], center)
  squashed = code_data.load_codes(str(tmp_path / "again"), "validation")[0]
  assert not np.array_equal(squashed, center)  # 20 x 12 images: the whole image, not its centre
  for view in (1, 2):
    np.testing.assert_array_equal(code_data.load_codes(str(tmp_path / "again"), "train", view=view)[0],
                                  code_data.load_codes(str(tmp_path / "v"), "train", view=view)[0])
  assert any(not np.array_equal(code_data.load_codes(str(tmp_path / "v"), "train", view=1)[0][i], center[i])
             for i in range(len(texts)))


def test_encode_views_flip_and_crops(tiny_artifact, tmp_path):
  """Stage-2 augmentation: view 0 is the plain encoding, 'flip' the codes of the mirrored image, crops seeded."""
  config = helpers.tiny_stage1_config()  # 28x28 digits resized to 16 then cropped: random crops really move
  model, variables, artifact = tiny_artifact
  views = ("center", "flip", "crop")
  meta = encode.encode_dataset(artifact, config.data, str(tmp_path / "codes"), ["test"], batch_size=8,
                               max_examples=12, views=views, view_seed=1)
  assert meta.views == views and meta.num_examples("test") == 12
  plain = encode.encode_dataset(artifact, config.data, str(tmp_path / "plain"), ["test"], batch_size=8,
                                max_examples=12)
  assert plain.num_views == 1
  center, labels = code_data.load_codes(str(tmp_path / "codes"), "test", view=0)
  np.testing.assert_array_equal(center, code_data.load_codes(str(tmp_path / "plain"), "test")[0])
  batch = next(iter(image_data.make_image_iterator(config.data, split="test", batch_size=12, seed=0, train=False)))
  apply = jax.jit(model.apply)
  flipped = np.asarray(apply(variables, batch["image"][:, :, ::-1])["codes"])
  np.testing.assert_array_equal(code_data.load_codes(str(tmp_path / "codes"), "test", view=1)[0], flipped)
  np.testing.assert_array_equal(labels, batch["label"])
  # Crops: the images the iterator draws for that seed, encoded. (Digits are square: no room to crop after the
  # resize, so these crops are the centre view; `test_preprocess_views_crops_non_square_images` covers real crops.)
  crops = next(iter(image_data.make_image_iterator(config.data, split="test", batch_size=12, seed=1, train=False,
                                                   views=views)))["image"]
  np.testing.assert_array_equal(crops[:, 0], batch["image"])
  np.testing.assert_array_equal(crops[:, 1], batch["image"][:, :, ::-1])
  np.testing.assert_array_equal(code_data.load_codes(str(tmp_path / "codes"), "test", view=2)[0],
                                np.asarray(apply(variables, crops[:, 2])["codes"]))
  with pytest.raises(ValueError, match="views must start with 'center'"):
    image_data.make_image_iterator(config.data, split="test", batch_size=4, seed=0, train=False, views=("rotate",))
  with pytest.raises(ValueError, match="views are for encoding"):
    image_data.make_image_iterator(config.data, split="test", batch_size=4, seed=0, train=True, views=("center",))

