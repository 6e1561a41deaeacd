"""Image batches for stage 1 (RQ-VAE) and encoding: one grain code path for the embedded MNIST set and any
tensorflow-datasets image data set.

Data config fields (a ConfigDict or a mapping):
  name (required): 'embedded_mnist', or a tfds name such as 'imagenet2012' or 'mnist'.
  image_size (required): output height = width.
  channels (required): 1 or 3; grayscale sources are repeated to RGB, RGB sources reduced by ITU-R 601 luma.
  num_classes (required): labels must lie in [0, num_classes); a label outside raises naming the example.
  resize: 'pad' (centre a square image no larger than image_size on a black canvas: MNIST 28 → 32) or 'crop'
    (bilinear-resize the shorter side to image_size, then centre-crop, or random-crop when training: ImageNet) or
    'squash' (the whole image bilinear-resized to image_size x image_size: the official CC-3M evaluation's).
    Default 'pad' for embedded_mnist, 'crop' otherwise.
  random_flip: random horizontal flips when training (default False).
  data_dir, manual_dir: tfds data directory and manual download directory (imagenet2012's tar files).
  download: let tfds download and prepare a missing data set (default: only when manual_dir is set, so that
    imagenet2012 can be prepared from its local tar files; nothing else is fetched unless asked).
  image_key, label_key: feature names in tfds records (default 'image', 'label').
Other fields (train_split, eval_split, ...) are ignored here; callers pass the split explicitly.

Views (for encoding augmented code datasets, `make_image_iterator(..., views=...)`): each example becomes a stack
of V preprocessed images, one per name in VIEWS: 'center' (the eval view), 'flip' (it mirrored), 'crop' (a random
crop, as the training transform draws it; with resize='pad' the same as 'center'), 'crop_flip' (a random crop
mirrored), 'dalle' (the official text-to-image training transform, `dalle_view`, of the original image whatever
`resize` is: a small digit is scaled up to a random 256-288/256 of the size and cropped, not padded).
Random views are drawn from grain's per-example rng, so a given seed gives the same views every time.

tfds sources are read with `tfds.data_source(..., builder_kwargs={'file_format': 'array_record'})`, the
random-access reader grain needs; a data set prepared earlier as TFRecord must be re-prepared as ArrayRecord.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np
from PIL import Image

from ctxrq_jax.core.config import ConfigError
from ctxrq_jax.data import mnist
from ctxrq_jax.data import pipeline

EMBEDDED_MNIST = "embedded_mnist"
RESIZE_MODES = ("pad", "crop", "squash")
VIEWS = ("center", "flip", "crop", "crop_flip", "dalle")
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_MISSING = object()


def _field(cfg: Any, key: str, default: Any = _MISSING) -> Any:
  value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
  if value is _MISSING:
    raise ConfigError(f"data config is missing '{key}'")
  return value


def _positive_int(cfg: Any, key: str) -> int:
  value = _field(cfg, key)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ConfigError(f"data.{key} must be a positive integer, got {value!r}")
  return int(value)


def _options(data_cfg: Any) -> dict[str, Any]:
  """Reads and validates the config fields this module uses."""
  name = _field(data_cfg, "name")
  if not isinstance(name, str) or not name:
    raise ConfigError(f"data.name must be a non-empty string, got {name!r}")
  channels = _positive_int(data_cfg, "channels")
  if channels not in (1, 3):
    raise ConfigError(f"data.channels must be 1 or 3, got {channels}")
  resize = _field(data_cfg, "resize", None) or ("pad" if name == EMBEDDED_MNIST else "crop")
  if resize not in RESIZE_MODES:
    raise ConfigError(f"data.resize must be one of {RESIZE_MODES}, got {resize!r}")
  return dict(
      name=name, image_size=_positive_int(data_cfg, "image_size"), channels=channels,
      num_classes=_positive_int(data_cfg, "num_classes"), resize=resize,
      random_flip=bool(_field(data_cfg, "random_flip", False)),
      data_dir=_field(data_cfg, "data_dir", None) or None, manual_dir=_field(data_cfg, "manual_dir", None) or None,
      download=_field(data_cfg, "download", None),
      image_key=_field(data_cfg, "image_key", "image"), label_key=_field(data_cfg, "label_key", "label"))


class ArraySource(grain.sources.RandomAccessDataSource):
  """Random-access source over in-memory arrays; records are `{'image': [H,W,C] uint8, 'label': int}`."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    if len(images) != len(labels):
      raise ValueError(f"{len(images)} images but {len(labels)} labels")
    self._images, self._labels = images, labels

  def __len__(self) -> int:
    return len(self._images)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self._images[index], "label": self._labels[index]}

  def __repr__(self) -> str:
    return f"ArraySource(images={self._images.shape}, labels={self._labels.shape})"


