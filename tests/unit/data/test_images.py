"""The grain image pipeline (ctxrq_jax/data/images.py): preprocessing, the embedded digits and mocked tfds sources,
determinism, resume, host shards and errors naming the example."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from ctxrq_jax.core.config import ConfigError
from ctxrq_jax.data import images
from ctxrq_jax.data import mnist
from ctxrq_jax.data import pipeline
from tests import helpers

MNIST_CFG = dict(name="embedded_mnist", image_size=32, channels=1, num_classes=10)


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


def test_crop_is_the_reference_rq_vae_transform():
  """'crop' equals the reference RQ-VAE's eval transform (torchvision Resize(s), CenterCrop(s), ToTensor,
  Normalize(0.5, 0.5)) on landscape, portrait and odd-sized images, down- and upsampled."""
  helpers.import_torchvision()
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import torchvision.transforms as T  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  for shape, size in [((40, 60, 3), 20), ((61, 37, 3), 20), ((33, 47, 3), 32), ((24, 30, 3), 32)]:
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    reference = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    want = reference(Image.fromarray(image)).numpy().transpose(1, 2, 0)
    got = images.preprocess_image(image, image_size=size, channels=3, resize="crop")
    np.testing.assert_allclose(got, want, atol=1e-6, err_msg=str(shape))
    # 'squash': the official text-to-image evaluation's Resize((s, s)), the whole image at any aspect.
    reference = T.Compose([T.Resize((size, size)), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    want = reference(Image.fromarray(image)).numpy().transpose(1, 2, 0)
    got = images.preprocess_image(image, image_size=size, channels=3, resize="squash")
    np.testing.assert_allclose(got, want, atol=1e-6, err_msg=f"squash {shape}")


def test_dalle_view_is_the_official_text_to_image_training_crop():
  """'dalle': kakaobrain's AugmentationDALLE (a square of the shorter side near the centre, resized to t x t) then
  RandomCrop: for given draws equal to torchvision's crop / resize / crop, and the draws span the official ranges."""
  helpers.import_torchvision()
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import torchvision.transforms.functional as F  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  h, w, size = 40, 64, 32
  image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  draws = [images.dalle_draw(h, w, size, rng) for _ in range(400)]
  off_h, off_w, t, top, left = (np.array(v) for v in zip(*draws))
  # s = 40: the square's left edge in [3 * 24 // 8, 5 * 24 // 8) = [9, 15); no slack vertically; t in [32, 36].
  assert set(off_h) == {0} and set(off_w) == set(range(9, 15)) and set(t) == set(range(32, 37))
  assert (top >= 0).all() and (top <= t - size).all() and (left <= t - size).all() and top.max() == 4
  for draw in draws[:6]:
    oh, ow, tt, tp, lf = draw
    want = F.crop(F.resize(F.crop(Image.fromarray(image), oh, ow, 40, 40), [tt, tt]), tp, lf, size, size)
    np.testing.assert_array_equal(images.dalle_view(image, size, draw), np.asarray(want), err_msg=str(draw))
  views = images.preprocess_views(image, ["center", "dalle", "dalle"], image_size=size, channels=3, resize="crop",
                                  rng=np.random.default_rng(0))
  assert views.shape == (3, size, size, 3) and not np.array_equal(views[1], views[2])


