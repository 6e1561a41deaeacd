"""pytorch-fid's released FID Inception weights -> `FIDInceptionV3` variables, and their artifact on disk.

The weights file is `pt_inception-2015-12-05-6726825d.pth` from pytorch-fid's GitHub release (WEIGHTS_URL), a
`torch.save`d state dict of the network built by `fid_inception_v3()` (the 2015-12-05 TensorFlow Inception graph
ported to PyTorch). Nothing here downloads it: `require_weights_file` stops with an error naming the file and where to
get it.

The key mapping is explicit and total: every state-dict key is consumed and every variable filled with exactly the
shape expected, or `InceptionConversionError` names the missing, unexpected and mis-shaped keys.

  <module>.conv.weight [O, I, kH, kW]   -> params/<module>/conv/kernel [kH, kW, I, O]
  <module>.bn.weight / .bn.bias         -> params/<module>/bn/scale / bias
  <module>.bn.running_mean / _var       -> batch_stats/<module>/bn/mean / var
  <module>.bn.num_batches_tracked       -> (optional; training bookkeeping, dropped)
  fc.weight [1008, 2048] / fc.bias      -> params/fc/kernel [2048, 1008] / bias
where <module> is the PyTorch module path with '/' for '.' (`Mixed_6d.branch7x7_2` -> `Mixed_6d/branch7x7_2`).

An *Inception artifact* is a directory:
  dir/inception.json   {"format": "ctxrq_jax.fid_inception/1", "source": ..., "sha256": ...}
  dir/variables/       orbax checkpoint of {'params', 'batch_stats'}

torch is needed only to read `.pth` files and is imported lazily; `convert_state_dict` works on numpy arrays.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from flax import traverse_util
import flax.core
import numpy as np

from ctxrq_jax.core import paths
from ctxrq_jax.models import inception
from ctxrq_jax.models import torch_layout
from ctxrq_jax.models import variables_files

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")
# torch.hub names files <name>-<first 8 hex digits of their SHA-256>.<ext>; the released file's digest starts so.
WEIGHTS_SHA256_PREFIX = "6726825d"
ARTIFACT_FORMAT = "ctxrq_jax.fid_inception/1"
_META_FILE = "inception.json"
_OPTIONAL_SUFFIX = ".num_batches_tracked"


class InceptionConversionError(ValueError):
  """A state dict or file that is not pytorch-fid's FID Inception; the message names the keys or file at fault."""


def weights_missing_message(path: str | os.PathLike) -> str:
  return (f"FID Inception weights not found at {os.fspath(path)}: download {WEIGHTS_FILENAME} from pytorch-fid's "
          f"GitHub release ({WEIGHTS_URL}), e.g. `wget {WEIGHTS_URL}`, and pass its path (or convert it once with "
          "`inception_convert.convert_file` and pass the artifact directory)")


def require_weights_file(path: str | os.PathLike) -> str:
  """Returns `path` as a string if it is a file; raises FileNotFoundError naming the weights file and its source."""
  return paths.require_file(path, WEIGHTS_FILENAME, weights_missing_message)


# ----------------------------------------------------------------------------------------------------------------
# The key mapping.


@dataclasses.dataclass(frozen=True)
class _Entry:
  target: tuple[str, ...]  # (collection, *module path, leaf)
  shape: tuple[int, ...]  # target shape (Flax layout)
  source: str  # state-dict key
  kind: str  # 'conv' (OIHW -> HWIO), 'dense' ((out, in) -> (in, out)) or 'copy'

  def source_shape(self) -> tuple[int, ...]:
    return torch_layout.torch_shape(self.shape, self.kind)


_LEAF_TO_TORCH = {
    ("params", "kernel", 4): ("weight", "conv"),
    ("params", "kernel", 2): ("weight", "dense"),
    ("params", "scale", 1): ("weight", "copy"),
    ("params", "bias", 1): ("bias", "copy"),
    ("batch_stats", "mean", 1): ("running_mean", "copy"),
    ("batch_stats", "var", 1): ("running_var", "copy"),
}