def _tfds_source(opts: dict[str, Any], split: str) -> Any:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (heavy; only tfds data sets need it)
  download = opts["download"] if opts["download"] is not None else opts["manual_dir"] is not None
  prepare_kwargs = None
  if opts["manual_dir"] is not None:
    prepare_kwargs = {"download_config": tfds.download.DownloadConfig(manual_dir=opts["manual_dir"])}
  try:
    return tfds.data_source(
        opts["name"], split=split, data_dir=opts["data_dir"], download=bool(download),
        builder_kwargs={"file_format": "array_record"}, download_and_prepare_kwargs=prepare_kwargs)
  except Exception as e:  # tfds raises many types (DatasetNotFoundError, AssertionError, ...): add context.
    raise ValueError(f"cannot open tfds data set {opts['name']!r} split {split!r} as ArrayRecord "
                     f"(data_dir={opts['data_dir']!r}, manual_dir={opts['manual_dir']!r}): {e}") from e


def _source(opts: dict[str, Any], split: str) -> Any:
  if opts["name"] == EMBEDDED_MNIST:
    return ArraySource(*mnist.load(split))
  return _tfds_source(opts, split)


def dataset_info(data_cfg: Any, split: str) -> tuple[int, int]:
  """Returns (num_examples in `split`, num_classes from the config) without reading any example."""
  opts = _options(data_cfg)
  if opts["name"] == EMBEDDED_MNIST:
    return mnist.num_examples(split), opts["num_classes"]
  return len(_tfds_source(opts, split)), opts["num_classes"]


def validate_example(record: Any, index: int, *, image_key: str = "image", label_key: str = "label",
                     num_classes: int, image_size: int, resize: str, where: str = "") -> tuple[np.ndarray, int]:
  """Checks one source record; returns (image uint8 [H, W, C], label).

  Raises ValueError naming `index` (the position in the source) and the problem.
  """
  prefix = f"example {index}{where}"
  try:
    image, label = record[image_key], record[label_key]
  except (KeyError, TypeError, IndexError) as e:
    raise ValueError(f"{prefix}: record has no '{image_key}'/'{label_key}' fields: {e!r}") from e
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f"{prefix}: expected an image [H, W, 1 or 3], got shape {image.shape}")
  if image.dtype != np.uint8:
    raise ValueError(f"{prefix}: expected uint8 pixels, got {image.dtype}")
  h, w, _ = image.shape
  if h < 1 or w < 1:
    raise ValueError(f"{prefix}: empty image of shape {image.shape}")
  if resize == "pad" and (h != w or h > image_size):
    raise ValueError(f"{prefix}: resize='pad' needs a square image no larger than {image_size}, got {h}x{w}")
  label = np.asarray(label)
  if label.shape != () or not np.issubdtype(label.dtype, np.integer):
    raise ValueError(f"{prefix}: expected an integer scalar label, got {label.dtype} {label.shape}")
  if not 0 <= int(label) < num_classes:
    raise ValueError(f"{prefix}: label {int(label)} outside [0, num_classes={num_classes})")
  return image, int(label)


