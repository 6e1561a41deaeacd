"""uint8 images -> FID Inception features, in fixed-size jitted batches; ADM-layout `.npz` files in and out.

Input handling (`preprocess`), for uint8 images [B, H, W, 3] of any size:

  resize='pytorch_fid' (default; pytorch-fid's InceptionV3 input transform, which the official RQ-Transformer FID
  code also uses):
      x / 255  ->  bilinear resize to 299x299 with half-pixel centres and no antialiasing
      (`jax.image.resize(..., 'bilinear', antialias=False)`, the same sampling as torch's
      `F.interpolate(mode='bilinear', align_corners=False)`)  ->  2x - 1, so [0, 255] maps to [-1, 1].
      On uint8 image files this is exactly pytorch-fid. It is not exactly the official RQ-Transformer FID: that code
      (`main_sampling_fid.py`, `rqvae/metrics/fid.py`) feeds the decoder's pixels as unrounded floats,
      clamp(x * 0.5 + 0.5, 0, 1), while samples reach this module rounded to uint8 first (the ADM sample layout,
      `core.grids.to_uint8`): a pixel differs by at most 1/510 (on the [0, 1] scale) before the resize.
  resize='adm_tf1' (what the ADM evaluator's TensorFlow graph does before its first convolution):
      TF1 `ResizeBilinear` to 299x299 (align_corners=False, half_pixel_centers=False: output pixel i samples input
      coordinate i * in / out)  ->  (x - 128) / 128.

The two differ by a fraction of a FID point; use 'adm_tf1' when comparing against statistics the ADM evaluator
computed (e.g. the `mu`/`sigma` inside `VIRTUAL_imagenet256_labeled.npz`), 'pytorch_fid' against pytorch-fid
numbers. The network weights are pytorch-fid's port of the same TF graph either way.

Features returned per image (`InceptionFeatureExtractor`):
  pool     [2048]        pool features (FID, precision/recall)
  logits   [1008]        softmax input of the ADM Inception Score: pool @ fc.kernel, WITHOUT the fc bias
  spatial  [17 * 17 * 7] (with `spatial=True`) the first 7 channels of Mixed_6d.branch1x1 (the TF graph's
                         `mixed_6/conv`), flattened in (h, w, c) order as ADM does: the sFID features.

ADM npz layout: a sample or reference file holds `arr_0` uint8 [N, H, W, 3]; a reference may also hold precomputed
`mu` [2048], `sigma` [2048, 2048] and, for sFID, `mu_s` [2023], `sigma_s` [2023, 2023]. `iter_npz_batches` streams
`arr_0` from inside the zip without loading the whole array.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import zipfile
from typing import Any, Iterable, Iterator, Mapping, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ctxrq_jax.core import paths
from ctxrq_jax.models import inception

IMAGE_SIZE = 299
BATCH_SIZE = 64  # ADM evaluator's
SFID_CHANNELS = 7
RESIZE_MODES = ("pytorch_fid", "adm_tf1")
IMAGES_KEY = "arr_0"
RESIZE_KEY = "resize"  # a reference's record of the resize mode its statistics were computed with


def check_resize_mode(resize: Any, where: str = "resize") -> str:
  """`resize` if it is one of RESIZE_MODES, else ValueError naming `where` (the argument or the file's key)."""
  if resize not in RESIZE_MODES:
    raise ValueError(f"{where} must be one of {RESIZE_MODES}, got {resize!r}")
  return resize


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing.


@functools.lru_cache(maxsize=32)
def _tf1_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] weights of TF1 ResizeBilinear (align_corners=False, half_pixel_centers=False) along one axis."""
  scale = in_size / out_size
  m = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    src = i * scale
    lo = min(int(np.floor(src)), in_size - 1)
    hi = min(lo + 1, in_size - 1)
    frac = src - lo
    m[i, lo] += 1.0 - frac
    m[i, hi] += frac
  return m.astype(np.float32)


def tf1_resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """TF1 `tf.image.resize_bilinear(x, size, align_corners=False)` (the legacy, non-half-pixel sampling).

  Args:
    x: float [B, H, W, C].
    size: (out_h, out_w).

  Returns:
    float32 [B, out_h, out_w, C]; output pixel i interpolates input coordinate i * H / out_h between its floor and
    the next pixel (clamped at the last one).
  """
  chex.assert_rank(x, 4)
  mh = jnp.asarray(_tf1_bilinear_matrix(x.shape[1], size[0]))
  mw = jnp.asarray(_tf1_bilinear_matrix(x.shape[2], size[1]))
  hp = jax.lax.Precision.HIGHEST
  y = jnp.einsum("oh,bhwc->bowc", mh, x.astype(jnp.float32), precision=hp)
  return jnp.einsum("pw,bowc->bopc", mw, y, precision=hp)


def preprocess(images: jax.Array, *, image_size: int = IMAGE_SIZE, resize: str = "pytorch_fid") -> jax.Array:
  """uint8 [B, H, W, 3] -> float32 [B, image_size, image_size, 3] as the FID Inception expects (module docstring)."""
  chex.assert_rank(images, 4)
  chex.assert_axis_dimension(images, -1, 3)
  chex.assert_type(images, jnp.uint8)
  check_resize_mode(resize)
  b, _, _, c = images.shape
  x = images.astype(jnp.float32)
  if resize == "pytorch_fid":
    x = jax.image.resize(x / 255.0, (b, image_size, image_size, c), method="bilinear", antialias=False)
    return 2.0 * x - 1.0
  x = tf1_resize_bilinear(x, (image_size, image_size))  # adm_tf1
  return (x - 128.0) / 128.0


def check_images(images: Any) -> np.ndarray:
  """Returns `images` as numpy uint8 [B, H, W, 3]; raises ValueError naming what is wrong otherwise."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be [N, H, W, 3] (RGB, channels last), got shape {images.shape}")
  if images.dtype != np.uint8:
    raise ValueError(f"images must be uint8 in [0, 255] (the ADM npz layout), got dtype {images.dtype}")
  return images


