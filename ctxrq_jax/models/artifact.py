"""The stage-1 artifact (an RQ-VAE's model config and variables on disk) and the one codes -> images decoder.

A *stage-1 artifact* is a directory written by `save_artifact(dir, model_config, variables)` and read by
`load_artifact(dir) -> (RQVAE, variables)`: the stage-1 trainer and the converter write it; encoding, stage 2 and
sampling read it. `CodeDecoder` turns code stacks into images for every caller (sampling, `encode decode`,
evaluation), in fixed-size jitted batches.

  dir/model_config.json   {"format": "ctxrq_jax.rqvae/1", "model": <the model section of the stage-1 config>}
  dir/variables/          orbax checkpoint of {'params', 'quantizer'}
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ctxrq_jax.core import config as configlib
from ctxrq_jax.core import grids
from ctxrq_jax.core import paths
from ctxrq_jax.models.rqvae import RQVAE
from ctxrq_jax.models import variables_files
from ctxrq_jax.models.rqvae import abstract_variables

ARTIFACT_FORMAT = "ctxrq_jax.rqvae/1"
_CONFIG_FILE = "model_config.json"


def _config_to_dict(model_config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
  if isinstance(model_config, ml_collections.ConfigDict):
    d = model_config.to_dict()
  else:
    d = dict(model_config)
  # Round-trip through JSON now so an unserializable value fails at save time, naming nothing half-written.
  return json.loads(json.dumps(d))


def save_artifact(
    directory: str | os.PathLike, model_config: ml_collections.ConfigDict | Mapping[str, Any],
    variables: Mapping[str, Any], *, overwrite: bool = False,
) -> None:
  """Writes a stage-1 artifact: `directory/model_config.json` and an orbax checkpoint `directory/variables`.

  Args:
    directory: target directory (created).
    model_config: the `model` section of the RQ-VAE config (must build a model whose variables match `variables`).
    variables: {'params', 'quantizer'} (other collections are dropped).
    overwrite: replace an existing artifact instead of raising.
  """
  directory = paths.name(directory)
  cfg = _config_to_dict(model_config)
  model = RQVAE.from_config(cfg)
  for c in ("params", "quantizer"):
    if c not in variables:
      raise ValueError(f"save_artifact: variables have no {c!r} collection (have {sorted(variables)})")
  state = {"params": variables["params"], "quantizer": variables["quantizer"]}
  expected = abstract_variables(model)
  _check_tree_matches(state, expected, f"save_artifact({directory})")
  variables_files.save(directory, state, meta_file=_CONFIG_FILE, meta={"format": ARTIFACT_FORMAT, "model": cfg},
                       what="stage-1 artifact", overwrite=overwrite)


def _check_tree_matches(tree: Any, expected: Any, where: str) -> None:
  variables_files.check_tree_shapes(tree, expected, where, "variables do not match the model config")


def check_code_range(codes: np.ndarray, codebook_size: int) -> None:
  """Raises ValueError unless every code lies in [0, K): out-of-range ids would decode to silent garbage."""
  if codes.size and (codes.min() < 0 or codes.max() >= codebook_size):
    raise ValueError(f"codes must lie in [0, {codebook_size}) (the codebook size K), got range "
                     f"[{codes.min()}, {codes.max()}]")


def load_artifact(directory: str | os.PathLike) -> tuple[RQVAE, dict[str, Any]]:
  """Reads a stage-1 artifact written by `save_artifact`.

  Returns:
    (model, variables) with variables = {'params', 'quantizer'} as jax arrays. The model's convolutions and attention
    run at 'highest' (float32) matmul precision: encoding, decoding and evaluation then give the same codes and pixels
    on every backend, instead of depending on its default (one bfloat16 pass on a TPU, which moves the latents and
    so the codes; TF32 on the A100s the official code ran on).

  Raises:
    FileNotFoundError / ValueError naming the path and what is missing or wrong.
  """
  directory = paths.name(directory)
  if not paths.path(directory).is_dir():
    raise FileNotFoundError(f"stage-1 artifact directory {directory} does not exist")
  cfg_path, meta = variables_files.read_meta(directory, _CONFIG_FILE, ARTIFACT_FORMAT, section="model",
                                             missing=f"stage-1 artifact {directory} has no {_CONFIG_FILE}",
                                             label="stage-1 artifact config", prefix="stage-1 artifact config ")
  try:
    model = RQVAE.from_config(meta["model"]).clone(precision="highest")
  except configlib.ConfigError as e:
    raise ValueError(f"stage-1 artifact config {cfg_path} is invalid: {e}") from e
  abstract = abstract_variables(model)
  variables = variables_files.restore(directory, abstract, what="stage-1 artifact",
                                      label="stage-1 artifact checkpoint")
  _check_tree_matches(variables, abstract, f"load_artifact({directory})")
  return model, {"params": variables["params"], "quantizer": variables["quantizer"]}


class CodeDecoder:
  """codes int [M, h, w, D] (or [M, N, D]) -> images, `batch_size` stacks per jitted call (one compiled shape).

  Args:
    artifact: a stage-1 artifact directory, or an (RQVAE, variables) pair already loaded.
    batch_size: stacks decoded per call; the last chunk is padded with code 0 and trimmed.
  """

  def __init__(self, artifact: str | os.PathLike | tuple[RQVAE, Mapping[str, Any]], *, batch_size: int = 100):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.model, self.variables = (load_artifact(artifact) if isinstance(artifact, (str, os.PathLike))
                                  else artifact)
    self.batch_size = int(batch_size)
    model = self.model
    self._fn = jax.jit(lambda v, c: jnp.clip(model.apply(v, c, method=RQVAE.decode_codes), -1.0, 1.0))

  @property
  def code_shape(self) -> tuple[int, int, int]:
    return self.model.code_shape

  def _check(self, codes: Any) -> np.ndarray:
    codes = np.asarray(codes)
    h, w, d = self.model.code_shape
    if codes.ndim not in (3, 4) or codes.shape[-1] != d or int(np.prod(codes.shape[1:-1])) != h * w:
      raise ValueError(f"codes must be [M, {h}, {w}, {d}] or [M, {h * w}, {d}] for this RQ-VAE, got {codes.shape}")
    if not np.issubdtype(codes.dtype, np.integer):
      raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
    check_code_range(codes, self.model.codebook_size)
    return codes.reshape((-1, h, w, d))

  def batches(self, codes: Any) -> Iterator[tuple[int, np.ndarray]]:
    """Yields (start index, float32 images [b, R, R, C] in [-1, 1]) chunk by chunk."""
    codes = self._check(codes)
    for i in range(0, codes.shape[0], self.batch_size):
      chunk = codes[i:i + self.batch_size]
      pad = self.batch_size - chunk.shape[0]
      padded = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)]) if pad else chunk
      yield i, np.asarray(self._fn(self.variables, jnp.asarray(padded, jnp.int32)))[:chunk.shape[0]]

  def images(self, codes: Any, *, uint8: bool = False, out: Optional[np.ndarray] = None) -> np.ndarray:
    """All images: float32 [M, R, R, C] in [-1, 1], or uint8 with `uint8`.

    With `out` (e.g. a uint8 memmap [M, R, R, C']) the images go straight there, chunk by chunk (grey images are
    repeated to C' = 3 channels), so host memory stays at one chunk whatever M is.
    """
    chunks = []
    for i, x in self.batches(codes):
      x = grids.to_uint8(x) if (uint8 or out is not None) else x
      if out is not None:
        out[i:i + len(x)] = x if out.shape[-1] == x.shape[-1] else np.repeat(x, out.shape[-1], axis=-1)
      else:
        chunks.append(x)
    if out is not None:
      return out
    if not chunks:
      raise ValueError("no codes to decode")
    return np.concatenate(chunks)
