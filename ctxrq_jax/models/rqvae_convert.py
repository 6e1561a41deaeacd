"""Converts released PyTorch RQ-VAE checkpoints (kakaobrain/rq-vae-transformer) into stage-1 artifacts.

The command is `python -m ctxrq_jax.convert rqvae --checkpoint=PATH/model.pt --out=DIR [--use_ema] [--allow_pickle]`.

The checkpoint is a `torch.save` dict with `state_dict` (and optionally `state_dict_ema`; a reference trainer file
also holds optimizer state, which needs --allow_pickle and is read with stand-ins for modules not installed); the
reference `config.yaml` beside it (`arch.type: rq-vae`, `arch.hparams`, `arch.ddconfig`) gives the architecture. The
output is a stage-1 artifact (`artifact.save_artifact`) plus `conversion.json` recording the source and the
reference's stage-1 training hyperparameters.

The mapping is explicit and total: every checkpoint key must be consumed and every model variable filled, with
exactly matching shapes, or the conversion stops with an error naming the keys. Layout changes:
  conv weight OIHW -> kernel HWIO; Linear weight (out, in) -> kernel (in, out); GroupNorm weight -> scale;
  quantizer.codebooks.{0..D-1}.weight [K+1, n_z] (one shared module listed D times) -> quantizer/codebook [K, n_z]
  without the zero padding row; its cluster_size_ema / embed_ema -> quantizer/{cluster_size_ema, embed_ema}.

torch is needed only to read `.pt` files and is imported lazily; `convert_state_dict` works on numpy arrays.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import types
from typing import Any, Callable, Mapping, Sequence

from flax import traverse_util
import flax.core
import jax
import ml_collections
import numpy as np

from ctxrq_jax.core import config as configlib
from ctxrq_jax.core import paths
from ctxrq_jax.models import artifact
from ctxrq_jax.models import rq
from ctxrq_jax.models import rqvae
from ctxrq_jax.models import torch_layout

CONVERSION_FILE = "conversion.json"
_MAX_LISTED = 20  # keys listed per category in an error message


class ConversionError(ValueError):
  """A checkpoint or config that cannot be converted; the message names the file, key or shape at fault."""


# ----------------------------------------------------------------------------------------------------------------
# Reference config.yaml -> our model config.


def _get(d: Mapping[str, Any], key: str, where: str) -> Any:
  if not isinstance(d, Mapping) or key not in d:
    raise ConversionError(f"reference config has no {where}.{key}")
  return d[key]


def _int_list(value: Any, key: str) -> list[int]:
  if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
    raise ConversionError(f"reference config {key} must be a list of integers, got {value!r}")
  return [int(v) for v in value]


def _int(value: Any, key: str) -> int:
  if not isinstance(value, int) or isinstance(value, bool):
    raise ConversionError(f"reference config {key} must be an integer, got {value!r}")
  return int(value)


def model_config_from_reference(config: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Maps a reference RQ-VAE config (the parsed config.yaml) to the `model` section of our stage-1 config.

  Args:
    config: dict with `arch.type == 'rq-vae'`, `arch.hparams` (embed_dim, n_embed, latent_shape, code_shape,
      shared_codebook, ...) and `arch.ddconfig` (ch, ch_mult, num_res_blocks, attn_resolutions, z_channels,
      in_channels, out_ch, resolution, dropout, double_z).

  Returns:
    ConfigDict with the keys `rqvae.RQVAE.from_config` reads.

  Raises:
    ConversionError naming the key that is missing, malformed or describes a model we do not implement.
  """
  arch = _get(config, "arch", "<root>")
  arch_type = _get(arch, "type", "arch")
  if str(arch_type).lower() != "rq-vae":
    raise ConversionError(f"reference config arch.type is {arch_type!r}; only 'rq-vae' (stage 1) can be converted")
  hp = _get(arch, "hparams", "arch")
  dd = _get(arch, "ddconfig", "arch")
  if hp.get("bottleneck_type", "rq") != "rq":
    raise ConversionError(f"arch.hparams.bottleneck_type is {hp['bottleneck_type']!r}; only 'rq' is supported")
  # The reference Encoder defaults double_z to True (conv_out with 2 z_channels), which its RQ-VAE cannot use.
  if dd.get("double_z", True):
    raise ConversionError("arch.ddconfig.double_z must be false (absent means true in the reference)")
  if not dd.get("resamp_with_conv", True):
    raise ConversionError("arch.ddconfig.resamp_with_conv=false (average-pool resampling) is not supported")
  if not _get(hp, "shared_codebook", "arch.hparams"):
    raise ConversionError("arch.hparams.shared_codebook is false: separate codebooks per depth are not supported")

  ch_mult = _int_list(_get(dd, "ch_mult", "arch.ddconfig"), "arch.ddconfig.ch_mult")
  resolution = _int(_get(dd, "resolution", "arch.ddconfig"), "arch.ddconfig.resolution")
  embed_dim = _int(_get(hp, "embed_dim", "arch.hparams"), "arch.hparams.embed_dim")
  code_shape = _int_list(_get(hp, "code_shape", "arch.hparams"), "arch.hparams.code_shape")
  latent_shape = _int_list(_get(hp, "latent_shape", "arch.hparams"), "arch.hparams.latent_shape")
  if len(code_shape) != 3 or len(latent_shape) != 3:
    raise ConversionError(f"arch.hparams.code_shape {code_shape} and latent_shape {latent_shape} must be [h, w, d]")
  latent = resolution // 2 ** (len(ch_mult) - 1) if ch_mult else 0
  if code_shape[:2] != [latent, latent] or latent_shape[:2] != [latent, latent]:
    raise ConversionError(
        f"arch.hparams.code_shape {code_shape} / latent_shape {latent_shape} must both be {latent}x{latent} "
        f"(resolution {resolution} / 2^(len(ch_mult)-1)); spatially folded codes are not supported")
  if latent_shape[2] != embed_dim:
    raise ConversionError(f"arch.hparams.latent_shape[2] = {latent_shape[2]} != embed_dim = {embed_dim}")
  n_embed = _get(hp, "n_embed", "arch.hparams")
  if isinstance(n_embed, (list, tuple)):
    raise ConversionError(f"arch.hparams.n_embed {n_embed!r}: per-depth codebook sizes are not supported")
  dropout = dd.get("dropout", 0.0)
  if not isinstance(dropout, (int, float)) or isinstance(dropout, bool):
    raise ConversionError(f"arch.ddconfig.dropout must be a number, got {dropout!r}")

  m = ml_collections.ConfigDict()
  m.resolution = resolution
  m.in_channels = _int(_get(dd, "in_channels", "arch.ddconfig"), "arch.ddconfig.in_channels")
  m.out_channels = _int(_get(dd, "out_ch", "arch.ddconfig"), "arch.ddconfig.out_ch")
  m.ch = _int(_get(dd, "ch", "arch.ddconfig"), "arch.ddconfig.ch")
  m.ch_mult = tuple(ch_mult)
  m.num_res_blocks = _int(_get(dd, "num_res_blocks", "arch.ddconfig"), "arch.ddconfig.num_res_blocks")
  m.attn_resolutions = tuple(
      _int_list(_get(dd, "attn_resolutions", "arch.ddconfig"), "arch.ddconfig.attn_resolutions"))
  m.dropout = float(dropout)
  m.norm_groups = 32  # hard-coded in the reference's Normalize
  m.z_channels = _int(_get(dd, "z_channels", "arch.ddconfig"), "arch.ddconfig.z_channels")
  m.embed_dim = embed_dim
  m.codebook_size = _int(n_embed, "arch.hparams.n_embed")
  m.code_depth = code_shape[2]
  m.dtype = "float32"
  m.quant_chunk_size = rq.DEFAULT_CHUNK_SIZE
  try:
    rqvae.RQVAE.from_config(m)
  except configlib.ConfigError as e:
    raise ConversionError(f"reference config describes an unsupported model: {e}") from e
  return m