# ----------------------------------------------------------------------------------------------------------------
# Feature extraction.


@functools.partial(jax.jit, static_argnames=("image_size", "resize", "spatial"))
def _features(variables: Mapping[str, Any], images: jax.Array, *, image_size: int, resize: str,
              spatial: bool) -> dict[str, jax.Array]:
  """`InceptionFeatureExtractor`'s program for uint8 images [B, H, W, 3]: one jit for every extractor of a process,
  so a second one (another command in a notebook, another file) reuses what the first compiled."""
  out = inception.FIDInceptionV3().apply(variables, preprocess(images, image_size=image_size, resize=resize),
                                         spatial=spatial)
  result = {"pool": out["pool"], "logits": out["logits_unbiased"]}
  if spatial:
    s = out["spatial"][..., :SFID_CHANNELS]
    result["spatial"] = s.reshape(s.shape[0], -1)
  return result


class InceptionFeatureExtractor:
  """uint8 images -> {'pool', 'logits', 'spatial'} numpy float32, `batch_size` images per jitted call, split over
  this host's devices.

  Args:
    variables: FIDInceptionV3 {'params', 'batch_stats'} (`inception_convert.load_variables`).
    batch_size: images per call (ADM: 64); the last chunk is padded and trimmed so one shape is compiled.
    image_size: network input size (299 for FID; smaller only in tests).
    resize: 'pytorch_fid' or 'adm_tf1' (module docstring).
    spatial: also return the sFID features.
  """

  def __init__(self, variables: Mapping[str, Any], *, batch_size: int = BATCH_SIZE, image_size: int = IMAGE_SIZE,
               resize: str = "pytorch_fid", spatial: bool = True):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_resize_mode(resize)
    if image_size < inception.MIN_SIZE:
      raise ValueError(f"image_size must be >= {inception.MIN_SIZE}, got {image_size}")
    # Data parallel over this host's devices: the weights replicated, each batch split along its first axis.
    devices = np.asarray(jax.local_devices())
    if batch_size % len(devices):
      raise ValueError(f"batch_size {batch_size} is not divisible by the {len(devices)} local devices")
    mesh = jax.sharding.Mesh(devices, ("data",))
    self._batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    self.variables = jax.device_put({"params": variables["params"], "batch_stats": variables["batch_stats"]},
                                    jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    self.batch_size, self.image_size, self.resize, self.spatial = int(batch_size), int(image_size), resize, spatial

  def _run(self, chunk: np.ndarray) -> dict[str, np.ndarray]:
    pad = self.batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
    out = _features(self.variables, jax.device_put(chunk, self._batch_sharding), image_size=self.image_size,
                    resize=self.resize, spatial=self.spatial)
    return {k: np.asarray(v)[:self.batch_size - pad] for k, v in out.items()}

  def iter_batches(self, batches: Iterable[Any]) -> Iterator[dict[str, np.ndarray]]:
    """Features of each incoming image batch (any batch sizes; re-chunked to `batch_size`), in order."""
    for batch in batches:
      batch = check_images(batch)
      for i in range(0, len(batch), self.batch_size):
        yield self._run(batch[i:i + self.batch_size])

  def __call__(self, images: Any) -> dict[str, np.ndarray]:
    """All features of uint8 images [N, H, W, 3] at once."""
    parts = list(self.iter_batches([images]))
    if not parts:
      raise ValueError("no images")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# ----------------------------------------------------------------------------------------------------------------
# ADM-layout npz files.


@contextlib.contextmanager
def _npy_member(path: str, key: str):
  with zipfile.ZipFile(path, "r") as zf:
    name = f"{key}.npy"
    if name not in zf.namelist():
      keys = sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
      raise KeyError(f"{path} has no array {key!r} (has {keys})")
    with zf.open(name, "r") as f:
      yield f


def npz_keys(path: str | os.PathLike) -> list[str]:
  path = _existing(path)
  with zipfile.ZipFile(path, "r") as zf:
    return sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))


