"""Caption sources (ctxrq_jax/data/captions.py): img2dataset webdataset tars the test writes and a mocked tfds set
with an image and a text feature; undecodable images and incomplete examples are counted, skipped and reported."""

import io
import json
import tarfile
import types

import numpy as np
import pytest
from PIL import Image

from ctxrq_jax.data import captions


def _jpeg(seed, size=(20, 12), fmt="JPEG"):
  rng = np.random.default_rng(seed)
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format=fmt)
  return buf.getvalue()


def write_shard(path, members):
  """A tar with `members` [(name, bytes)] in order, as img2dataset writes them."""
  with tarfile.open(path, "w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def webdataset_members(captions_by_key, *, corrupt=(), truncated=(), no_caption=(), no_image=(), png=()):
  members = []
  for i, (key, caption) in enumerate(captions_by_key):
    if key not in no_image:
      image = _jpeg(i, fmt="PNG" if key in png else "JPEG")
      if key in corrupt:
        image = b"this is not an image"
      elif key in truncated:
        image = image[:len(image) // 2]
      members.append((f"{key}.{'png' if key in png else 'jpg'}", image))
    if key not in no_caption:
      members.append((f"{key}.txt", caption.encode()))
    members.append((f"{key}.json", json.dumps({"key": key, "caption": caption}).encode()))
  return members


def test_webdataset_shards_stream_examples_and_report_what_they_skip(tmp_path):
  pairs = [(f"{i:09d}", f"caption number {i}") for i in range(8)]
  write_shard(tmp_path / "00000.tar", webdataset_members(
      pairs[:5], corrupt={"000000001"}, truncated={"000000002"}, no_caption={"000000003"}, png={"000000004"}))
  write_shard(tmp_path / "00001.tar", webdataset_members(pairs[5:], no_image={"000000006"}))
  # A third shard that ends in the middle of a member (a download cut short).
  write_shard(tmp_path / "00002.tar", webdataset_members([("000000008", "the last one")]))
  raw = (tmp_path / "00002.tar").read_bytes()
  (tmp_path / "00002.tar").write_bytes(raw[:700])

  stats = captions.CaptionStats()
  examples = captions.iter_webdataset(str(tmp_path / "*.tar"), stats)
  assert isinstance(examples, types.GeneratorType) and stats.read == 0  # lazy: nothing read yet
  batches = list(captions.image_batches(examples, stats, image_size=8, channels=3, batch_size=2))
  keys = [k for _, _, ks in batches for k in ks]
  assert keys == ["00000.tar:000000000", "00000.tar:000000004", "00001.tar:000000005", "00001.tar:000000007"]
  assert [c for _, cs, _ in batches for c in cs] == [("caption number 0",), ("caption number 4",),
                                                    ("caption number 5",), ("caption number 7",)]
  images = np.concatenate([b for b, _, _ in batches])
  assert images.shape == (4, 8, 8, 3) and images.dtype == np.float32
  assert images.min() >= -1 and images.max() <= 1 and images.std() > 0.1
  assert (stats.read, stats.decoded, stats.corrupt_images, stats.missing_caption, stats.missing_image,
          stats.bad_shards) == (8, 4, 2, 1, 1, 1)
  summary = stats.summary()
  assert "8 examples read, 4 encoded, 4 skipped (2 undecodable images" in summary and "1 shards ended early" in summary
  assert any("000000001" in p and "not a decodable image" in p for p in stats.problems)
  assert any("000000002" in p for p in stats.problems)
  assert any("00002.tar" in p and "ends early" in p for p in stats.problems)


def test_a_shard_cut_at_or_inside_a_member_header_is_reported(tmp_path):
  """tarfile ends a stream cut at a header without an error; the missing end-of-archive blocks give it away."""
  pairs = [(f"{i:09d}", f"caption number {i}") for i in range(3)]
  write_shard(tmp_path / "whole.tar", webdataset_members(pairs))
  raw = (tmp_path / "whole.tar").read_bytes()
  with tarfile.open(tmp_path / "whole.tar") as tar:
    headers = {m.name: m.offset for m in tar.getmembers()}
  cuts = {"at_a_header": headers["000000001.jpg"], "inside_a_header": headers["000000001.txt"] + 100,
          "inside_the_end_blocks": len(raw.rstrip(b"\0")) + 512, "whole": len(raw)}
  for name, cut in cuts.items():
    (tmp_path / f"{name}.tar").write_bytes(raw[:cut])
  for name, want_read, want_bad in [("at_a_header", 1, 1), ("inside_a_header", 2, 1),
                                    ("inside_the_end_blocks", 3, 1), ("whole", 3, 0)]:
    stats = captions.CaptionStats()
    examples = list(captions.iter_webdataset(str(tmp_path / f"{name}.tar"), stats))
    assert (stats.read, stats.bad_shards) == (want_read, want_bad), name
    assert [e.captions for e in examples if e.image is not None and e.captions][:1] == [("caption number 0",)], name
    if want_bad:
      assert any(f"{name}.tar" in p and "ends early" in p for p in stats.problems), (name, stats.problems)


def test_shard_patterns_and_bad_images_are_named(tmp_path):
  with pytest.raises(ValueError, match="no webdataset shards match"):
    captions.shard_paths(str(tmp_path / "*.tar"))
  with pytest.raises(ValueError, match="empty image"):
    captions.decode_image(b"")
  with pytest.raises(ValueError, match="expected a uint8 image"):
    captions.decode_image(np.zeros((4, 4, 3), np.float32))
  np.testing.assert_array_equal(captions.decode_image(np.full((2, 3, 1), 7, np.uint8)), np.full((2, 3, 3), 7))


def test_tfds_source_under_mock_data(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class TinyCaptionsForTests(tfds.core.GeneratorBasedBuilder):  # registered under its snake-case name
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)), "caption": tfds.features.Text(),
          "captions": tfds.features.Sequence({"text": tfds.features.Text()})}))

    def _split_generators(self, dl_manager):
      raise AssertionError("mock_data never prepares")

    def _generate_examples(self):
      raise AssertionError("mock_data never prepares")

  del TinyCaptionsForTests
  with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE, data_dir=str(tmp_path)):
    stats = captions.CaptionStats()
    flat = list(captions.iter_tfds("tiny_captions_for_tests", "validation", stats, text_key="caption",
                                   data_dir=str(tmp_path)))
    nested_stats = captions.CaptionStats()
    nested = list(captions.iter_tfds("tiny_captions_for_tests", "validation", nested_stats,
                                     text_key="captions/text", data_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="no text feature 'caption/txt'"):
      next(captions.iter_tfds("tiny_captions_for_tests", "validation", captions.CaptionStats(),
                              text_key="caption/txt", data_dir=str(tmp_path)))
  assert stats.read == 5 and len(flat) + stats.skipped == 5 and len(flat) >= 4
  for ex in flat:
    assert len(ex.captions) == 1 and isinstance(ex.captions[0], str) and ex.captions[0].strip()
    assert ex.image.dtype == np.uint8 and ex.image.ndim == 3
  assert all(len(ex.captions) >= 1 for ex in nested) and sum(len(ex.captions) for ex in nested) > len(nested)
  batches = list(captions.image_batches(iter(nested), nested_stats, image_size=16, channels=1, batch_size=4))
  assert sum(len(b) for b, _, _ in batches) == len(nested) and batches[0][0].shape[1:] == (16, 16, 1)


def test_parquet_shards_stream_rows_and_report_what_they_skip(tmp_path):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  rows = {"key": [f"{i:09d}" for i in range(6)],
          "jpg": [_jpeg(0), None, b"not an image", _jpeg(3), _jpeg(4), _jpeg(5)],
          "txt": ["a cat", "a failed download", "a corrupt one", "", "a dog", "a bird"],
          "status": ["success", "failed_to_download", "success", "success", "success", "success"]}
  pq.write_table(pa.table(rows), tmp_path / "00000.parquet", row_group_size=2)
  pq.write_table(pa.table({"key": ["x"], "status": ["success"]}), tmp_path / "meta.parquet")
  stats = captions.CaptionStats()
  batches = list(captions.image_batches(captions.iter_parquet(str(tmp_path / "00000.parquet"), stats, batch_rows=2),
                                        stats, image_size=8, batch_size=4))
  assert [c for _, cs, _ in batches for c in cs] == [("a cat",), ("a dog",), ("a bird",)]
  assert [k for _, _, ks in batches for k in ks] == ["00000.parquet:000000000", "00000.parquet:000000004",
                                                    "00000.parquet:000000005"]
  assert (stats.read, stats.decoded, stats.missing_image, stats.corrupt_images, stats.missing_caption) == (6, 3, 1, 1, 1)
  with pytest.raises(ValueError, match="has no column 'jpg'.*metadata"):
    next(captions.iter_parquet(str(tmp_path / "meta.parquet"), captions.CaptionStats()))


def test_captions_without_tokens_count_as_missing(tmp_path):
  from ctxrq_jax.data import tokenizer  # pylint: disable=g-import-not-at-top

  tokenizer.train_tokenizer([f"caption number {i}" for i in range(10)] * 2, str(tmp_path / "bpe"), vocab_size=40)
  tok = tokenizer.CaptionTokenizer.from_directory(str(tmp_path / "bpe"), context_length=4)
  # A zero-width space, NUL or BOM passes the sources' `strip` check but tokenizes to all [PAD] (the null condition).
  pairs = [(f"{i:09d}", c) for i, c in enumerate(["caption number 0", "\u200b", "\x00\ufeff", "caption number 3"])]
  write_shard(tmp_path / "00000.tar", webdataset_members(pairs))
  stats = captions.CaptionStats()
  examples = captions.drop_null_captions(captions.iter_webdataset(str(tmp_path / "*.tar"), stats), stats, tok.is_null)
  batches = list(captions.image_batches(examples, stats, image_size=8, batch_size=4))
  assert [c for _, cs, _ in batches for c in cs] == [("caption number 0",), ("caption number 3",)]
  assert (stats.read, stats.decoded, stats.missing_caption, stats.skipped) == (4, 2, 2, 2)
  assert any("000000001" in p and "'\\u200b' has no tokens" in p for p in stats.problems), stats.problems
  # An image with several captions keeps those that have tokens.
  several = captions.CaptionExample("k", b"", ("\u200b", "caption number 5", "[PAD]"))
  kept = list(captions.drop_null_captions([several], stats, tok.is_null))
  assert [e.captions for e in kept] == [("caption number 5",)] and stats.missing_caption == 2