def reference_training_hparams(config: Mapping[str, Any]) -> dict[str, Any]:
  """The reference's stage-1 training settings that are not part of the model (kept for provenance)."""
  hp = config.get("arch", {}).get("hparams", {})
  keys = ("decay", "restart_unused_codes", "latent_loss_weight", "loss_type")
  return {k: hp[k] for k in keys if k in hp and isinstance(hp[k], (int, float, str, bool))}


def read_reference_config(path: str | os.PathLike) -> dict[str, Any]:
  """Parses a reference config.yaml (plain YAML as written by OmegaConf)."""
  import yaml  # pylint: disable=g-import-not-at-top  (only the converter needs it)

  path = os.fspath(path)
  if not paths.path(path).exists():
    raise ConversionError(f"reference config {path} does not exist (it must lie beside the checkpoint)")
  try:
    config = yaml.safe_load(paths.path(path).read_text())
  except (OSError, yaml.YAMLError) as e:
    raise ConversionError(f"reference config {path} is not readable YAML: {e}") from e
  if not isinstance(config, dict):
    raise ConversionError(f"reference config {path} is not a YAML mapping")
  return config


# ----------------------------------------------------------------------------------------------------------------
# The key mapping (target variable -> checkpoint keys).

_LEVEL = re.compile(r"^(down|up)_(\d+)$")
_LIST_ITEM = re.compile(r"^(block|attn)_(\d+)$")


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One target variable and the checkpoint key(s) it is built from."""

  target: tuple[str, ...]  # (collection, *module path, leaf)
  shape: tuple[int, ...]  # target shape
  dtype: Any
  sources: tuple[str, ...]  # several only for the per-depth copies of the shared codebook
  kind: str  # 'conv', 'dense', 'copy', 'codebook'

  def source_shape(self) -> tuple[int, ...]:
    """The shape each source must have, in PyTorch layout."""
    if self.kind == "codebook":
      return (self.shape[0] + 1, self.shape[1])
    return torch_layout.torch_shape(self.shape, self.kind)


def _torch_module_path(path: Sequence[str]) -> str:
  """('encoder', 'down_0', 'block_1', 'conv1') -> 'encoder.down.0.block.1.conv1'.

  Only the level lists (`down_i`, `up_i`) and the `block_j` / `attn_j` lists inside a level are PyTorch
  ModuleLists; `mid.block_1` / `mid.attn_1` are plain attribute names and stay as they are.
  """
  parts = []
  for i, name in enumerate(path):
    in_level = i > 0 and _LEVEL.match(path[i - 1]) is not None
    m = _LEVEL.match(name) or (_LIST_ITEM.match(name) if in_level else None)
    parts.append(f"{m.group(1)}.{m.group(2)}" if m else name)
  return ".".join(parts)


def _params_entry(path: tuple[str, ...], leaf: jax.ShapeDtypeStruct) -> _Entry:
  *modules, name = path
  prefix = _torch_module_path(modules)
  if name == "bias":
    return _Entry(("params", *path), tuple(leaf.shape), leaf.dtype, (f"{prefix}.bias",), "copy")
  if name == "scale":  # GroupNorm affine weight
    return _Entry(("params", *path), tuple(leaf.shape), leaf.dtype, (f"{prefix}.weight",), "copy")
  if name == "kernel" and len(leaf.shape) == 4:
    return _Entry(("params", *path), tuple(leaf.shape), leaf.dtype, (f"{prefix}.weight",), "conv")
  if name == "kernel" and len(leaf.shape) == 2:
    return _Entry(("params", *path), tuple(leaf.shape), leaf.dtype, (f"{prefix}.weight",), "dense")
  raise ConversionError(f"no PyTorch counterpart known for model parameter {'/'.join(path)} {tuple(leaf.shape)}")


def _quantizer_entry(name: str, leaf: jax.ShapeDtypeStruct, depth: int) -> _Entry:
  torch_name = {"codebook": "weight", "cluster_size_ema": "cluster_size_ema", "embed_ema": "embed_ema"}.get(name)
  if torch_name is None:
    raise ConversionError(f"no PyTorch counterpart known for quantizer variable {name} {tuple(leaf.shape)}")
  sources = tuple(f"quantizer.codebooks.{d}.{torch_name}" for d in range(depth))
  kind = "codebook" if name == "codebook" else "copy"
  return _Entry(("quantizer", name), tuple(leaf.shape), leaf.dtype, sources, kind)


def _plan(model_cfg: ml_collections.ConfigDict | Mapping[str, Any]) -> list[_Entry]:
  """Every target variable of the model `model_cfg` builds, with its checkpoint keys (shapes only, no arrays)."""
  model = rqvae.RQVAE.from_config(model_cfg)
  abstract = rqvae.abstract_variables(model)
  entries = []
  for collection in ("params", "quantizer"):
    flat = traverse_util.flatten_dict(flax.core.unfreeze(abstract[collection]))
    for path, leaf in sorted(flat.items()):
      if collection == "params":
        entries.append(_params_entry(path, leaf))
      elif len(path) == 1:
        entries.append(_quantizer_entry(path[0], leaf, model.code_depth))
      else:
        raise ConversionError(f"unexpected nested quantizer variable {'/'.join(path)}")
  extra = set(abstract) - {"params", "quantizer"}
  if extra:
    raise ConversionError(f"model has variable collections {sorted(extra)} the converter does not know")
  # Two variables read from one key would mean the naming rule broke; the "consumed" check could not see it.
  seen: dict[str, tuple[str, ...]] = {}
  for e in entries:
    for src in e.sources:
      if src in seen:
        raise ConversionError(f"{'/'.join(e.target)} and {'/'.join(seen[src])} both map to checkpoint key {src}")
      seen[src] = e.target
  return entries


def reference_state_dict_shapes(model_cfg: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  """The checkpoint keys (and PyTorch-layout shapes) a reference checkpoint for `model_cfg` must have.

  Computed from shapes alone (`jax.eval_shape`), so it is cheap even for the 100M-parameter ImageNet model.
  """
  return {src: e.source_shape() for e in _plan(model_cfg) for src in e.sources}


def _listing(keys: Sequence[str]) -> str:
  keys = sorted(keys)
  shown = ", ".join(keys[:_MAX_LISTED])
  return shown + (f", ... ({len(keys)} in all)" if len(keys) > _MAX_LISTED else "")


def _strip_module_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Drops the `module.` prefix that (Distributed)DataParallel / EMA wrappers add."""
  out: dict[str, Any] = {}
  for key, value in state_dict.items():
    if not isinstance(key, str):
      raise ConversionError(f"state dict key {key!r} is not a string")
    name = key[len("module."):] if key.startswith("module.") else key
    if name in out:
      raise ConversionError(f"state dict has both {name!r} and 'module.{name}'")
    out[name] = value
  return out