def crop_geometry(h: int, w: int, size: int) -> tuple[int, int, int, int]:
  """(resized height, width, top, left) of 'crop' for an h x w image: torchvision's `Resize(size)` (the shorter side
  to `size`, the longer one int(size * long / short)), then `CenterCrop(size)`'s offsets. Shared by the images and
  the editing masks that must follow them."""
  new_long = int(size * max(h, w) / min(h, w))
  new_h, new_w = (size, new_long) if h <= w else (new_long, size)
  return new_h, new_w, int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8 [H, W, C] -> uint8 [height, width, C] by PIL's antialiased bilinear resize (torchvision's resize of a PIL
  image); the image itself when it has that size already."""
  h, w, c = image.shape
  if (h, w) == (height, width):
    return image
  pil = Image.fromarray(image[..., 0] if c == 1 else image)
  return np.asarray(pil.resize((width, height), Image.Resampling.BILINEAR)).reshape(height, width, c)


def preprocess_image(image: np.ndarray, *, image_size: int, channels: int, resize: str,
                     rng: np.random.Generator | None = None, random_crop: bool = False,
                     random_flip: bool = False) -> np.ndarray:
  """Maps a uint8 image [H, W, C] to float32 [image_size, image_size, channels] in [-1, 1].

  'pad' centres the image on a zero (black → -1) canvas; 'crop' resizes the shorter side to image_size and crops a
  square at the centre, or at a uniformly random offset when `random_crop`: the reference RQ-VAE's transform
  (torchvision `Resize(image_size)`: PIL bilinear, antialiased, the longer side int(image_size * long / short);
  then `CenterCrop` / `RandomCrop`), so converted weights see the images they were trained on. 'squash' resizes the
  whole image to image_size x image_size whatever its aspect (torchvision `Resize((s, s))`, PIL bilinear): the
  official text-to-image evaluation's transform (CC-3M validation images; `random_crop` has no room there).
  `random_flip` mirrors the image horizontally with probability 1/2. Both random options draw from `rng`.
  """
  if (random_crop or random_flip) and rng is None:
    raise ValueError("random_crop / random_flip need an rng")
  h, w, c = image.shape
  if resize == "pad":
    if h != w or h > image_size:
      raise ValueError(f"resize='pad' needs a square image no larger than {image_size}, got {h}x{w}")
    top = (image_size - h) // 2
    canvas = np.zeros((image_size, image_size, c), np.uint8)
    canvas[top:top + h, top:top + w] = image
    image = canvas
  elif resize == "crop":
    new_h, new_w, top, left = crop_geometry(h, w, image_size)
    image = _resize(image, new_h, new_w)
    if random_crop:
      top, left = int(rng.integers(0, new_h - image_size + 1)), int(rng.integers(0, new_w - image_size + 1))
    image = image[top:top + image_size, left:left + image_size]
  elif resize == "squash":
    image = _resize(image, image_size, image_size)
  else:
    raise ValueError(f"unknown resize mode {resize!r}; expected one of {RESIZE_MODES}")
  if random_flip and rng.random() < 0.5:
    image = image[:, ::-1]
  x = image.astype(np.float32)
  if c == 1 and channels == 3:
    x = np.repeat(x, 3, axis=-1)
  elif c == 3 and channels == 1:
    x = x @ _LUMA[:, None]
  return x / 127.5 - 1.0


def dalle_draw(h: int, w: int, size: int, rng: np.random.Generator) -> tuple[int, int, int, int, int]:
  """The random numbers of the official text-to-image training transform for an h x w image (kakaobrain's
  `AugmentationDALLE(size)` then `RandomCrop(size)`): (top, left) of a square crop of the shorter side s drawn
  uniformly from [3/8, 5/8) of the slack (its near-centre third), its resized side t uniform in
  [size, max(min(s, round(9/8 size)), size)], and the (top, left) of the final size x size crop of the t x t image."""
  s = min(h, w)

  def offset(extent: int) -> int:
    low = 3 * (extent - s) // 8
    return int(rng.integers(low, max(low + 1, 5 * (extent - s) // 8)))

  off_h, off_w = offset(h), offset(w)
  t_max = max(min(s, round(9 / 8 * size)), size)
  t = int(rng.integers(size, t_max + 1))
  return off_h, off_w, t, int(rng.integers(0, t - size + 1)), int(rng.integers(0, t - size + 1))


def dalle_view(image: np.ndarray, size: int, draw: tuple[int, int, int, int, int]) -> np.ndarray:
  """uint8 [H, W, C] -> uint8 [size, size, C]: the square crop, bilinear resize (PIL, as torchvision's resize of a PIL
  image) and final crop of `draw` (`dalle_draw`)."""
  off_h, off_w, t, top, left = draw
  s = min(image.shape[:2])
  square = _resize(image[off_h:off_h + s, off_w:off_w + s], t, t)
  return square[top:top + size, left:left + size]


def preprocess_views(image: np.ndarray, views: Any, *, image_size: int, channels: int, resize: str,
                     rng: np.random.Generator | None = None) -> np.ndarray:
  """uint8 image [H, W, C] -> float32 [V, image_size, image_size, channels] in [-1, 1], one per name in `views`
  (VIEWS; 'crop' views draw their offsets from `rng` in order, and need it when resize='crop'). A square image has
  no room to crop after resizing: its crops are the centre view, as the training transform's are, and so are they
  after 'pad' or 'squash'. `resize` makes the 'center', 'flip' and 'crop' views; 'dalle' is the official training
  crop of the original image whatever `resize` is (the official CC-3M recipe trains on it and evaluates on squashed
  images)."""
  out = []
  for view in views:
    if view not in VIEWS:
      raise ValueError(f"unknown view {view!r}; expected one of {VIEWS}")
    if view == "dalle":
      if rng is None:
        raise ValueError("the 'dalle' view needs an rng")
      crop = dalle_view(image, image_size, dalle_draw(*image.shape[:2], image_size, rng))
      out.append(preprocess_image(crop, image_size=image_size, channels=channels, resize="crop"))
      continue
    crop = view.startswith("crop") and resize == "crop"
    x = preprocess_image(image, image_size=image_size, channels=channels, resize=resize, rng=rng if crop else None,
                         random_crop=crop)
    out.append(x[:, ::-1] if view.endswith("flip") else x)
  return np.stack(out)


def make_image_iterator(
    data_cfg: Any,
    *,
    split: str,
    batch_size: int,
    seed: int,
    train: bool,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    drop_remainder: bool | None = None,
    worker_count: int = 0,
    num_threads: int = 2,
    views: Any = None,
    example_range: tuple[int, int] | None = None,
) -> grain.DatasetIterator:
  """Iterator of `{'image': float32 [B, S, S, C] in [-1, 1], 'label': int32 [B]}` with get_state()/set_state().

  Args:
    data_cfg: the data config (fields in the module docstring).
    split: 'train'/'test' for embedded_mnist; any tfds split string ('train', 'validation[:1000]', ...) otherwise.
    batch_size: per-host batch size.
    seed: shuffle / augmentation seed.
    train: shuffle, random crops/flips, repeat forever (unless num_epochs), drop the last partial batch.
    shard_index, shard_count: per-host shard, e.g. `jax.process_index(), jax.process_count()`.
    num_epochs: None means forever when training, one pass otherwise.
    drop_remainder: None means `train`.
    worker_count: grain worker processes (0: read in this process).
    num_threads: reader threads in this process.
    views: None, or a sequence of names from VIEWS ('center' first) for eval-order encoding (`train` must be False):
      then 'image' is float32 [B, V, S, S, C], the views of each example in the order given.
    example_range: with `train=False`: only examples [start, stop) of the pass, preprocessed exactly as in the
      whole pass (`pipeline.build_iterator`).
  """
  opts = _options(data_cfg)
  if views is not None:
    views = tuple(views)
    unknown = [v for v in views if v not in VIEWS]
    if not views or views[0] != "center" or unknown:
      raise ValueError(f"views must start with 'center' and name only {VIEWS}, got {list(views)}")
    if train:
      raise ValueError("views are for encoding (train=False); training draws its own random crops and flips")
  pipeline.check_iterator_args(batch_size=batch_size, seed=seed, shard_index=shard_index, shard_count=shard_count,
                               num_epochs=num_epochs, worker_count=worker_count, num_threads=num_threads)
  where = f" of {opts['name']} split {split!r}"

  def decode(index: int, record: Any) -> tuple[np.ndarray, int]:
    return validate_example(record, index, image_key=opts["image_key"], label_key=opts["label_key"],
                            num_classes=opts["num_classes"], image_size=opts["image_size"],
                            resize=opts["resize"], where=where)

  random_crop = train and opts["resize"] == "crop"
  random_flip = train and opts["random_flip"]

  def transform(example: tuple[np.ndarray, int], rng: np.random.Generator | None) -> dict[str, np.ndarray]:
    image, label = example
    x = preprocess_image(image, image_size=opts["image_size"], channels=opts["channels"], resize=opts["resize"],
                         rng=rng, random_crop=random_crop, random_flip=random_flip)
    return {"image": x, "label": np.int32(label)}

  def view_transform(example: tuple[np.ndarray, int], rng: np.random.Generator | None) -> dict[str, np.ndarray]:
    image, label = example
    x = preprocess_views(image, views, image_size=opts["image_size"], channels=opts["channels"],
                         resize=opts["resize"], rng=rng)
    return {"image": x, "label": np.int32(label)}

  random_views = views is not None and any(v.startswith("crop") or v == "dalle" for v in views)
  return pipeline.build_iterator(
      _source(opts, split), decode=decode, transform=transform if views is None else view_transform,
      random_transform=random_views if views is not None else (random_crop or random_flip),
      batch_size=batch_size, seed=seed, train=train, shard_index=shard_index, shard_count=shard_count,
      num_epochs=num_epochs, drop_remainder=drop_remainder, worker_count=worker_count, num_threads=num_threads,
      description=f"{opts['name']} split {split!r}", example_range=example_range)
