"""Code datasets: the RQ-VAE codes of a data set, written once by `encode`, read by stage-2 training and evaluation.

A code dataset is a directory:

  metadata.json   written last, atomically (`core.paths`: temp file + rename locally, one object upload on a
                  bucket): the commit marker, its presence marks a complete data set.
                  {"format": "ctxrq_codes", "version": 1 | 2 | 3, "code_shape": [h, w, D], "codebook_size": K,
                   "embed_dim": n_z, "code_dtype": "int16" | "int32", "num_classes": C, "cond_length": L,
                   "cond_vocab_size": V, "source": ..., "views": [names] (versions 2 and 3), "record_layout": ...,
                   "splits": {split: {"num_examples": M, "shards": [file names],
                                      "cond_variants": T (versions 3 and 4),
                                      "parts": [m_0, ..., m_{P-1}] (version 4 only)}}}
  codebook.npy    float32 [K, n_z], the RQ-VAE codebook the codes index.
  {split}-{s:05d}-of-{n:05d}.array_record
                  n ArrayRecord shards per split. Example i (in write order) is record i // n of shard i % n, so
                  reading is in write order whatever the number of shards.

Replacing a code dataset (`overwrite`) never destroys the old one before the new one is complete, on a local disk
as in a bucket (where nothing can be renamed atomically): the new shards get names the old metadata.json does not
list (`-g{generation}` before `.array_record`, generation the smallest one the old shards do not use), the old data
set stays whole and readable while they are written, and only once they all are does the commit replace
codebook.npy and metadata.json (the old metadata.json removed first, so it never describes the new codebook) and
remove the old shards. An interrupted replacement leaves the old data set as it was. Files that belong beside the
shards (a caption split's `captions-<split>.txt`, `data.code_captions`) are written under a staged name
(`CodeDatasetWriter.side_file`) and renamed into place by the commit, after the old metadata.json is removed and
before the new one is written, so an old data set is never paired with the new one's captions.

Multi-host writing (version 4): in a job of P processes each host writes its own part of every split, examples
[start_p, start_p + m_p) in write order, into its own k shards named
  {split}-part{p:05d}of{P:05d}-{s:05d}-of-{k:05d}.array_record
(round-robin within the part, as above: example j of part p is record j // k of its shard j % k); the split's
"parts" lists m_0..m_{P-1} and its "shards" the P*k files part by part. Each host writes `_part-{p}-of-{P}.json` (its
counts) and waits at a barrier; process 0 checks the parts agree, writes codebook.npy and metadata.json and removes
the part files; a second barrier lets every host return with the data set committed. Reading follows the parts, so
the records come in write order (the concatenation of the parts) whatever P and k were.

Storage: the directory may be local or a bucket (`gs://...`). array_record's writer writes local files only, so each
shard is written to a local temp file and copied into place when the split is closed; its reader opens `gs://` objects
itself (array_record >= 0.8 reads through riegeli's GCS reader), so grain reads the shards straight from the bucket.

Record layout (fixed, little-endian, no padding): the condition, T*L tokens as int32 ([T, L], bytes 0..4TL-1; T = 1
but in caption splits written with several tokenizations, below); then the V*h*w*D codes in C order ([V, h, w, D],
depth fastest) as int16 when K <= 32767, else int32. So a record is 4TL + V*h*w*D*itemsize bytes; any other length
is reported as corrupt.

Views (stage-2 augmentation): a record may hold the codes of V views of one image (`views` in the metadata, e.g.
["center", "flip", "crop"]; see `data.images.VIEWS`). View 0 is always "center", the deterministic eval view: it is
what evaluation, `load_codes` and an un-augmented training run read. A training iterator with `random_view=True`
draws one view per example and epoch. A data set with one view is written as version 1 (no `views` key), so older
readers keep reading it.

Caption variants (BPE dropout per epoch): a caption split may hold T tokenizations of each record's caption
(`cond_variants` of the split; `encode captions` writes T draws of BPE dropout for the training split, one
deterministic tokenization for the others). Variant 0 is what `load_codes` and a training iterator without
`random_caption` read; with `random_caption=True` a training iterator draws one variant per example and epoch, as
`random_view` draws a view. A data set whose splits all have T = 1 is written as version 1 or 2 as before; T > 1 in
any split makes it version 3 (`views` and every split's `cond_variants` present); a data set written by several
processes is version 4 (version 3's keys plus every split's `parts`).

Two kinds of condition share the layout:
  class label   num_classes = C >= 1, L = 1, ids in [0, C) (cond_vocab_size = C). Batches hold 'label' int32 [B].
  caption       num_classes = 0, L tokens of a BPE caption (ctxrq_jax/data/tokenizer.py; [PAD] = 0), ids in
                [0, cond_vocab_size). Batches hold 'cond' int32 [B, L].
Metadata written before captions existed has no cond_length / cond_vocab_size: it reads as L = 1 class labels, the
same bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from ctxrq_jax.core import paths
from ctxrq_jax.data import fingerprints
from ctxrq_jax.data import pipeline

FORMAT = "ctxrq_codes"
VERSION = 1  # one view per record
VIEWS_VERSION = 2  # V >= 1 views per record; `views` in the metadata
VARIANTS_VERSION = 3  # T >= 1 caption tokenizations per record of a split; `cond_variants` in each split
PARTS_VERSION = 4  # written by P > 1 processes: `parts` (examples per process) in each split
PART_FILE = "_part-{index:05d}-of-{count:05d}.json"
_SIDE_FILES_KEY = "side-files"  # in a part file beside its splits (no split name has a '-'): its staged side files
METADATA_FILE = "metadata.json"
CODEBOOK_FILE = "codebook.npy"
RECORD_LAYOUT = ("little-endian int32 condition tokens [T, cond_length] (T = the split's cond_variants, 1 without "
                 "it; a class label is cond_length 1), then "
                 "V*h*w*D codes in C order ([V, h, w, D], depth fastest; V = len(views), 1 without 'views') as "
                 "little-endian code_dtype")
_INT16_MAX_K = 32767
_TOKEN_BYTES = 4
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")


def code_dtype(codebook_size: int) -> np.dtype:
  """The on-disk code dtype: little-endian int16 when K <= 32767, else int32."""
  return np.dtype("<i2") if codebook_size <= _INT16_MAX_K else np.dtype("<i4")


def shard_name(split: str, shard: int, num_shards: int, part: int = 0, num_parts: int = 1,
               generation: int = 0) -> str:
  """Shard `shard` of `num_shards` of `split`, of process `part`'s part when `num_parts` processes write it;
  `generation` > 0 for a data set written over an older one (the module doc's replacement)."""
  owner = f"-part{part:05d}of{num_parts:05d}" if num_parts > 1 else ""
  mark = f"-g{generation}" if generation else ""
  return f"{split}{owner}-{shard:05d}-of-{num_shards:05d}{mark}.array_record"


_GENERATION = re.compile(r"-g(\d+)\.array_record$")


def _listed_shards(meta_path: Any) -> tuple[str, ...]:
  """The shard file names an existing metadata.json lists (none when it cannot be parsed: then nothing of it is
  readable anyway)."""
  try:
    raw = json.loads(meta_path.read_bytes())
    return tuple(name for info in raw["splits"].values() for name in info["shards"]
                 if isinstance(name, str) and name and "/" not in name)
  except (ValueError, KeyError, TypeError, AttributeError):
    return ()


def _locate(sizes: tuple[int, ...], num_shards: int, index: int) -> tuple[int, int]:
  """(shard position in the split's file list, record within it) of example `index` of a split whose parts hold
  `sizes` examples, each part round-robin over `num_shards` files."""
  for part, size in enumerate(sizes):
    if index < size:
      return part * num_shards + index % num_shards, index // num_shards
    index -= size
  raise IndexError(index)


@dataclasses.dataclass(frozen=True)
class CodeMetadata:
  """Parsed `metadata.json`; `splits` maps a split name to (num_examples, shard file names)."""
  code_shape: tuple[int, int, int]
  codebook_size: int
  embed_dim: int
  num_classes: int
  source: Any
  splits: Mapping[str, tuple[int, tuple[str, ...]]]
  cond_length: int = 1
  cond_vocab_size: int | None = None  # None -> num_classes
  views: tuple[str, ...] = ("center",)
  cond_variants: Mapping[str, int] = dataclasses.field(default_factory=dict)  # split -> T; absent: 1
  parts: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)  # split -> m_p per process; absent: 1 part

  @property
  def num_views(self) -> int:
    return len(self.views)

  def num_cond_variants(self, split: str) -> int:
    """T: the caption tokenizations each record of `split` holds (1 for class labels and older data sets)."""
    self._split(split)
    return int(self.cond_variants.get(split, 1))

  @property
  def is_text(self) -> bool:
    """True for caption conditions (num_classes 0), False for class labels."""
    return self.num_classes == 0

  @property
  def cond_range(self) -> int:
    """Condition ids lie in [0, cond_range): num_classes for labels, cond_vocab_size for captions."""
    return self.num_classes if self.cond_vocab_size is None else self.cond_vocab_size

  @property
  def code_dtype(self) -> np.dtype:
    return code_dtype(self.codebook_size)

  @property
  def record_bytes(self) -> int:
    """Bytes of a record with one condition (T = 1); `split_record_bytes` for a split's."""
    return self.split_record_bytes(None)

  def split_record_bytes(self, split: str | None) -> int:
    variants = 1 if split is None else self.num_cond_variants(split)
    return (_TOKEN_BYTES * self.cond_length * variants
            + self.num_views * int(np.prod(self.code_shape)) * self.code_dtype.itemsize)

  def num_examples(self, split: str) -> int:
    return self._split(split)[0]

  def part_sizes(self, split: str) -> tuple[int, ...]:
    """Examples of `split` written by each process, in write order (one part unless several processes wrote it)."""
    return tuple(self.parts.get(split, (self._split(split)[0],)))

  def shard_files(self, split: str) -> tuple[str, ...]:
    return self._split(split)[1]

  def _split(self, split: str) -> tuple[int, tuple[str, ...]]:
    if split not in self.splits:
      raise ValueError(f"code dataset has no split {split!r}; it has {sorted(self.splits)}")
    return self.splits[split]

  def to_json(self) -> dict[str, Any]:
    parts = any(len(sizes) > 1 for sizes in self.parts.values())
    variants = parts or any(t > 1 for t in self.cond_variants.values())
    if parts:
      version = PARTS_VERSION
    else:
      version = VARIANTS_VERSION if variants else (VERSION if self.num_views == 1 else VIEWS_VERSION)
    out = {
        "format": FORMAT,
        "version": version,
        "code_shape": list(self.code_shape),
        "codebook_size": self.codebook_size, "embed_dim": self.embed_dim, "code_dtype": self.code_dtype.name,
        "num_classes": self.num_classes, "cond_length": self.cond_length, "cond_vocab_size": self.cond_range,
        "source": self.source, "record_layout": RECORD_LAYOUT,
        "splits": {k: {"num_examples": n, "shards": list(files)} for k, (n, files) in sorted(self.splits.items())},
    }
    if self.num_views > 1 or variants:
      out["views"] = list(self.views)
    if variants:
      for split, info in out["splits"].items():
        info["cond_variants"] = self.num_cond_variants(split)
    if parts:
      for split, info in out["splits"].items():
        info["parts"] = list(self.part_sizes(split))
    return out