def _as_array(key: str, value: Any) -> np.ndarray:
  arr = np.asarray(value)
  if arr.dtype.kind not in "fiu":
    raise ConversionError(f"state dict entry {key} has non-numeric dtype {arr.dtype}")
  return arr


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray], model_cfg: ml_collections.ConfigDict | Mapping[str, Any]
) -> dict[str, Any]:
  """Maps a reference RQ-VAE state dict (numpy arrays, PyTorch layouts) to RQVAE variables.

  Args:
    state_dict: checkpoint key -> array, e.g. `encoder.down.0.block.0.conv1.weight` [O, I, kH, kW]; a leading
      `module.` is stripped.
    model_cfg: the `model` section of our stage-1 config (see `model_config_from_reference`).

  Returns:
    {'params': nested dict, 'quantizer': {'codebook' [K, n_z], 'cluster_size_ema' [K], 'embed_ema' [K, n_z]}} of
    numpy arrays in the model's parameter dtype, ready for `artifact.save_artifact` or `RQVAE.apply`.

  Raises:
    ConversionError naming the missing and unexpected keys, every shape mismatch (key, checkpoint shape, expected
    shape), a codebook whose padding row is not a zero last row, or per-depth codebook copies that differ.
  """
  try:
    plan = _plan(model_cfg)
  except configlib.ConfigError as e:
    raise ConversionError(f"invalid model config: {e}") from e
  source = _strip_module_prefix(state_dict)
  needed = {src for e in plan for src in e.sources}
  missing, unexpected = needed - set(source), set(source) - needed
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f"missing keys: {_listing(list(missing))}")
    if unexpected:
      parts.append(f"unexpected keys: {_listing(list(unexpected))}")
    raise ConversionError("state dict does not match the model config; " + "; ".join(parts))

  arrays = {key: _as_array(key, value) for key, value in source.items()}
  bad_shapes = [
      f"{src}: checkpoint shape {tuple(arrays[src].shape)} != expected {e.source_shape()}"
      for e in plan for src in e.sources if tuple(arrays[src].shape) != e.source_shape()
  ]
  if bad_shapes:
    raise ConversionError("state dict shapes do not match the model config: " + "; ".join(bad_shapes))

  flat: dict[tuple[str, ...], np.ndarray] = {}
  for e in plan:
    first = arrays[e.sources[0]]
    for other in e.sources[1:]:
      if not np.array_equal(arrays[other], first):
        diff = float(np.max(np.abs(arrays[other].astype(np.float64) - first.astype(np.float64))))
        raise ConversionError(
            f"shared codebook copies differ: {other} != {e.sources[0]} (max abs difference {diff:g}); the "
            "reference shares one codebook across depths, so this checkpoint is not a shared-codebook RQ-VAE")
    flat[e.target] = _TRANSFORMS[e.kind](e.sources[0], first).astype(e.dtype)
  variables = traverse_util.unflatten_dict(flat)
  return {"params": variables["params"], "quantizer": variables["quantizer"]}


