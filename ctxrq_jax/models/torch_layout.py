"""PyTorch -> Flax parameter layouts, shared by the converters of released weights (rqvae_convert, inception_convert,
clip_convert).

A converted variable is one of three kinds:
  conv   a convolution kernel: PyTorch OIHW [out, in, kh, kw] -> Flax HWIO [kh, kw, in, out]
  dense  a linear weight: PyTorch [out, in] -> Flax [in, out]
  copy   anything else (biases, norm scales, embeddings, buffers): the same array
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

KINDS = ("conv", "dense", "copy")
MAX_LISTED = 20  # keys named in one conversion error, at most


def torch_shape(flax_shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
  """The PyTorch shape a `kind` variable of Flax shape `flax_shape` is read from."""
  if kind == "conv":
    h, w, i, o = flax_shape
    return (o, i, h, w)
  if kind == "dense":
    return tuple(reversed(flax_shape))
  if kind == "copy":
    return tuple(flax_shape)
  raise ValueError(f"unknown layout kind {kind!r}; expected one of {KINDS}")


def to_flax(array: np.ndarray, kind: str) -> np.ndarray:
  """A PyTorch-layout array as the C-contiguous Flax-layout array of its `kind` (0-d arrays stay 0-d)."""
  if kind == "conv":
    array = np.transpose(array, (2, 3, 1, 0))
  elif kind == "dense":
    array = array.T
  elif kind != "copy":
    raise ValueError(f"unknown layout kind {kind!r}; expected one of {KINDS}")
  return np.array(array, order="C", copy=None)


def tensors_to_numpy(state: Mapping[str, Any], where: str, error: type[Exception]) -> dict[str, np.ndarray]:
  """A torch state dict as numpy arrays (floating tensors as float32); `error(message)` names the first entry of
  `where` that is not a tensor."""
  import torch  # pylint: disable=g-import-not-at-top  (optional dependency; callers import it first, with advice)
  out = {}
  for name, value in state.items():
    if not isinstance(value, torch.Tensor):
      raise error(f"{where}: entry {name!r} is a {type(value).__name__}, not a tensor")
    value = value.detach().cpu()
    out[name] = value.float().numpy() if value.is_floating_point() else value.numpy()
  return out


def listing(keys: Iterable[str]) -> str:
  """Sorted keys, comma-separated, at most MAX_LISTED of them and the count when there are more."""
  keys = sorted(keys)
  shown = ", ".join(keys[:MAX_LISTED])
  return shown + (f", ... ({len(keys)} in all)" if len(keys) > MAX_LISTED else "")


def key_problems(missing: Iterable[str], unexpected: Iterable[str], mis_shaped: Iterable[str]) -> list[str]:
  """The parts of a conversion error about keys: missing and unexpected keys, and 'key: shape (expected ...)' lines."""
  missing, unexpected, mis_shaped = list(missing), list(unexpected), list(mis_shaped)
  problems = []
  if missing:
    problems.append(f"missing keys: {listing(missing)}")
  if unexpected:
    problems.append(f"unexpected keys: {listing(unexpected)}")
  if mis_shaped:
    problems.append("mis-shaped keys: " + "; ".join(sorted(mis_shaped)[:MAX_LISTED]))
  return problems
