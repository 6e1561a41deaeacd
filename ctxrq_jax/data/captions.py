"""Image/caption pairs for text-to-image encoding, streamed (a 3M-image set never sits in memory).

Three sources:
  webdataset  tar shards as `img2dataset --output_format webdataset` writes them (CC-3M, CC-12M, LAION): members
              `<key>.jpg` (or .jpeg / .png / .webp) and `<key>.txt` (the caption), plus .json / other files that are
              ignored, grouped by key (the member name up to its first dot). Shards are read in sorted glob order,
              each as a stream (`tarfile` mode 'r|*'), one example at a time.
  parquet     shards as `img2dataset --output_format parquet` writes them: one row per sample with the encoded image
              in the binary column `jpg` (null when the download failed), the caption in `txt` and the id in `key`
              (plus metadata columns, ignored). Read in record batches (`pyarrow.parquet.ParquetFile.iter_batches`),
              so a shard never sits in memory whole. (The .parquet beside each webdataset tar holds metadata only.)
  tfds        any tensorflow-datasets data set with an image feature and a text feature, read by random access
              (`tfds.data_source`, ArrayRecord, as ctxrq_jax/data/images.py reads image sets). The text feature
              may be nested ('captions/text' of coco_captions) and may hold several captions per image.

Every example is (key, image, captions): the image as encoded bytes or a uint8 array, and one or more captions.
`image_batches` decodes and preprocesses (resize the shorter side bilinear, centre crop, [-1, 1]) and yields fixed-size
batches. An image that cannot be decoded (truncated, not an image, empty), an example without an image or without
a caption, and a tar shard that ends early are counted in `CaptionStats`, skipped and reported; nothing is dropped
silently and none of them stops the run. The sources drop blank captions; `drop_null_captions` also drops those that
tokenize to nothing (e.g. only a zero-width space), counting an example left without one as without a caption.
"""

from __future__ import annotations

import dataclasses
import io
import posixpath
import tarfile
import zlib
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image
from PIL import ImageOps

from ctxrq_jax.core import host
from ctxrq_jax.core import paths as fs
from ctxrq_jax.data import images as image_data

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSION = "txt"
_MAX_REPORTED = 20


@dataclasses.dataclass
class CaptionStats:
  """What a pass over a caption source saw: examples read, written, and skipped by reason (with examples)."""
  read: int = 0
  decoded: int = 0
  corrupt_images: int = 0
  missing_image: int = 0
  missing_caption: int = 0
  bad_shards: int = 0
  problems: list[str] = dataclasses.field(default_factory=list)

  @property
  def skipped(self) -> int:
    return self.corrupt_images + self.missing_image + self.missing_caption

  def note(self, kind: str, where: str, why: str) -> None:
    setattr(self, kind, getattr(self, kind) + 1)
    if len(self.problems) < _MAX_REPORTED:
      self.problems.append(f"{where}: {why}")

  def summary(self) -> str:
    """One line: counts, then the first problems."""
    line = (f"{self.read:,} examples read, {self.decoded:,} encoded, {self.skipped:,} skipped "
            f"({self.corrupt_images:,} undecodable images, {self.missing_image:,} without an image, "
            f"{self.missing_caption:,} without a caption), {self.bad_shards:,} shards ended early")
    if self.problems:
      line += "; first: " + "; ".join(self.problems[:3])
    return line


@dataclasses.dataclass(frozen=True)
class CaptionExample:
  """key: where the example comes from; image: encoded bytes or uint8 [H, W, C] (None if absent); captions."""
  key: str
  image: bytes | np.ndarray | None
  captions: tuple[str, ...]


def _text(value: Any) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="replace")
  return str(value)


def shard_paths(patterns: str | Sequence[str]) -> list[str]:
  """Tar shards matching comma-separated glob patterns (each sorted); ValueError if a pattern matches nothing."""
  if isinstance(patterns, str):
    patterns = [p for p in patterns.split(",") if p.strip()]
  paths = []
  for pattern in patterns:
    found = fs.glob(pattern.strip())  # local or a bucket
    if not found:
      raise ValueError(f"no webdataset shards match {pattern!r}")
    paths.extend(found)
  return paths