def _drop_padding_row(key: str, weight: np.ndarray) -> np.ndarray:
  # nn.Embedding(K + 1, padding_idx=K): the padding row is zero-initialized and never updated by the EMA.
  if np.any(weight[-1] != 0):
    raise ConversionError(
        f"{key}: the last row (the padding index) is not zero (max abs {float(np.max(np.abs(weight[-1]))):g}); "
        "expected the reference layout [K + 1, n_z] with the padding row last")
  return np.ascontiguousarray(weight[:-1])


_TRANSFORMS: dict[str, Callable[[str, np.ndarray], np.ndarray]] = {
    "copy": lambda key, a: np.array(a),
    "conv": lambda key, a: torch_layout.to_flax(a, "conv"),  # OIHW -> HWIO
    "dense": lambda key, a: torch_layout.to_flax(a, "dense"),  # (out, in) -> (in, out)
    "codebook": _drop_padding_row,
}


# ----------------------------------------------------------------------------------------------------------------
# Reading checkpoints and the command line.


class _StandIn:
  """An inert object unpickled in place of a global whose module is not installed (or lacks it): it takes any
  constructor arguments, state, items and appended elements and keeps none of them."""

  def __init__(self, *args, **kwargs):  # (object.__new__ takes the arguments too, as __init__ is overridden)
    del args, kwargs

  def __setstate__(self, state):
    del state

  def __setitem__(self, key, value):
    del key, value

  def append(self, value):
    del value

  def extend(self, values):
    del values