def test_readme_cc3m_download_leaves_the_dalle_draws_their_range():
  """The README's img2dataset command stores CC-3M at the shorter side the official download keeps (346, shrunk only
  if larger): at 256 the 'dalle' view's resize t (256-288) and final crop offset would always be 256 and 0."""
  readme = (pathlib.Path(__file__).resolve().parents[3] / "README.md").read_text().replace("\\\n", " ")
  (command,) = [line.split() for line in readme.splitlines() if line.strip().startswith("img2dataset --")]
  flags = dict(zip(command[1::2], command[2::2]))
  assert flags["--resize_mode"] == "keep_ratio" and flags.get("--resize_only_if_bigger") == "True", flags
  s = int(flags["--image_size"])
  rng = np.random.default_rng(0)
  draws = [images.dalle_draw(s, 3 * s // 2, 256, rng) for _ in range(400)]
  assert {d[2] for d in draws} == set(range(256, 289)) and max(d[3] for d in draws) == 32


# ------------------------------------------------------------------------------------------- image pipeline


def test_image_iterator_shapes_and_determinism():
  it = images.make_image_iterator(MNIST_CFG, split="train", batch_size=8, seed=3, train=True)
  batches = helpers.take(it, 3)
  for b in batches:
    assert b["image"].shape == (8, 32, 32, 1) and b["image"].dtype == np.float32
    assert b["label"].shape == (8,) and b["label"].dtype == np.int32
    assert b["image"].min() >= -1.0 and b["image"].max() <= 1.0
    assert np.all(b["image"][:, :2] == -1.0)  # The 2-pixel pad border.
  again = helpers.take(images.make_image_iterator(MNIST_CFG, split="train", batch_size=8, seed=3, train=True), 3)
  assert helpers.same_batches(batches, again)
  other = helpers.take(images.make_image_iterator(MNIST_CFG, split="train", batch_size=8, seed=4, train=True), 3)
  assert not helpers.same_batches(batches, other)


def test_image_iterator_resume_reproduces_batches():
  assert helpers.resumes_exactly(
      lambda: images.make_image_iterator(MNIST_CFG, split="train", batch_size=16, seed=0, train=True), skip=2, check=3)


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


def test_hosts_share_one_shuffled_stream_with_a_draw_per_example():
  # Each host takes its strided slice of one global stream (shuffle, repeat, random draws): the hosts' batches of a
  # step together are that stream's next P * B examples. Shuffling every host's own shard with the same seed gave all
  # hosts the same permutation and the same draws at each position (a global batch of P-tuples of neighbours).
  n, hosts, batch = 64, 4, 4
  transform = lambda x, rng: {"x": np.int64(x), "draw": rng.integers(2**62)}  # noqa: E731

  def stream(shard_index, shard_count, steps):
    it = pipeline.build_iterator(list(range(n)), decode=lambda i, r: r, transform=transform, random_transform=True,
                                 batch_size=batch, seed=7, train=True, shard_index=shard_index,
                                 shard_count=shard_count, num_threads=0)
    return [next(it) for _ in range(steps)]

  steps = 3 * n // (hosts * batch)  # three epochs
  whole = stream(0, 1, steps * hosts)
  xs = np.concatenate([b["x"] for b in whole]).reshape(steps, batch, hosts)  # position p of the stream: host p % P
  draws = np.concatenate([b["draw"] for b in whole]).reshape(steps, batch, hosts)
  for h in range(hosts):
    mine = stream(h, hosts, steps)
    np.testing.assert_array_equal(np.stack([b["x"] for b in mine]), xs[..., h])
    np.testing.assert_array_equal(np.stack([b["draw"] for b in mine]), draws[..., h])
  assert len(np.unique(draws)) == draws.size  # every example of every host its own draw
  for epoch in xs.reshape(3, -1):  # each epoch: every example once, over all hosts together
    np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
  blocks = xs // hosts  # the old pipeline: every host's j-th example from the same block {kP, ..., kP + P - 1}
  assert np.mean(blocks == blocks[..., :1]) < 0.5


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
    assert helpers.resumes_exactly(
        lambda: images.make_image_iterator(mnist_cfg, split="train", batch_size=4, seed=0, train=True), skip=1, check=2)
    # Mock ImageNet images have random, non-square sizes: resize + crop makes them uniform.
    train_batches = helpers.take(images.make_image_iterator(imagenet_cfg, split="train", batch_size=5, seed=1,
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
      helpers.take(it, 6)


def test_preprocess_views_crops_non_square_images():
  image = np.random.default_rng(0).integers(0, 256, (20, 40, 3)).astype(np.uint8)  # 16 x 32 after the resize
  kw = dict(image_size=16, channels=3, resize="crop")
  center = images.preprocess_image(image, **kw)
  views = ("center", "flip", "crop", "crop", "crop_flip")
  a = images.preprocess_views(image, views, rng=np.random.default_rng(1), **kw)
  assert a.shape == (5, 16, 16, 3)
  np.testing.assert_array_equal(a[0], center)
  np.testing.assert_array_equal(a[1], center[:, ::-1])
  np.testing.assert_array_equal(a, images.preprocess_views(image, views, rng=np.random.default_rng(1), **kw))
  rng = np.random.default_rng(1)
  for v, name in enumerate(views[2:], start=2):  # the offsets drawn in order from the same rng
    expected = images.preprocess_image(image, rng=rng, random_crop=True, **kw)
    np.testing.assert_array_equal(a[v], expected[:, ::-1] if name.endswith("flip") else expected)
  crops = {a[2].tobytes(), a[3].tobytes(), np.ascontiguousarray(a[4][:, ::-1]).tobytes()}
  assert len(crops) >= 2 and crops != {center.tobytes()}  # offsets are drawn (17 possible), not fixed
  with pytest.raises(ValueError, match="unknown view 'rotate'"):
    images.preprocess_views(image, ("center", "rotate"), **kw)
  # After 'squash' (the official CC-3M evaluation) the centre view is the whole image and 'crop' has nothing left to
  # crop; 'dalle' is the official training crop of the original image whatever the resize (it used to become the
  # centre view, so `encode captions --resize=squash --views=center,dalle,...` stored copies).
  squash = dict(kw, resize="squash")
  v = images.preprocess_views(image, ("center", "crop", "dalle"), rng=np.random.default_rng(2), **squash)
  np.testing.assert_array_equal(v[0], images.preprocess_image(image, **squash))
  np.testing.assert_array_equal(v[1], v[0])
  np.testing.assert_array_equal(v[2], images.preprocess_views(image, ("dalle",), rng=np.random.default_rng(2), **kw)[0])
  assert not np.array_equal(v[2], v[0])


@pytest.mark.slow  # tfds prepares a (tiny) imagenet2012 from tars: TensorFlow's import and the build take ~20 s
def test_imagenet_builds_from_the_manual_tars(tmp_path):
  """The README's step 1: tfds prepares imagenet2012 from ILSVRC2012_img_{train,val}.tar in `manual_dir` on the first
  read (it needs importlib_resources, which nothing installed but this project's dependency)."""
  pytest.importorskip("tensorflow_datasets")
  import io  # pylint: disable=g-import-not-at-top
  import tarfile  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)

  def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))

  def jpeg(h, w):
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(out, "JPEG")
    return out.getvalue()

  manual = tmp_path / "manual"
  manual.mkdir()
  with tarfile.open(manual / "ILSVRC2012_img_train.tar", "w") as outer:
    for synset in ("n01440764", "n01443537"):  # classes 0 and 1 in the standard sorted-synset order
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as t:
        for i in range(3):
          add(t, f"{synset}_{i}.JPEG", jpeg(40 + 3 * i, 52))
      add(outer, f"{synset}.tar", inner.getvalue())
  with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as t:
    for i in range(1, 5):
      add(t, f"ILSVRC2012_val_{i:08d}.JPEG", jpeg(48, 36 + i))
  cfg = dict(name="imagenet2012", image_size=16, channels=3, num_classes=1000, data_dir=str(tmp_path / "tfds"),
             manual_dir=str(manual))
  assert images.dataset_info(cfg, "train") == (6, 1000)
  assert images.dataset_info(cfg, "validation")[0] == 4
  labels = np.concatenate([b["label"] for b in images.make_image_iterator(cfg, split="train", batch_size=4, seed=0,
                                                                          train=False, drop_remainder=False)])
  assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