def iter_webdataset(patterns: str | Sequence[str], stats: CaptionStats) -> Iterator[CaptionExample]:
  """Streams the examples of img2dataset webdataset shards (see the module docstring), in shard order."""
  for path in shard_paths(patterns):
    current: dict[str, Any] = {}
    key = None
    try:
      with fs.path(path).open("rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
          if not member.isfile():
            continue
          base = posixpath.basename(member.name)  # member names are '/'-separated
          if "." not in base:
            continue
          stem, ext = base.split(".", 1)
          member_key = posixpath.join(posixpath.dirname(member.name), stem)
          if member_key != key:
            if key is not None:
              yield from _webdataset_example(path, key, current, stats)
            key, current = member_key, {}
          ext = ext.lower()
          if ext in IMAGE_EXTENSIONS or ext == CAPTION_EXTENSION:
            current[ext] = tar.extractfile(member).read()
        complete = _ends_with_end_of_archive(tar)
      if key is not None:
        yield from _webdataset_example(path, key, current, stats)
      if not complete:
        stats.note("bad_shards", path, "shard ends early (cut at or inside a member header: no end-of-archive "
                   "blocks; the examples after the cut are missing)")
    except (tarfile.TarError, EOFError, OSError) as e:
      stats.note("bad_shards", path, f"shard ends early or is not a tar file ({type(e).__name__}: {e})")


def _ends_with_end_of_archive(tar: tarfile.TarFile) -> bool:
  """Whether a streamed tar, read to its end, ended at its end-of-archive marker (two zero blocks) rather than at a
  cut. `tarfile` stops without an error when a file is cut at or inside a member header: then the header read at
  `tar.offset` came back short, or no zero block follows it."""
  block = tarfile.BLOCKSIZE
  if tar.fileobj.tell() - tar.offset != block:  # the last header read was short: the file ends there
    return False
  return tar.fileobj.read(block) == tarfile.NUL * block  # the second zero block (a full, non-zero one: garbage)


def _webdataset_example(path: str, key: str, parts: dict[str, Any],
                        stats: CaptionStats) -> Iterator[CaptionExample]:
  stats.read += 1
  where = f"{fs.path(path).name}:{key}"
  image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
  caption = _text(parts[CAPTION_EXTENSION]).strip() if CAPTION_EXTENSION in parts else ""
  if image is None:
    stats.note("missing_image", where, "no image member")
  elif not caption:
    stats.note("missing_caption", where, "no caption (.txt missing or empty)")
  else:
    yield CaptionExample(where, image, (caption,))


def iter_parquet(patterns: str | Sequence[str], stats: CaptionStats, *, image_column: str = "jpg",
                 text_column: str = "txt", key_column: str = "key", batch_rows: int = 256) -> Iterator[CaptionExample]:
  """Streams the examples of img2dataset parquet shards (see the module docstring), in shard and row order."""
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top  (tensorflow-datasets depends on pyarrow)

  for path in shard_paths(patterns):
    try:
      shard = pq.ParquetFile(path if fs.is_local(path) else fs.path(path).open("rb"))  # a bucket's: a seekable gfile
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid / OSError on a damaged file
      stats.note("bad_shards", path, f"not a readable parquet file ({type(e).__name__}: {e})")
      continue
    names = set(shard.schema_arrow.names)
    missing = [c for c in (image_column, text_column) if c not in names]
    if missing:
      raise ValueError(f"{path} has no column {missing[0]!r} (columns: {sorted(names)}); img2dataset writes images "
                       "into parquet only with --output_format parquet (the .parquet beside a webdataset tar is "
                       "metadata)")
    columns = [image_column, text_column] + ([key_column] if key_column in names else [])
    row = 0
    try:
      for batch in shard.iter_batches(batch_size=batch_rows, columns=columns):
        data = batch.to_pydict()
        keys = data.get(key_column) or [str(row + i) for i in range(batch.num_rows)]
        for key, image, text in zip(keys, data[image_column], data[text_column]):
          stats.read += 1
          where = f"{fs.path(path).name}:{key}"
          caption = _text(text).strip() if text is not None else ""
          if not image:
            stats.note("missing_image", where, "no image (a failed download)")
          elif not caption:
            stats.note("missing_caption", where, "no caption")
          else:
            yield CaptionExample(where, bytes(image), (caption,))
        row += batch.num_rows
    except OSError as e:  # a shard cut short
      stats.note("bad_shards", path, f"shard ends early ({type(e).__name__}: {e})")


def _lookup(record: Any, path: str) -> Any:
  value = record
  for part in path.split("/"):
    value = value[part]
  return value


def host_shard_paths(patterns: str | Sequence[str], process_index: int, process_count: int) -> list[str]:
  """This process's share of the shard files `patterns` match: files p, p + P, ... of the sorted list (each process
  of a multi-host `encode captions` reads its own files). ValueError when there are fewer files than processes."""
  files = shard_paths(patterns)
  if len(files) < process_count:
    raise ValueError(f"{len(files)} shard file(s) match {patterns!r}, fewer than the job's {process_count} processes: "
                     "each process encodes whole files; split the data into more shards or use fewer processes")
  return files[process_index::process_count]


def iter_tfds(name: str, split: str, stats: CaptionStats, *, image_key: str = "image",
              text_key: str = "captions/text", data_dir: str | None = None,
              process_index: int = 0, process_count: int = 1) -> Iterator[CaptionExample]:
  """Streams (image, captions) of a tfds data set prepared as ArrayRecord, in index order.

  Args:
    name: tfds name ('coco_captions', ...).
    split: tfds split string.
    stats: counts of what was read and skipped.
    image_key: the image feature.
    text_key: the text feature, '/' for nested features; a sequence of texts gives several captions per image.
    data_dir: tfds data directory.
    process_index, process_count: read only this process's contiguous share of the split (`core.host.host_range`).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (heavy; only tfds sources need it)
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                              builder_kwargs={"file_format": "array_record"})
  except Exception as e:  # tfds raises many types: add context
    raise ValueError(f"cannot open tfds data set {name!r} split {split!r} as ArrayRecord (data_dir={data_dir!r}): "
                     f"{e}") from e
  for index in range(*host.host_range(len(source), process_index, process_count)):
    stats.read += 1
    where = f"{name}[{split}] example {index}"
    try:
      record = source[index]
    except Exception as e:  # noqa: BLE001 - a record whose image does not decode: count, skip, report
      stats.note("corrupt_images", where, f"cannot decode ({type(e).__name__}: {e})")
      continue
    try:
      image = _lookup(record, image_key)
    except (KeyError, TypeError) as e:
      raise ValueError(f"{where}: no image feature {image_key!r}") from e
    try:
      text = _lookup(record, text_key)
    except (KeyError, TypeError) as e:
      raise ValueError(f"{where}: no text feature {text_key!r}") from e
    texts = [text] if isinstance(text, (str, bytes)) or np.ndim(text) == 0 else list(np.asarray(text).ravel())
    captions = tuple(c for c in (_text(t).strip() for t in texts) if c)
    if not captions:
      stats.note("missing_caption", where, "no non-empty caption")
      continue
    yield CaptionExample(where, image, captions)


def drop_null_captions(examples: Iterable[CaptionExample], stats: CaptionStats,
                       is_null: Callable[[Sequence[str]], np.ndarray]) -> Iterator[CaptionExample]:
  """Drops the captions `is_null` marks (bool [C] for an example's C captions; `CaptionTokenizer.is_null`: the
  tokens are all [PAD], as for a caption of only control or zero-width characters, which `str.strip` keeps and the
  tokenizer deletes). Their condition would be the null one, a dropped condition of classifier-free guidance, under a
  real image. Like the sources' blank captions, an example left with none is counted in `stats.missing_caption` and
  skipped; one with other captions keeps those.
  """
  for ex in examples:
    null = np.asarray(is_null(list(ex.captions)), bool)
    if null.all():
      stats.note("missing_caption", ex.key, f"caption {ex.captions[0]!r} has no tokens (e.g. only control or "
                 "zero-width characters): it would be the null condition")
      continue
    if null.any():
      ex = dataclasses.replace(ex, captions=tuple(c for c, n in zip(ex.captions, null) if not n))
    yield ex


def decode_image(image: bytes | np.ndarray, *, mode: str = "RGB", orient: bool = False) -> np.ndarray:
  """Encoded bytes or an array -> uint8 [H, W, 3]; ValueError when it cannot be decoded.

  For encoded bytes, `mode` 'RGBA' gives [H, W, 4] (alpha 255 where the file has none), and `orient` applies the
  file's EXIF orientation (a phone photo shown upright): user-supplied images for editing. Data sets are decoded
  as stored (as the reference's loaders read them).
  """
  if mode not in ("RGB", "RGBA"):
    raise ValueError(f"mode must be 'RGB' or 'RGBA', got {mode!r}")
  if isinstance(image, (bytes, bytearray)):
    if not image:
      raise ValueError("empty image file")
    try:
      with Image.open(io.BytesIO(image)) as pil:
        pil.load()  # decodes now: a truncated file fails here, not later
        array = np.asarray((ImageOps.exif_transpose(pil) if orient else pil).convert(mode))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
      raise ValueError(f"not a decodable image ({type(e).__name__}: {e})") from e
  else:
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
      array = np.repeat(array, 3, axis=-1)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
      raise ValueError(f"expected a uint8 image [H, W, 3], got {array.dtype} {array.shape}")
  if array.shape[0] < 1 or array.shape[1] < 1:
    raise ValueError(f"empty image of shape {array.shape}")
  return array


def image_batches(examples: Iterable[CaptionExample], stats: CaptionStats, *, image_size: int, channels: int = 3,
                  batch_size: int, resize: str = "crop", views: Sequence[str] | None = None,
                  view_seed: int = 0) -> Iterator[tuple[np.ndarray, list[tuple[str, ...]], list[str]]]:
  """Decodes and preprocesses examples into batches, streaming (`resize` as in data/images.py: 'crop' for photos,
  'pad' for the small square digits, 'squash' for the official text-to-image evaluation's whole-image resize).

  Yields (images float32 [B, S, S, C] in [-1, 1], captions per image, keys); B = batch_size except the last batch.
  With `views` (names of `data.images.VIEWS`, 'center' first) images are [B, V, S, S, C], one per view; the random
  views of an example are drawn from a generator seeded by (`view_seed`, its key), so they do not depend on the
  batch size, the order or the host that reads it.
  Undecodable images are counted in `stats.corrupt_images` and skipped.
  """
  if batch_size < 1 or image_size < 1:
    raise ValueError(f"batch_size and image_size must be positive, got {batch_size}, {image_size}")
  images, captions, keys = [], [], []
  for ex in examples:
    try:
      array = decode_image(ex.image)
    except ValueError as e:
      stats.note("corrupt_images", ex.key, str(e))
      continue
    try:
      if views is None:
        images.append(image_data.preprocess_image(array, image_size=image_size, channels=channels, resize=resize))
      else:
        rng = np.random.default_rng([int(view_seed), zlib.crc32(ex.key.encode("utf-8"))])
        images.append(image_data.preprocess_views(array, views, image_size=image_size, channels=channels,
                                                  resize=resize, rng=rng))
    except ValueError as e:  # e.g. 'pad' with an image larger than image_size
      stats.note("corrupt_images", ex.key, str(e))
      continue
    captions.append(ex.captions)
    keys.append(ex.key)
    stats.decoded += 1
    if len(images) == batch_size:
      yield np.stack(images), captions, keys
      images, captions, keys = [], [], []
  if images:
    yield np.stack(images), captions, keys


__all__ = ["CaptionExample", "CaptionStats", "decode_image", "drop_null_captions", "image_batches", "iter_parquet",
           "iter_tfds", "iter_webdataset", "shard_paths"]