def _existing(path: str | os.PathLike) -> str:
  """The local file to read `path` from (a bucket's npz is fetched once: zip members need random access)."""
  if not paths.path(path).exists():
    raise FileNotFoundError(f"npz file {os.fspath(path)} does not exist")
  path = paths.local_copy(path)
  if not zipfile.is_zipfile(path):
    raise ValueError(f"{path} is not an .npz (zip) file")
  return path


def _read_header(f) -> Optional[tuple[tuple[int, ...], bool, np.dtype]]:
  """(shape, fortran_order, dtype) of an .npy stream, or None for a format version without a public reader."""
  version = np.lib.format.read_magic(f)
  if version == (1, 0):
    return np.lib.format.read_array_header_1_0(f)
  if version == (2, 0):
    return np.lib.format.read_array_header_2_0(f)
  return None


def npz_array_info(path: str | os.PathLike, key: str = IMAGES_KEY) -> tuple[tuple[int, ...], np.dtype]:
  """(shape, dtype) of one array of an npz, read from its header only."""
  path = _existing(path)
  with _npy_member(path, key) as f:
    header = _read_header(f)
  if header is None:
    with np.load(path) as z:
      arr = z[key]
    return tuple(arr.shape), arr.dtype
  return tuple(header[0]), header[2]


def iter_npz_batches(path: str | os.PathLike, key: str = IMAGES_KEY, *, batch_size: int = BATCH_SIZE
                     ) -> Iterator[np.ndarray]:
  """Streams `key` of an npz (stored or compressed) in batches along axis 0; memory is one batch."""
  path = _existing(path)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  with _npy_member(path, key) as f:
    header = _read_header(f)
    if header is None or header[1] or header[2].hasobject:  # not streamable: read it whole
      with np.load(path) as z:
        arr = z[key]
      if arr.ndim == 0:
        raise ValueError(f"{path}:{key} is a scalar, not an array of images")
      for i in range(0, len(arr), batch_size):
        yield arr[i:i + batch_size]
      return
    shape, _, dtype = header
    if not shape:
      raise ValueError(f"{path}:{key} is a scalar, not an array of images")
    row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    for start in range(0, shape[0], batch_size):
      n = min(batch_size, shape[0] - start)
      data = f.read(n * row)
      if len(data) != n * row:
        raise ValueError(f"{path}:{key} is truncated: expected {shape[0]} rows, the data ends at row "
                         f"{start + len(data) // max(row, 1)}")
      yield np.frombuffer(data, dtype=dtype).reshape((n, *shape[1:]))