def _plan(abstract: Mapping[str, Any] | None = None) -> list[_Entry]:
  """Every variable of `abstract` (default: `FIDInceptionV3()`'s) with the state-dict key it comes from."""
  if abstract is None:
    abstract = _abstract_variables()
  extra = set(abstract) - {"params", "batch_stats"}
  if extra:
    raise InceptionConversionError(f"model has variable collections {sorted(extra)} the converter does not know")
  entries = []
  for collection in ("params", "batch_stats"):
    for path, leaf in sorted(traverse_util.flatten_dict(flax.core.unfreeze(abstract[collection])).items()):
      *modules, name = path
      rule = _LEAF_TO_TORCH.get((collection, name, len(leaf.shape)))
      if rule is None:
        raise InceptionConversionError(f"no PyTorch counterpart known for {collection}/{'/'.join(path)}")
      torch_leaf, kind = rule
      entries.append(_Entry((collection, *path), tuple(leaf.shape), ".".join([*modules, torch_leaf]), kind))
  sources = [e.source for e in entries]
  if len(set(sources)) != len(sources):
    raise InceptionConversionError("two variables map to one state-dict key; the naming rule is broken")
  return entries


def reference_state_dict_shapes() -> dict[str, tuple[int, ...]]:
  """The state-dict keys (PyTorch layouts) of pytorch-fid's FID Inception, `num_batches_tracked` excluded."""
  return {e.source: e.source_shape() for e in _plan()}


def convert_state_dict(state_dict: Mapping[str, Any], *, template: Mapping[str, Any] | None = None
                       ) -> dict[str, Any]:
  """pytorch-fid FID Inception state dict (numpy or torch arrays, PyTorch layouts) -> FIDInceptionV3 variables.

  Args:
    state_dict: key -> array, e.g. `Mixed_5b.branch1x1.conv.weight` [64, 192, 1, 1]; a leading `module.` (from
      DataParallel) is stripped; `*.num_batches_tracked` entries may be present or not.

  Returns:
    {'params': nested dict, 'batch_stats': nested dict} of float32 numpy arrays.

  Raises:
    InceptionConversionError naming every missing, unexpected and mis-shaped key.
  """
  arrays: dict[str, np.ndarray] = {}
  for key, value in state_dict.items():
    if not isinstance(key, str):
      raise InceptionConversionError(f"state dict key {key!r} is not a string")
    name = key[len("module."):] if key.startswith("module.") else key
    if name in arrays:
      raise InceptionConversionError(f"state dict has both {name!r} and 'module.{name}'")
    if hasattr(value, "detach"):  # a torch tensor
      value = value.detach().cpu().numpy()
    arrays[name] = np.asarray(value)
  plan = _plan(template)
  expected = {e.source for e in plan}
  missing = expected - set(arrays)
  unexpected = {k for k in set(arrays) - expected
                if not (k.endswith(_OPTIONAL_SUFFIX) and k[:-len(_OPTIONAL_SUFFIX)] + ".running_mean" in expected)}
  bad_shapes = [f"{e.source}: {tuple(arrays[e.source].shape)} (expected {e.source_shape()})"
                for e in plan if e.source in arrays and tuple(arrays[e.source].shape) != e.source_shape()]
  bad_dtypes = [f"{e.source}: dtype {arrays[e.source].dtype}" for e in plan
                if e.source in arrays and arrays[e.source].dtype.kind != "f"]
  problems = torch_layout.key_problems(missing, unexpected, bad_shapes)
  if bad_dtypes:
    problems.append("non-float keys: " + "; ".join(sorted(bad_dtypes)[:torch_layout.MAX_LISTED]))
  if problems:
    raise InceptionConversionError("not pytorch-fid's FID Inception state dict: " + " | ".join(problems))
  flat = {}
  for e in plan:
    flat[e.target] = torch_layout.to_flax(arrays[e.source].astype(np.float32), e.kind)
  variables = traverse_util.unflatten_dict(flat)
  return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


# ----------------------------------------------------------------------------------------------------------------
# Files.


def load_torch_state_dict(path: str | os.PathLike, *, check_hash: bool = True) -> dict[str, np.ndarray]:
  """Reads the released `.pth` (a plain state dict; `torch.load(weights_only=True)`) as numpy arrays.

  Args:
    path: the weights file, or a directory holding `pt_inception-2015-12-05-6726825d.pth`.
    check_hash: require the file's SHA-256 to start with 6726825d, as torch.hub does for the released file.

  Raises:
    FileNotFoundError naming the file and where to get it; InceptionConversionError for a corrupt file, a digest
    mismatch or content that is not a state dict.
  """
  path = require_weights_file(path)
  if check_hash:
    digest = paths.sha256(path)
    if not digest.startswith(WEIGHTS_SHA256_PREFIX):
      raise InceptionConversionError(
          f"{path}: SHA-256 {digest[:16]}... does not start with {WEIGHTS_SHA256_PREFIX}, so this is not the released "
          f"{WEIGHTS_FILENAME} (download it again from {WEIGHTS_URL}; check_hash=False skips this check)")
  try:
    import torch  # pylint: disable=g-import-not-at-top  (optional dependency)
  except ImportError as e:
    raise InceptionConversionError(
        "reading the .pth weights needs torch: pip install 'ctxrq_jax[torch]' (CPU wheels suffice)") from e
  try:
    state = torch.load(paths.local_copy(path), map_location="cpu", weights_only=True)  # a local file for torch
  except Exception as e:  # torch raises assorted types (UnpicklingError, RuntimeError, EOFError) for bad files
    raise InceptionConversionError(f"{path} could not be read as a torch state dict: {type(e).__name__}: {e}") from e
  if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
    state = state["state_dict"]
  if not isinstance(state, Mapping):
    raise InceptionConversionError(f"{path} holds a {type(state).__name__}, not a state dict")
  out = {}
  for name, value in state.items():
    if not isinstance(value, torch.Tensor):
      raise InceptionConversionError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
    out[name] = value.detach().cpu().numpy()
  return out