def _standin_pickle_module(replaced: dict[str, type]) -> types.ModuleType:
  """A `pickle_module` for `torch.load` whose Unpickler resolves every importable global as usual and replaces one
  that cannot be imported by a `_StandIn` subclass named after it, recorded in `replaced` ('module.name' -> class).

  torch.load subclasses `pickle_module.Unpickler` (for zip and legacy files alike) and its `find_class` defers to
  this one for everything but storage types.
  """

  class Unpickler(pickle.Unpickler):

    def find_class(self, module, name):
      try:
        return super().find_class(module, name)
      except (ImportError, AttributeError):  # ModuleNotFoundError is an ImportError
        qualified = f"{module}.{name}"
        if qualified not in replaced:
          replaced[qualified] = type(f"stand-in for {qualified}", (_StandIn,), {"__module__": __name__})
        return replaced[qualified]

  module = types.ModuleType("ctxrq_jax_standin_pickle")
  module.Unpickler = Unpickler
  module.load = pickle.load  # torch reads a legacy file's header records with pickle_module.load
  module.loads = pickle.loads
  module.UnpicklingError = pickle.UnpicklingError
  return module


def _load_error_text(e: Exception) -> str:
  """`type: message` of a torch.load failure on one line (torch's weights-only message spans paragraphs: keep its
  WeightsUnpickler line's first sentence)."""
  text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
  found = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
  if found:
    text = found.group(1).split(". ")[0].rstrip(".")
  return f"{type(e).__name__}: {' '.join(text.split())}"