@dataclasses.dataclass
class Reference:
  """What an ADM-layout reference npz offers.

  Attributes:
    path: the file.
    num_images: rows of `arr_0`, or None when the file has no images.
    image_shape: (H, W, C) of `arr_0`, or None.
    mu, sigma: precomputed pool-feature statistics, or None.
    mu_s, sigma_s: precomputed sFID statistics, or None.
    resize: the `resize` mode its statistics were computed with, when the file records it (references this package
      writes do; ADM's and pytorch-fid's files do not).
  """

  path: str
  num_images: Optional[int]
  image_shape: Optional[tuple[int, ...]]
  mu: Optional[np.ndarray] = None
  sigma: Optional[np.ndarray] = None
  mu_s: Optional[np.ndarray] = None
  sigma_s: Optional[np.ndarray] = None
  resize: Optional[str] = None

  @property
  def has_images(self) -> bool:
    return self.num_images is not None

  @property
  def has_stats(self) -> bool:
    return self.mu is not None

  @property
  def has_spatial_stats(self) -> bool:
    return self.mu_s is not None

  def batches(self, batch_size: int = BATCH_SIZE) -> Iterator[np.ndarray]:
    if not self.has_images:
      raise ValueError(f"reference {self.path} has no images ({IMAGES_KEY})")
    return iter_npz_batches(self.path, IMAGES_KEY, batch_size=batch_size)


def read_reference(path: str | os.PathLike) -> Reference:
  """Reads an ADM-layout npz: `arr_0` (uint8 [N, H, W, 3]; header only, the images stream later) and/or `mu` and
  `sigma` (with optional `mu_s`, `sigma_s`).

  Raises:
    FileNotFoundError, or ValueError naming the key with a wrong shape or dtype, or a file with neither layout.
  """
  name = os.fspath(path)  # as the user named it (a bucket's file is read from a local copy)
  path = _existing(path)
  keys = set(npz_keys(path))
  num_images = image_shape = None
  if IMAGES_KEY in keys:
    shape, dtype = npz_array_info(path, IMAGES_KEY)
    if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8:
      raise ValueError(f"{path}: {IMAGES_KEY} must be uint8 [N, H, W, 3], got {np.dtype(dtype).name} {list(shape)}")
    num_images, image_shape = shape[0], tuple(shape[1:])
  ref = Reference(name, num_images, image_shape)
  with np.load(path) as z:
    for mu_key, sigma_key in (("mu", "sigma"), ("mu_s", "sigma_s")):
      if (mu_key in keys) != (sigma_key in keys):
        raise ValueError(f"{path} has one of {mu_key!r}/{sigma_key!r} but not the other")
      if mu_key in keys:
        mu, sigma = np.asarray(z[mu_key], np.float64), np.asarray(z[sigma_key], np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
          raise ValueError(f"{path}: {mu_key} {list(mu.shape)} / {sigma_key} {list(sigma.shape)} must be [d] / [d, d]")
        setattr(ref, mu_key, mu)
        setattr(ref, sigma_key, sigma)
    if RESIZE_KEY in keys:
      ref.resize = check_resize_mode(str(z[RESIZE_KEY]), f"{path}: {RESIZE_KEY}")
  if not ref.has_images and not ref.has_stats:
    raise ValueError(f"{path} has neither images ({IMAGES_KEY}) nor statistics (mu, sigma); keys: {sorted(keys)}")
  return ref


def write_reference(path: str | os.PathLike, *, images: Optional[np.ndarray] = None,
                    stats: Optional[tuple[np.ndarray, np.ndarray]] = None,
                    spatial_stats: Optional[tuple[np.ndarray, np.ndarray]] = None,
                    resize: Optional[str] = None) -> None:
  """Writes an ADM-layout reference npz: `arr_0` (uint8 images), `mu`/`sigma`, `mu_s`/`sigma_s`, whichever given,
  and `resize` (the mode the statistics were computed with; evaluation refuses another)."""
  arrays: dict[str, np.ndarray] = {}
  if resize is not None:
    arrays[RESIZE_KEY] = np.array(check_resize_mode(resize))
  if images is not None:
    arrays[IMAGES_KEY] = check_images(images)
  for (mu_key, sigma_key), value in ((("mu", "sigma"), stats), (("mu_s", "sigma_s"), spatial_stats)):
    if value is not None:
      arrays[mu_key], arrays[sigma_key] = np.asarray(value[0]), np.asarray(value[1])
  if not set(arrays) - {RESIZE_KEY}:
    raise ValueError("write_reference needs images or statistics")
  with paths.local_file(path, suffix=".npz") as tmp:
    np.savez(tmp, **arrays)