def _abstract_variables() -> dict[str, Any]:
  return inception.abstract_variables(inception.FIDInceptionV3())


def _check_tree(tree: Any, expected: Any, where: str) -> None:
  variables_files.check_tree_shapes(tree, expected, where, "variables are not FIDInceptionV3's")


def save_artifact(directory: str | os.PathLike, variables: Mapping[str, Any], *, source: str | None = None,
                  sha256: str | None = None, overwrite: bool = False) -> None:
  """Writes `directory/inception.json` and the orbax checkpoint `directory/variables` of {'params', 'batch_stats'}."""
  directory = paths.name(directory)
  for c in ("params", "batch_stats"):
    if c not in variables:
      raise ValueError(f"save_artifact: variables have no {c!r} collection (have {sorted(variables)})")
  state = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  _check_tree(state, _abstract_variables(), f"save_artifact({directory})")
  variables_files.save(directory, state, meta_file=_META_FILE,
                       meta={"format": ARTIFACT_FORMAT, "source": source, "sha256": sha256},
                       what="Inception artifact", overwrite=overwrite)


def load_artifact(directory: str | os.PathLike) -> dict[str, Any]:
  """Reads an Inception artifact; returns {'params', 'batch_stats'} as jax arrays.

  Raises:
    FileNotFoundError / ValueError naming the path and what is missing or wrong.
  """
  directory = paths.name(directory)
  variables_files.read_meta(directory, _META_FILE, ARTIFACT_FORMAT,
                            missing=f"{directory} is not an Inception artifact (no {_META_FILE})",
                            label="Inception artifact metadata")
  abstract = _abstract_variables()
  variables = variables_files.restore(directory, abstract, what="Inception artifact", label="Inception checkpoint")
  _check_tree(variables, abstract, f"load_artifact({directory})")
  return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


def convert_file(weights: str | os.PathLike, out: str | os.PathLike, *, check_hash: bool = True,
                 overwrite: bool = False) -> dict[str, Any]:
  """`pt_inception-2015-12-05-6726825d.pth` -> Inception artifact at `out`; returns the variables written."""
  path = paths.name(require_weights_file(weights))
  variables = convert_state_dict(load_torch_state_dict(path, check_hash=check_hash))
  save_artifact(out, variables, source=path, sha256=paths.sha256(path), overwrite=overwrite)
  return variables


def random_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
  """A pytorch-fid state dict of random weights (He-scaled convolutions, BatchNorm statistics near 1), for tests and
  benchmarks where the released file is absent: features vary with the images instead of collapsing."""
  rng = np.random.default_rng(seed)
  sd = {}
  for key, shape in reference_state_dict_shapes().items():
    if key.endswith("conv.weight") or key == "fc.weight":
      sd[key] = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[1:]))
    elif key.endswith("running_var") or key.endswith("bn.weight"):
      sd[key] = rng.uniform(0.5, 1.5, size=shape)
    else:
      sd[key] = rng.normal(size=shape) * 0.2
  return {k: v.astype(np.float32) for k, v in sd.items()}


def load_variables(source: str | os.PathLike, *, check_hash: bool = True) -> dict[str, Any]:
  """FIDInceptionV3 variables from an Inception artifact directory or straight from the released `.pth` file.

  A directory that is not an artifact but holds `pt_inception-2015-12-05-6726825d.pth` is read as that file.

  Raises:
    FileNotFoundError naming `pt_inception-2015-12-05-6726825d.pth` and pytorch-fid's release when neither exists.
  """
  source = os.fspath(source)
  if (paths.path(source) / _META_FILE).exists():
    return load_artifact(source)
  return convert_state_dict(load_torch_state_dict(source, check_hash=check_hash))