def load_torch_state_dict(
    path: str | os.PathLike, *, use_ema: bool = False, allow_pickle: bool = False
) -> dict[str, np.ndarray]:
  """Reads `state_dict` (or `state_dict_ema`) of a reference `torch.save` checkpoint as float numpy arrays.

  Args:
    path: the `.pt` file.
    use_ema: read `state_dict_ema` instead of `state_dict`.
    allow_pickle: unpickle arbitrary objects (`weights_only=False`); only for checkpoints you trust whose extra
      entries the safe loader rejects, such as the reference trainer's `model.pt` with its optimizer state. A global
      the file names whose module is not installed (the reference's optimizer state holds omegaconf objects) is
      replaced by an inert stand-in; only the state dict is used.
  """
  path = os.fspath(path)
  try:
    import torch  # pylint: disable=g-import-not-at-top  (optional dependency)
  except ImportError as e:
    raise ConversionError(
        "reading PyTorch checkpoints needs torch: pip install 'ctxrq_jax[torch]' (CPU wheels suffice)") from e
  if not paths.path(path).exists():
    raise ConversionError(f"checkpoint {path} does not exist")
  replaced: dict[str, type] = {}
  load_args: dict[str, Any] = (
      {"weights_only": False, "pickle_module": _standin_pickle_module(replaced)} if allow_pickle
      else {"weights_only": True})
  try:  # torch.load needs a local file: a bucket's checkpoint is fetched once
    ckpt = torch.load(paths.local_copy(path), map_location="cpu", **load_args)
  except Exception as e:  # torch raises assorted types (UnpicklingError, RuntimeError, EOFError) for bad files
    if allow_pickle:
      hint = f" (read with stand-ins for {', '.join(sorted(replaced))})" if replaced else ""
    else:
      hint = (" (if the file is trusted and holds non-tensor objects, as a reference trainer checkpoint with optimizer "
              "state does, pass --allow_pickle; modules it names that are not installed, e.g. omegaconf, are then "
              "replaced by inert stand-ins)")
    raise ConversionError(f"checkpoint {path} could not be read as a torch checkpoint: "
                          f"{_load_error_text(e)}{hint}") from e
  if not isinstance(ckpt, Mapping):
    raise ConversionError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a dict with 'state_dict'")
  key = "state_dict_ema" if use_ema else "state_dict"
  if key not in ckpt:
    raise ConversionError(f"checkpoint {path} has no {key!r} (has {sorted(map(str, ckpt))})")
  state = ckpt[key]
  if not isinstance(state, Mapping):
    raise ConversionError(f"checkpoint {path}: {key!r} is a {type(state).__name__}, not a state dict")
  return torch_layout.tensors_to_numpy(state, f"checkpoint {path}: {key}", ConversionError)


def run(
    checkpoint: str | os.PathLike, out: str | os.PathLike, *, use_ema: bool = False,
    config_path: str | os.PathLike | None = None, allow_pickle: bool = False, overwrite: bool = False,
) -> ml_collections.ConfigDict:
  """Converts a reference checkpoint into a stage-1 artifact at `out`; returns the model config written.

  Args:
    checkpoint: reference `.pt` file.
    out: artifact directory to write.
    use_ema: convert `state_dict_ema` instead of `state_dict`.
    config_path: reference config.yaml; default: `config.yaml` beside the checkpoint.
    allow_pickle: see `load_torch_state_dict`.
    overwrite: replace an existing artifact.
  """
  checkpoint = paths.name(checkpoint)
  if not paths.path(checkpoint).is_file():
    raise ConversionError(f"checkpoint {checkpoint} does not exist")
  if config_path is None:
    config_path = str(paths.path(checkpoint).parent / "config.yaml")
  ref_config = read_reference_config(config_path)
  model_cfg = model_config_from_reference(ref_config)
  state_dict = load_torch_state_dict(checkpoint, use_ema=use_ema, allow_pickle=allow_pickle)
  try:
    variables = convert_state_dict(state_dict, model_cfg)
  except ConversionError as e:
    raise ConversionError(f"{checkpoint}: {e}") from e
  artifact.save_artifact(out, model_cfg, variables, overwrite=overwrite)
  if jax.process_index() == 0:
    record = {
        "source_checkpoint": checkpoint,
        "source_config": paths.name(config_path),
        "state_dict": "state_dict_ema" if use_ema else "state_dict",
        "reference_training_hparams": reference_training_hparams(ref_config),
    }
    paths.write_json(paths.path(out) / CONVERSION_FILE, record, indent=2, sort_keys=True)
  return model_cfg