def check_views(views: Any) -> tuple[str, ...]:
  """A non-empty sequence of view names starting with 'center'; ValueError otherwise."""
  views = tuple(views) if isinstance(views, (list, tuple)) else ()
  if not views or views[0] != "center" or not all(isinstance(v, str) and v for v in views):
    raise ValueError(f"views must be a list of names starting with 'center' (the eval view), got {views!r}")
  return views


def _check_code_shape(code_shape: Any) -> tuple[int, int, int]:
  shape = tuple(code_shape) if isinstance(code_shape, (list, tuple)) else ()
  if len(shape) != 3 or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0
                                for d in shape):
    raise ValueError(f"code_shape must be three positive integers [h, w, D], got {code_shape!r}")
  return tuple(int(d) for d in shape)


class CodeDatasetWriter:
  """Writes a code dataset; `.write()` batches in order, then `.close()` (or leave a `with` block).

  Leaving a `with` block through an exception closes the shard files without writing metadata.json, so a
  half-written data set is never mistaken for a complete one.

  In a job of `process_count` > 1 processes every process makes its own writer over the same `out_dir` and writes
  its part of each split (the module docstring's version 4); `close()` is then collective (two barriers) and must be
  reached by every process.
  """

  def __init__(self, out_dir: str, *, code_shape: Any, codebook: np.ndarray, num_classes: int, source: Any,
               num_shards: int = 1, overwrite: bool = False, cond_length: int = 1,
               cond_vocab_size: int | None = None, views: Any = ("center",), process_index: int = 0,
               process_count: int = 1):
    """Validates the description and prepares `out_dir`; shard files are opened on a split's first write.

    Args:
      out_dir: directory to create (or reuse when empty / `overwrite`).
      code_shape: [h, w, D].
      codebook: float [K, n_z]; K is the codebook size the codes must index.
      num_classes: labels must lie in [0, num_classes); 0 for caption conditions (then `cond_vocab_size`).
      source: JSON-serialisable description (data set, split names, stage-1 artifact path, ...).
      num_shards: ArrayRecord files per split.
      overwrite: replace an existing code dataset in `out_dir`.
      cond_length: condition tokens L per example (1 for class labels).
      cond_vocab_size: captions only: token ids must lie in [0, cond_vocab_size).
      views: names of the V views each record holds, 'center' first.
      process_index, process_count: this process and the number of processes writing the data set together
        (`jax.process_index(), jax.process_count()`); each writes its own part of every split.
    """
    self._code_shape = _check_code_shape(code_shape)
    self._views = check_views(views)
    codebook = np.asarray(codebook)
    if codebook.ndim != 2 or codebook.shape[0] < 1 or codebook.shape[1] < 1:
      raise ValueError(f"codebook must be a non-empty [K, n_z] array, got shape {codebook.shape}")
    if not np.issubdtype(codebook.dtype, np.floating) or not np.all(np.isfinite(codebook)):
      raise ValueError(f"codebook must hold finite floats, got dtype {codebook.dtype}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 0:
      raise ValueError(f"num_classes must be a positive integer (0 for captions), got {num_classes!r}")
    if isinstance(cond_length, bool) or not isinstance(cond_length, (int, np.integer)) or cond_length < 1:
      raise ValueError(f"cond_length must be a positive integer, got {cond_length!r}")
    if num_classes > 0 and (cond_length != 1 or cond_vocab_size not in (None, num_classes)):
      raise ValueError(f"a class label is one token in [0, num_classes={num_classes}): cond_length must be 1 and "
                       f"cond_vocab_size unset, got {cond_length}, {cond_vocab_size}")
    if num_classes == 0 and (isinstance(cond_vocab_size, bool) or not isinstance(cond_vocab_size, (int, np.integer))
                             or cond_vocab_size < 1):
      raise ValueError(f"caption conditions (num_classes 0) need a positive cond_vocab_size, got {cond_vocab_size!r}")
    if isinstance(num_shards, bool) or not isinstance(num_shards, (int, np.integer)) or num_shards < 1:
      raise ValueError(f"num_shards must be a positive integer, got {num_shards!r}")
    if (isinstance(process_count, bool) or not isinstance(process_count, (int, np.integer)) or process_count < 1
        or isinstance(process_index, bool) or not isinstance(process_index, (int, np.integer))
        or not 0 <= process_index < process_count):
      raise ValueError(f"process_index must lie in [0, process_count) with process_count >= 1, got "
                       f"{process_index!r} of {process_count!r}")
    try:
      json.dumps(source)
    except TypeError as e:
      raise ValueError(f"source must be JSON-serialisable: {e}") from e
    self._dir = paths.name(out_dir)
    self._codebook = codebook.astype(np.float32)
    self._num_classes = int(num_classes)
    self._cond_length = int(cond_length)
    self._cond_range = int(num_classes) if num_classes > 0 else int(cond_vocab_size)
    self._source = source
    self._num_shards = int(num_shards)
    self._process_index, self._process_count = int(process_index), int(process_count)
    self._dtype = code_dtype(len(codebook))
    self._writers: dict[str, list[Any]] = {}
    self._staging: dict[str, list[Any]] = {}  # split -> the open `paths.local_file` contexts of its shards
    self._counts: dict[str, int] = {}
    self._variants: dict[str, int] = {}
    self._side_files: list[str] = []  # this process's files beside the shards, renamed into place by the commit
    self._closed = False
    # A data set this one replaces stays whole until this one is committed (the module doc): its shards' names, kept
    # clear of and removed after the commit. Every process reads them here, before any can commit (after a barrier).
    self._replaced: tuple[str, ...] = ()
    self._generation = 0
    meta_path = paths.path(self._dir) / METADATA_FILE
    if meta_path.exists():
      if not overwrite:
        raise ValueError(f"{self._dir} already holds a code dataset; pass overwrite=True (--overwrite) to replace it")
      self._replaced = _listed_shards(meta_path)
      used = {int(m.group(1)) if (m := _GENERATION.search(name)) else 0 for name in self._replaced}
      self._generation = min(set(range(len(used) + 1)) - used)
    paths.path(self._dir).mkdir(parents=True, exist_ok=True)

  @property
  def num_written(self) -> dict[str, int]:
    return dict(self._counts)

  def write(self, split: str, codes: np.ndarray, labels: np.ndarray) -> None:
    """Appends examples to `split`: codes int [B, h, w, D] (one view) or [B, V, h, w, D] in [0, K), and conditions:
    class labels int [B] in [0, num_classes), or caption tokens int [B, L] in [0, cond_vocab_size) ([B] is taken as
    [B, 1] when L = 1), or T tokenizations of each caption int [B, T, L] (T fixed per split by its first write)."""
    if self._closed:
      raise ValueError("CodeDatasetWriter is closed")
    if not isinstance(split, str) or not _SPLIT_NAME.match(split):
      raise ValueError(f"split name must match [A-Za-z0-9_]+, got {split!r}")
    codes, labels = np.asarray(codes), np.asarray(labels)
    v = len(self._views)
    expected = self._code_shape if v == 1 else (v, *self._code_shape)  # [B, V, ...] with V = 1 is accepted too
    if codes.shape[1:] != expected and not (v == 1 and codes.shape[1:] == (1, *self._code_shape)):
      raise ValueError(f"codes must have shape [B, {', '.join(map(str, expected))}], got {codes.shape}")
    codes = codes.reshape(codes.shape[0], v, *self._code_shape)
    if self._cond_length == 1 and labels.shape == codes.shape[:1]:
      labels = labels[:, None]
    if not self._num_classes and labels.ndim == 3 and labels.shape[0] == codes.shape[0] and labels.shape[1] >= 1:
      variants = self._variants.setdefault(split, labels.shape[1])
      if labels.shape[1] != variants:
        raise ValueError(f"split {split!r} holds {variants} tokenizations per caption, got {labels.shape[1]}")
      labels = labels.reshape(labels.shape[0] * variants, labels.shape[2])
    else:
      variants = self._variants.setdefault(split, 1)
      if variants != 1:
        raise ValueError(f"split {split!r} holds {variants} tokenizations per caption: caption tokens must have "
                         f"shape [{codes.shape[0]}, {variants}, {self._cond_length}], got {labels.shape}")
    if labels.shape != (codes.shape[0] * variants, self._cond_length):
      want = f"[{codes.shape[0]}]" if self._num_classes else f"[{codes.shape[0]}, {self._cond_length}]"
      raise ValueError(f"{'labels' if self._num_classes else 'caption tokens'} must have shape {want} to match codes, "
                       f"got {labels.shape}")
    for name, a in (("codes", codes), ("labels", labels)):
      if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {a.dtype}")
    k = len(self._codebook)
    if codes.size and (codes.min() < 0 or codes.max() >= k):
      bad = int(np.argmax(np.any((codes < 0) | (codes >= k), axis=(1, 2, 3, 4))))
      raise ValueError(f"codes outside [0, codebook_size={k}) in batch row {bad} "
                       f"(min {codes.min()}, max {codes.max()})")
    if labels.size and (labels.min() < 0 or labels.max() >= self._cond_range):
      bad = int(np.argmax(np.any((labels < 0) | (labels >= self._cond_range), axis=1))) // variants
      if self._num_classes:
        raise ValueError(f"label {labels[bad, 0]} in batch row {bad} outside [0, num_classes={self._num_classes})")
      raise ValueError(f"caption token outside [0, cond_vocab_size={self._cond_range}) in batch row {bad}")
    writers = self._open(split)
    count = self._counts[split]
    codes = codes.astype(self._dtype)
    labels = labels.astype("<i4").reshape(codes.shape[0], variants * self._cond_length)
    for code, label in zip(codes, labels):
      writers[count % self._num_shards].write(label.tobytes() + code.tobytes(order="C"))
      count += 1
    self._counts[split] = count

  def side_file(self, name: str) -> Any:
    """The path to write `name` (a file beside the shards, e.g. `captions-<split>.txt`) to: a staged name that the
    commit renames to `name` (the module doc); a failed write leaves the data set it replaces with its own."""
    if "/" in name or name.startswith(".") or name in (METADATA_FILE, CODEBOOK_FILE):
      raise ValueError(f"side file names are plain file names other than the data set's own, got {name!r}")
    self._side_files.append(name)
    return paths.path(self._dir) / _staged(name)

  def open_split(self, split: str) -> None:
    """Creates `split`'s shards before its first write, so a split (or, in a multi-process job, this process's part
    of it) may stay empty."""
    if not isinstance(split, str) or not _SPLIT_NAME.match(split):
      raise ValueError(f"split name must match [A-Za-z0-9_]+, got {split!r}")
    self._open(split)

  def _shard_names(self, split: str, part: int) -> list[str]:
    return [shard_name(split, s, self._num_shards, part, self._process_count, self._generation)
            for s in range(self._num_shards)]

  def _open(self, split: str) -> list[Any]:
    if split not in self._writers:
      from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
      # Each shard goes to a local file first (the writer needs one), moved or copied into place on close.
      staging = [paths.local_file(paths.path(self._dir) / name)
                 for name in self._shard_names(split, self._process_index)]
      self._staging[split] = staging
      # group_size:1 makes every record its own chunk: cheap random access for shuffled reads.
      self._writers[split] = [array_record_module.ArrayRecordWriter(st.__enter__(), "group_size:1")
                              for st in staging]
      self._counts[split] = 0
    return self._writers[split]

  def _close_files(self, exc: BaseException | None = None) -> None:
    """Closes the shard writers, then publishes their files (or, after `exc`, discards them)."""
    for writers in self._writers.values():
      for w in writers:
        if w.is_open():
          w.close()
    for staging in self._staging.values():
      for st in staging:
        if exc is None:
          st.__exit__(None, None, None)
        else:
          st.__exit__(type(exc), exc, exc.__traceback__)
    self._staging.clear()

  def close(self) -> CodeMetadata:
    """Finishes the shards, then writes codebook.npy and metadata.json atomically; returns the metadata."""
    if self._closed:
      raise ValueError("CodeDatasetWriter is already closed")
    self._closed = True
    try:
      return self._finish()
    except BaseException:
      self._remove_staged_side_files()  # e.g. the processes' parts disagreed: nothing was committed
      raise

  def _remove_staged_side_files(self) -> None:
    """This process's staged side files (after a failure: the data set they were for is not committed)."""
    for name in self._side_files:
      staged = paths.path(self._dir) / _staged(name)
      if staged.exists():
        staged.unlink()

  def _finish(self) -> CodeMetadata:
    """`close` after its check: the shards published, then the commit (one process) or the parts' agreement and
    process 0's commit (several)."""
    self._close_files()
    if self._process_count == 1:
      if not any(self._counts.values()):
        raise ValueError(f"no examples were written to {self._dir}")
      return self._commit({split: (n,) for split, n in self._counts.items()}, dict(self._variants),
                          self._side_files)
    # Several processes: publish this part's counts, wait for every part, process 0 commits, everyone returns.
    root = paths.path(self._dir)
    paths.write_json(root / PART_FILE.format(index=self._process_index, count=self._process_count),
                     {**{split: {"num_examples": n, "cond_variants": self._variants.get(split, 1)}
                         for split, n in self._counts.items()}, _SIDE_FILES_KEY: self._side_files})
    paths.barrier(f"ctxrq_codes_parts_written:{self._dir}")
    # Every process reads and checks the parts, so a bad combination fails on all of them alike (none left waiting).
    part_files = [root / PART_FILE.format(index=p, count=self._process_count) for p in range(self._process_count)]
    parts = [paths.read_json(f) for f in part_files]
    side_files = [name for part in parts for name in part.pop(_SIDE_FILES_KEY)]
    splits = sorted(parts[0])
    for p, part in enumerate(parts):
      if sorted(part) != splits:
        raise ValueError(f"process {p} wrote splits {sorted(part)} of {self._dir} but process 0 wrote {splits}")
    variants = {}
    for split in splits:
      ts = {part[split]["cond_variants"] for part in parts if part[split]["num_examples"]}
      if len(ts) > 1:
        raise ValueError(f"the processes wrote split {split!r} with different tokenizations per caption {sorted(ts)}")
      variants[split] = ts.pop() if ts else 1
    sizes = {split: tuple(int(part[split]["num_examples"]) for part in parts) for split in splits}
    empty = [split for split, n in sizes.items() if not sum(n)]
    if empty:
      raise ValueError(f"no process wrote any example of split(s) {', '.join(empty)} of {self._dir}")
    if self._process_index == 0:
      self._commit(sizes, variants, side_files)
    paths.barrier(f"ctxrq_codes_committed:{self._dir}")
    if self._process_index == 0:
      for f in part_files:
        f.unlink()
    return read_metadata(self._dir)

  def _commit(self, sizes: Mapping[str, tuple[int, ...]], variants: Mapping[str, int],
              side_files: Sequence[str] = ()) -> CodeMetadata:
    """Renames the staged `side_files` into place, writes codebook.npy, then metadata.json (the commit marker) for
    splits whose parts hold `sizes` examples."""
    num_parts = self._process_count
    meta = CodeMetadata(
        code_shape=self._code_shape, codebook_size=len(self._codebook), embed_dim=self._codebook.shape[1],
        num_classes=self._num_classes, source=self._source, cond_length=self._cond_length,
        cond_vocab_size=self._cond_range, views=self._views,
        cond_variants={split: t for split, t in variants.items() if t > 1},
        parts={split: n for split, n in sizes.items() if num_parts > 1},
        splits={split: (sum(n), tuple(name for p in range(num_parts) for name in self._shard_names(split, p)))
                for split, n in sizes.items()})
    root = paths.path(self._dir)
    if (root / METADATA_FILE).exists():  # the data set this one replaces: its marker goes before its codebook does
      (root / METADATA_FILE).unlink()
    for name in side_files:  # no metadata.json now: neither data set is complete while they move
      if (root / name).exists():
        (root / name).unlink()
      (root / _staged(name)).rename(root / name)
    paths.write_with(root / CODEBOOK_FILE, lambda f: np.save(f, self._codebook))
    paths.write_text(root / METADATA_FILE, json.dumps(meta.to_json(), indent=2, sort_keys=True) + "\n")
    new = {name for _, names in meta.splits.values() for name in names}
    for name in self._replaced:  # the replaced data set's shards, now that nothing describes them
      if name not in new and (root / name).exists():
        (root / name).unlink()
    return meta

  def __enter__(self) -> CodeDatasetWriter:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:
      self._closed = True
      self._close_files(exc)
      self._remove_staged_side_files()


def _staged(name: str) -> str:
  """The name a side file is written under until the commit (hidden, and not a shard or metadata name)."""
  return f".{name}.staged"


def read_metadata(codes_dir: str) -> CodeMetadata:
  """Reads and validates `codes_dir/metadata.json`; raises ValueError naming what is missing or wrong."""
  path = paths.path(codes_dir) / METADATA_FILE
  if not path.exists():
    raise ValueError(f"{path} not found: not a code dataset, or its writing never finished")
  try:
    raw = json.loads(path.read_bytes())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is corrupt: {e}") from e
  if not isinstance(raw, dict) or raw.get("format") != FORMAT:
    raise ValueError(f"{path} is not a {FORMAT} metadata file")
  if raw.get("version") not in (VERSION, VIEWS_VERSION, VARIANTS_VERSION, PARTS_VERSION):
    raise ValueError(f"{path} has format version {raw.get('version')!r}; this reader understands {VERSION}, "
                     f"{VIEWS_VERSION}, {VARIANTS_VERSION} and {PARTS_VERSION}")
  try:
    views = check_views(raw["views"]) if raw["version"] != VERSION else ("center",)
  except (KeyError, ValueError) as e:
    raise ValueError(f"{path}: version {raw['version']} needs 'views', a list of names starting with 'center'") from e
  missing = [k for k in ("code_shape", "codebook_size", "embed_dim", "num_classes", "source", "splits")
             if k not in raw]
  if missing:
    raise ValueError(f"{path} is missing {', '.join(missing)}")
  try:
    code_shape = _check_code_shape(raw["code_shape"])
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e
  raw.setdefault("cond_length", 1)
  raw.setdefault("cond_vocab_size", raw["num_classes"])
  for key in ("codebook_size", "embed_dim", "cond_length", "cond_vocab_size"):
    if isinstance(raw[key], bool) or not isinstance(raw[key], int) or raw[key] < 1:
      raise ValueError(f"{path}: {key} must be a positive integer, got {raw[key]!r}")
  if isinstance(raw["num_classes"], bool) or not isinstance(raw["num_classes"], int) or raw["num_classes"] < 0:
    raise ValueError(f"{path}: num_classes must be a positive integer (0 for captions), got {raw['num_classes']!r}")
  if raw["num_classes"] > 0 and (raw["cond_length"] != 1 or raw["cond_vocab_size"] != raw["num_classes"]):
    raise ValueError(f"{path}: class labels need cond_length 1 and cond_vocab_size = num_classes, got "
                     f"{raw['cond_length']}, {raw['cond_vocab_size']}")
  if raw.get("code_dtype", code_dtype(raw["codebook_size"]).name) != code_dtype(raw["codebook_size"]).name:
    raise ValueError(f"{path}: code_dtype {raw['code_dtype']!r} does not match codebook_size {raw['codebook_size']}")
  if not isinstance(raw["splits"], dict) or not raw["splits"]:
    raise ValueError(f"{path}: splits must be a non-empty mapping")
  splits, variants, parts = {}, {}, {}
  for split, info in raw["splits"].items():
    ok = (isinstance(info, dict) and isinstance(info.get("num_examples"), int) and info["num_examples"] >= 0
          and isinstance(info.get("shards"), list) and info["shards"]
          and all(isinstance(s, str) and s and "/" not in s for s in info["shards"]))
    if not ok:
      raise ValueError(f"{path}: split {split!r} needs num_examples >= 0 and a list of shard file names, "
                       f"got {info!r}")
    splits[split] = (info["num_examples"], tuple(info["shards"]))
    if raw["version"] in (VARIANTS_VERSION, PARTS_VERSION):
      t = info.get("cond_variants")
      if isinstance(t, bool) or not isinstance(t, int) or t < 1 or (t > 1 and raw["num_classes"] > 0):
        raise ValueError(f"{path}: version {raw['version']} needs each split's cond_variants, a positive integer "
                         f"(1 for class labels), got {t!r} for split {split!r}")
      if t > 1:
        variants[split] = t
    if raw["version"] == PARTS_VERSION:
      sizes = info.get("parts")
      ok = (isinstance(sizes, list) and sizes and all(isinstance(m, int) and not isinstance(m, bool) and m >= 0
                                                      for m in sizes)
            and sum(sizes) == info["num_examples"] and len(info["shards"]) % len(sizes) == 0)
      if not ok:
        raise ValueError(f"{path}: version {PARTS_VERSION} needs each split's parts, examples per process summing to "
                         f"num_examples, with shards a multiple of their number; got {sizes!r} for split {split!r}")
      parts[split] = tuple(sizes)
  return CodeMetadata(code_shape=code_shape, codebook_size=raw["codebook_size"], embed_dim=raw["embed_dim"],
                      num_classes=raw["num_classes"], source=raw["source"], splits=splits,
                      cond_length=raw["cond_length"], cond_vocab_size=raw["cond_vocab_size"], views=views,
                      cond_variants=variants, parts=parts)


def load_codebook(codes_dir: str, metadata: CodeMetadata | None = None) -> np.ndarray:
  """Returns the codebook float32 [K, n_z], checked against the metadata."""
  meta = metadata or read_metadata(codes_dir)
  path = paths.path(codes_dir) / CODEBOOK_FILE
  try:
    with path.open("rb") as f:
      codebook = np.load(io.BytesIO(f.read()), allow_pickle=False)
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read codebook {path}: {e}") from e
  if codebook.shape != (meta.codebook_size, meta.embed_dim) or codebook.dtype != np.float32:
    raise ValueError(f"{path} holds {codebook.dtype} {codebook.shape}; metadata says float32 "
                     f"[{meta.codebook_size}, {meta.embed_dim}]")
  return codebook


TRAINED_CODEBOOK_FILE = "codebook.json"  # in a stage-2 workdir: which codebook its model was trained on


def codebook_fingerprint(codebook: np.ndarray) -> str:
  """SHA-256 (hex) of a codebook's float32 values [K, n_z]."""
  return hashlib.sha256(np.ascontiguousarray(codebook, np.float32).tobytes()).hexdigest()


def record_trained_codebook(workdir: str, codebook: np.ndarray, codes_dir: str) -> None:
  """Writes WORKDIR/codebook.json: the fingerprint of the codebook a stage-2 run trains on (`check_trained_codebook`)."""
  fingerprints.record(workdir, TRAINED_CODEBOOK_FILE, codebook_fingerprint(codebook), codes_dir)


def check_trained_codebook(workdir: str, codebook: np.ndarray, codes_dir: str) -> bool:
  """ValueError unless `codebook` (of `codes_dir`) is the one the stage-2 model in `workdir` was trained on; False
  when the run records none (a run from before this check), True when it matches.

  Re-encoding a code dataset with another stage-1 model (a stage 1 trained further, another artifact) keeps its
  shape and K, so nothing else notices: the model would resume on codes whose ids now mean other vectors, and
  sampling would decode its codes with another RQ-VAE. The stage-2 trainer records the fingerprint
  (`record_trained_codebook`); the trainer, when it resumes, and the sampler compare it.
  """
  fingerprint = codebook_fingerprint(codebook)
  return fingerprints.check(workdir, TRAINED_CODEBOOK_FILE, fingerprint, lambda saved: (
      f"the codebook of {codes_dir} is not the one the stage-2 model in {workdir} was trained on (it was "
      f"{saved.get('codes_dir')}'s, fingerprint {str(saved.get('sha256'))[:12]}; now {fingerprint[:12]}): the codes "
      "were re-encoded with another stage-1 model. Train stage 2 anew in another workdir, or point data.codes_dir at "
      "the codes it was trained on"))


class CodeSource(grain.sources.RandomAccessDataSource):
  """Raw records (bytes) of one split in write order, over its round-robin shards."""

  def __init__(self, codes_dir: str, split: str, metadata: CodeMetadata | None = None):
    self.metadata = meta = metadata or read_metadata(codes_dir)
    self._num_examples = meta.num_examples(split)
    files = meta.shard_files(split)
    self._sizes = meta.part_sizes(split)
    self._num_shards = len(files) // len(self._sizes)  # per part
    self._shards = []
    for i, name in enumerate(files):
      path = paths.path(codes_dir) / name
      if not path.exists():
        raise ValueError(f"code dataset shard {path} is missing")
      try:  # a local file, or a gs:// object read by array_record's own GCS reader
        shard = grain.sources.ArrayRecordDataSource([str(path)])
        length = len(shard)
      except RuntimeError as e:
        raise ValueError(f"code dataset shard {path} is corrupt: {e}") from e
      expected = len(range(i % self._num_shards, self._sizes[i // self._num_shards], self._num_shards))
      if length != expected:
        raise ValueError(f"code dataset shard {path} holds {length} records; metadata implies {expected}")
      self._shards.append(shard)

  def __len__(self) -> int:
    return self._num_examples

  def __getitem__(self, index: int) -> bytes:
    if not 0 <= index < self._num_examples:
      raise IndexError(f"record {index} out of range [0, {self._num_examples})")
    if len(self._sizes) == 1:
      return self._shards[index % self._num_shards][index // self._num_shards]
    shard, record = _locate(self._sizes, self._num_shards, index)
    return self._shards[shard][record]

  def read_all(self) -> list[bytes]:
    """All records in write order, read shard by shard."""
    out: list[bytes] = [b""] * self._num_examples
    start = 0
    for part, size in enumerate(self._sizes):
      for s in range(self._num_shards):
        shard = self._shards[part * self._num_shards + s]
        if len(shard):
          out[start + s:start + size:self._num_shards] = shard.__getitems__(list(range(len(shard))))
      start += size
    return out

  def __repr__(self) -> str:
    return (f"CodeSource(num_examples={self._num_examples}, num_shards={len(self._shards)}"
            + (f", parts={list(self._sizes)})" if len(self._sizes) > 1 else ")"))


def decode_record_variants(record: bytes, index: int, metadata: CodeMetadata, where: str = "",
                           cond_variants: int = 1) -> tuple[np.ndarray, int | np.ndarray]:
  """Parses one record of a split with T = `cond_variants` into (codes int32 [V, h, w, D], condition): an int label,
  or int32 [T, L] caption tokens.

  Raises ValueError naming `index` if the record is invalid.
  """
  expected = (metadata.record_bytes - _TOKEN_BYTES * metadata.cond_length
              + _TOKEN_BYTES * metadata.cond_length * cond_variants)
  if len(record) != expected:
    raise ValueError(f"record {index}{where} is corrupt: {len(record)} bytes, expected {expected} "
                     f"for {cond_variants} x {metadata.cond_length} condition tokens and {metadata.num_views} view(s) "
                     f"of codes {list(metadata.code_shape)} of {metadata.code_dtype.name}")
  length = metadata.cond_length * cond_variants
  cond = np.frombuffer(record, "<i4", count=length)
  codes = np.frombuffer(record, metadata.code_dtype, offset=_TOKEN_BYTES * length).reshape(
      (metadata.num_views, *metadata.code_shape))
  if not metadata.is_text:
    label = int(cond[0])
    if not 0 <= label < metadata.num_classes:
      raise ValueError(f"record {index}{where}: label {label} outside [0, num_classes={metadata.num_classes})")
  elif cond.min() < 0 or cond.max() >= metadata.cond_range:
    raise ValueError(f"record {index}{where}: caption tokens outside [0, cond_vocab_size={metadata.cond_range}) "
                     f"(min {cond.min()}, max {cond.max()})")
  if codes.min() < 0 or codes.max() >= metadata.codebook_size:
    raise ValueError(f"record {index}{where}: codes outside [0, codebook_size={metadata.codebook_size}) "
                     f"(min {codes.min()}, max {codes.max()})")
  if not metadata.is_text:
    return codes.astype(np.int32), label
  return codes.astype(np.int32), cond.astype(np.int32).reshape(cond_variants, metadata.cond_length)


def decode_record_views(record: bytes, index: int, metadata: CodeMetadata, where: str = "",
                        cond_variants: int = 1) -> tuple[np.ndarray, int | np.ndarray]:
  """Parses one record into (codes int32 [V, h, w, D], condition): an int label, or int32 [L] caption tokens
  (variant 0 of a split with T = `cond_variants`). Raises ValueError naming `index` if the record is invalid."""
  codes, cond = decode_record_variants(record, index, metadata, where, cond_variants)
  return codes, (cond[0] if metadata.is_text else cond)


def decode_record(record: bytes, index: int, metadata: CodeMetadata,
                  where: str = "") -> tuple[np.ndarray, int | np.ndarray]:
  """Parses one record into (codes int32 [h, w, D] of view 0, condition); ValueError naming `index` if invalid."""
  codes, cond = decode_record_views(record, index, metadata, where)
  return codes[0], cond


def make_code_iterator(
    codes_dir: str,
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
    random_view: bool = False,
    random_caption: bool = False,
) -> grain.DatasetIterator:
  """Iterator of `{'codes': int32 [B, h, w, D], 'label': int32 [B]}` (class labels) or `{'codes', 'cond': int32
  [B, L]}` (caption tokens) with get_state()/set_state().

  With `train=False` examples come in write order (of this host's strided shard), one pass by default; with
  `train=True` they are shuffled by `seed` (differently each epoch), repeated forever unless `num_epochs`, and the
  last partial batch is dropped. `random_view`: each example's codes are one of its record's views drawn uniformly
  (grain's per-example, per-epoch rng: deterministic given `seed`, restored with the iterator state); otherwise
  view 0 ('center'). `random_caption`: likewise each example's caption tokens are one of the record's T
  tokenizations (BPE dropout drawn anew each epoch, up to the T stored draws); otherwise variant 0. Other arguments
  as in `pipeline.build_iterator`.
  """
  source = CodeSource(codes_dir, split)
  meta = source.metadata
  where = f" of code split {split!r} in {codes_dir}"
  variants = meta.num_cond_variants(split)
  draw_view = bool(random_view) and meta.num_views > 1
  draw_caption = bool(random_caption) and variants > 1

  def decode(index: int, record: bytes) -> tuple[np.ndarray, Any]:
    return decode_record_variants(record, index, meta, where, variants)

  def transform(example: tuple[np.ndarray, Any], rng: np.random.Generator | None) -> dict[str, np.ndarray]:
    codes, cond = example  # codes [V, h, w, D]; cond a label or [T, L]
    codes = codes[int(rng.integers(meta.num_views)) if draw_view else 0]
    if meta.is_text:
      cond = cond[int(rng.integers(variants)) if draw_caption else 0]
      return {"codes": codes, "cond": cond}
    return {"codes": codes, "label": np.int32(cond)}

  return pipeline.build_iterator(
      source, decode=decode, transform=transform, random_transform=draw_view or draw_caption, batch_size=batch_size,
      seed=seed,
      train=train, shard_index=shard_index, shard_count=shard_count, num_epochs=num_epochs,
      drop_remainder=drop_remainder, worker_count=worker_count, num_threads=num_threads,
      description=f"code split {split!r} in {codes_dir}")


def load_codes(codes_dir: str, split: str, view: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Returns a whole split in write order: (codes int32 [M, h, w, D] of `view` (0: 'center'), labels int32 [M] or
  caption tokens [M, L] (variant 0))."""
  source = CodeSource(codes_dir, split)
  meta = source.metadata
  m = len(source)
  codes = np.empty((m, *meta.code_shape), np.int32)
  labels = np.empty((m, meta.cond_length) if meta.is_text else (m,), np.int32)
  where = f" of code split {split!r} in {codes_dir}"
  if not 0 <= view < meta.num_views:
    raise ValueError(f"view {view} out of range: {codes_dir} holds {meta.num_views} view(s) {list(meta.views)}")
  variants = meta.num_cond_variants(split)
  for i, record in enumerate(source.read_all()):
    all_views, labels[i] = decode_record_views(record, i, meta, where, variants)
    codes[i] = all_views[view]
  return codes, labels
