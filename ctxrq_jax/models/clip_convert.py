"""OpenAI's released CLIP checkpoint -> `clip.CLIP` parameters, and the CLIP artifact on disk.

The weights file is OpenAI's `ViT-B-32.pt` (a TorchScript archive; open_clip and the `clip` package download it from
WEIGHTS_URL). Nothing here downloads it: `require_weights_file` stops with an error naming the file and where to get
it. A plain `torch.save`d state dict of the same keys (open_clip's `model.state_dict()` of a QuickGELU ViT CLIP)
reads too.

The key mapping is explicit and total: every state-dict key is consumed and every parameter filled with exactly the
shape expected, or `CLIPConversionError` names the missing, unexpected and mis-shaped keys. With P a tower prefix
(`visual.transformer.resblocks.N.` -> visual/transformer/resblocks_N, `transformer.resblocks.N.` ->
transformer/resblocks_N):

  visual.conv1.weight [W, 3, p, p]       -> visual/conv1/kernel [p, p, 3, W]
  visual.class_embedding, visual.positional_embedding, visual.proj [W, E]    -> the same names, as they are
  visual.ln_pre / visual.ln_post / ln_final .weight / .bias                  -> .../scale / bias
  P.ln_1 / P.ln_2 .weight / .bias                                            -> .../scale / bias
  P.attn.in_proj_weight [3W, W] / in_proj_bias   -> .../attn/in_proj/kernel [W, 3W] / bias
  P.attn.out_proj / P.mlp.c_fc / P.mlp.c_proj .weight [O, I] / .bias         -> .../attn/out_proj, c_fc, c_proj
                                                    kernel [I, O] / bias
  token_embedding.weight [V, W]          -> token_embedding/embedding
  positional_embedding, text_projection [W, E], logit_scale                  -> the same names, as they are
  input_resolution, context_length, vocab_size (scalars in OpenAI's archive), attn_mask (the causal mask of a
  TorchScript-traced open_clip model)                                        -> dropped

OpenAI stores most weights as float16; they are converted to float32 (as open_clip does on CPU).

A *CLIP artifact* is a directory:
  dir/clip.json      {"format": "ctxrq_jax.clip/1", "config": {...CLIPConfig}, "source": ..., "sha256": ...}
  dir/variables/     orbax checkpoint of {'params'}

torch is needed only to read `.pt` files and is imported lazily; `convert_state_dict` works on numpy arrays.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any, Mapping, Optional

from flax import traverse_util
import flax.core
import numpy as np

from ctxrq_jax.core import paths
from ctxrq_jax.models import clip
from ctxrq_jax.models import torch_layout
from ctxrq_jax.models import variables_files

WEIGHTS_FILENAME = "ViT-B-32.pt"
# OpenAI's URL carries the file's SHA-256 (open_clip `pretrained.py`, the `clip` package's `_MODELS`).
WEIGHTS_SHA256 = "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af"
WEIGHTS_URL = f"https://openaipublic.azureedge.net/clip/models/{WEIGHTS_SHA256}/{WEIGHTS_FILENAME}"
ARTIFACT_FORMAT = "ctxrq_jax.clip/1"
_META_FILE = "clip.json"
# Not weights: the scalars OpenAI's archive holds beside them (its own loader deletes them too), and the causal mask
# buffer a traced open_clip model adds.
_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")
OPENAI_HEAD_WIDTH = 64


class CLIPConversionError(ValueError):
  """A state dict or file that is not an OpenAI-format ViT CLIP; the message names the keys or file at fault."""


def weights_missing_message(path: str | os.PathLike) -> str:
  return (f"CLIP weights not found at {os.fspath(path)}: download OpenAI's {WEIGHTS_FILENAME} ({WEIGHTS_URL}, "
          "the file open_clip and the clip package load for ViT-B-32 / openai) and pass its path, or the directory "
          "written by `python -m ctxrq_jax.convert clip`")


def require_weights_file(path: str | os.PathLike) -> str:
  """`path` (or `path/ViT-B-32.pt` for a directory) as a string; FileNotFoundError naming the file otherwise."""
  return paths.require_file(path, WEIGHTS_FILENAME, weights_missing_message)


# ----------------------------------------------------------------------------------------------------------------
# The key mapping.


@dataclasses.dataclass(frozen=True)
class _Entry:
  target: tuple[str, ...]  # ('params', *module path, leaf)
  shape: tuple[int, ...]  # Flax layout
  source: str  # state-dict key
  kind: str  # 'conv' (OIHW -> HWIO), 'dense' ((out, in) -> (in, out)) or 'copy'

  def source_shape(self) -> tuple[int, ...]:
    return torch_layout.torch_shape(self.shape, self.kind)


def _torch_key(path: tuple[str, ...], ndim: int) -> tuple[str, str]:
  """(state-dict key, kind) of the Flax parameter at `path` (without the 'params' collection)."""
  *modules, leaf = path
  torch_modules = []
  for m in modules:
    block = re.fullmatch(r"resblocks_(\d+)", m)
    torch_modules += ["resblocks", block.group(1)] if block else [m]
  if torch_modules and torch_modules[-1] in ("c_fc", "c_proj"):
    torch_modules.insert(-1, "mlp")
  if torch_modules[-1:] == ["in_proj"]:  # nn.MultiheadAttention's packed projection: in_proj_weight, in_proj_bias
    torch_modules.pop()
    name = {"kernel": "in_proj_weight", "bias": "in_proj_bias"}[leaf]
    return ".".join([*torch_modules, name]), "dense" if leaf == "kernel" else "copy"
  if leaf == "kernel":
    return ".".join([*torch_modules, "weight"]), "conv" if ndim == 4 else "dense"
  if leaf in ("scale", "embedding"):
    return ".".join([*torch_modules, "weight"]), "copy"
  return ".".join([*torch_modules, leaf]), "copy"  # bias, and parameters named as torch names them


@functools.lru_cache(maxsize=8)
def _plan(config: clip.CLIPConfig) -> tuple[_Entry, ...]:
  abstract = clip.abstract_params(config)
  if set(abstract) != {"params"}:
    raise CLIPConversionError(f"model has variable collections {sorted(abstract)}; the converter knows 'params'")
  entries = []
  for path, leaf in sorted(traverse_util.flatten_dict(flax.core.unfreeze(abstract["params"])).items()):
    source, kind = _torch_key(path, len(leaf.shape))
    entries.append(_Entry(("params", *path), tuple(leaf.shape), source, kind))
  sources = [e.source for e in entries]
  if len(set(sources)) != len(sources):
    raise CLIPConversionError("two parameters map to one state-dict key; the naming rule is broken")
  return tuple(entries)


def reference_state_dict_shapes(config: clip.CLIPConfig = clip.VIT_B_32) -> dict[str, tuple[int, ...]]:
  """The state-dict keys (PyTorch layouts) of an OpenAI-format CLIP of `config`, metadata scalars excluded."""
  return {e.source: e.source_shape() for e in _plan(config)}


def _named(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """The state dict with a leading `module.` stripped from its keys and OpenAI's non-weight entries dropped; the
  values untouched (torch tensors or arrays)."""
  named: dict[str, Any] = {}
  for key, value in state_dict.items():
    if not isinstance(key, str):
      raise CLIPConversionError(f"state dict key {key!r} is not a string")
    name = key[len("module."):] if key.startswith("module.") else key
    if name in named:
      raise CLIPConversionError(f"state dict has both {name!r} and 'module.{name}'")
    if name not in _METADATA_KEYS:
      named[name] = value
  return named


def _shape(value: Any) -> tuple[int, ...]:
  return tuple(value.shape) if hasattr(value, "shape") else np.shape(value)


def _is_float(value: Any) -> bool:
  if hasattr(value, "is_floating_point"):  # a torch tensor
    return bool(value.is_floating_point())
  return np.asarray(value).dtype.kind == "f"


def _to_numpy(value: Any) -> np.ndarray:
  """float32 numpy; a torch tensor is copied once, so the result never shares its memory."""
  if hasattr(value, "detach"):
    return np.array(value.detach().cpu().float().numpy())
  return np.asarray(value).astype(np.float32, copy=False)


def config_from_state_dict(state_dict: Mapping[str, Any], *, head_width: int = OPENAI_HEAD_WIDTH
                           ) -> clip.CLIPConfig:
  """The CLIPConfig an OpenAI-format ViT state dict was built with (heads = width // head_width, OpenAI's rule).

  Raises:
    CLIPConversionError when a key the sizes are read from is missing (e.g. a ResNet CLIP, which has no visual.proj).
  """
  shapes = {k: _shape(v) for k, v in _named(state_dict).items()}
  needed = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj", "token_embedding.weight",
            "positional_embedding", "text_projection")
  missing = [k for k in needed if k not in shapes]
  if missing:
    raise CLIPConversionError(f"not an OpenAI-format ViT CLIP state dict: missing {', '.join(missing)}")

  def layers(prefix):
    return len({k[len(prefix):].split(".")[0] for k in shapes if k.startswith(prefix)})

  try:
    width, _, patch, _ = shapes["visual.conv1.weight"]
    grid = round((shapes["visual.positional_embedding"][0] - 1) ** 0.5)
    vocab, text_width = shapes["token_embedding.weight"]
    return clip.CLIPConfig(
        embed_dim=shapes["text_projection"][1], image_size=patch * grid, patch_size=patch, vision_width=width,
        vision_layers=layers("visual.transformer.resblocks."), vision_heads=max(width // head_width, 1),
        context_length=shapes["positional_embedding"][0], vocab_size=vocab, text_width=text_width,
        text_layers=layers("transformer.resblocks."), text_heads=max(text_width // head_width, 1))
  except (ValueError, IndexError, TypeError, ZeroDivisionError) as e:  # shapes of the wrong rank or size
    raise CLIPConversionError(f"state dict describes no valid ViT CLIP: {type(e).__name__}: {e}") from e


def check_state_dict(state_dict: Mapping[str, Any], config: Optional[clip.CLIPConfig] = None) -> clip.CLIPConfig:
  """Checks that `state_dict` (torch tensors, arrays, or anything with .shape; no data is read) is exactly an
  OpenAI-format CLIP of `config` (default: the one its shapes give); returns that config.

  Raises:
    CLIPConversionError naming every missing, unexpected, mis-shaped and non-float key.
  """
  named = _named(state_dict)
  if config is None:
    config = config_from_state_dict(named)
  plan = _plan(config)
  expected = {e.source for e in plan}
  missing = expected - set(named)
  unexpected = set(named) - expected
  bad_shapes = [f"{e.source}: {_shape(named[e.source])} (expected {e.source_shape()})"
                for e in plan if e.source in named and _shape(named[e.source]) != e.source_shape()]
  bad_dtypes = [e.source for e in plan if e.source in named and not _is_float(named[e.source])]
  problems = torch_layout.key_problems(missing, unexpected, bad_shapes)
  if bad_dtypes:
    problems.append(f"non-float keys: {torch_layout.listing(bad_dtypes)}")
  if problems:
    raise CLIPConversionError("not an OpenAI-format CLIP state dict of this architecture: " + " | ".join(problems))
  return config


def convert_state_dict(state_dict: Mapping[str, Any], config: Optional[clip.CLIPConfig] = None
                       ) -> dict[str, Any]:
  """OpenAI-format CLIP state dict (numpy or torch arrays, PyTorch layouts) -> {'params': ...} of CLIP(config).

  Args:
    state_dict: key -> array, e.g. `visual.conv1.weight` [768, 3, 32, 32]; a leading `module.` is stripped; the
      archive's scalars `input_resolution`, `context_length`, `vocab_size` and a traced `attn_mask` may be present.
    config: the architecture (default: read from the shapes, `config_from_state_dict`).

  Returns:
    {'params': nested dict of float32 numpy arrays}.

  Raises:
    CLIPConversionError naming every missing, unexpected and mis-shaped key (`check_state_dict`).
  """
  config = check_state_dict(state_dict, config)
  named = _named(state_dict)
  flat = {}
  for e in _plan(config):
    flat[e.target] = torch_layout.to_flax(_to_numpy(named[e.source]), e.kind)
  return {"params": traverse_util.unflatten_dict(flat)["params"]}


# ----------------------------------------------------------------------------------------------------------------
# Files.


def _import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top  (optional dependency)
  except ImportError as e:
    raise CLIPConversionError(
        f"reading OpenAI's {WEIGHTS_FILENAME} needs torch: pip install 'ctxrq_jax[torch]' (CPU wheels suffice), or "
        "convert it once on a machine with torch (`python -m ctxrq_jax.convert clip`) and pass the directory") from e
  return torch


def load_torch_state_dict(path: str | os.PathLike, *, check_hash: bool = True) -> dict[str, np.ndarray]:
  """Reads OpenAI's TorchScript archive (`torch.jit.load(...).state_dict()`) or a plain state dict
  (`torch.load(weights_only=True)`, optionally under 'state_dict') as float32 numpy arrays.

  Args:
    path: the weights file, or a directory holding `ViT-B-32.pt`.
    check_hash: require the SHA-256 of OpenAI's released ViT-B-32.pt (`WEIGHTS_SHA256`).

  Raises:
    FileNotFoundError naming the file and where to get it; CLIPConversionError for a digest mismatch, a file torch
    cannot read, content that is not a state dict, or torch missing.
  """
  path = require_weights_file(path)
  if check_hash:
    digest = paths.sha256(path)
    if digest != WEIGHTS_SHA256:
      raise CLIPConversionError(
          f"{path}: SHA-256 {digest[:16]}... is not that of OpenAI's {WEIGHTS_FILENAME} ({WEIGHTS_SHA256[:16]}...); "
          f"download it again from {WEIGHTS_URL} (`python -m ctxrq_jax.convert clip --nocheck_hash` converts "
          "another ViT CLIP)")
  torch = _import_torch()
  try:
    state = torch.jit.load(paths.local_copy(path), map_location="cpu").state_dict()
  except Exception:  # noqa: BLE001 - not a TorchScript archive: try a plain state dict
    try:
      state = torch.load(paths.local_copy(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises assorted types (UnpicklingError, RuntimeError, EOFError) for bad files
      raise CLIPConversionError(f"{path} could not be read as a TorchScript archive or a torch state dict: "
                                f"{type(e).__name__}: {e}") from e
  if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
    state = state["state_dict"]
  if not isinstance(state, Mapping):
    raise CLIPConversionError(f"{path} holds a {type(state).__name__}, not a state dict")
  return torch_layout.tensors_to_numpy(state, str(path), CLIPConversionError)


def save_artifact(directory: str | os.PathLike, config: clip.CLIPConfig, params: Mapping[str, Any], *,
                  source: str | None = None, sha256: str | None = None, overwrite: bool = False) -> None:
  """Writes `directory/clip.json` (format, config, source) and the orbax checkpoint `directory/variables`."""
  directory = paths.name(directory)
  if set(params) != {"params"}:
    raise ValueError(f"save_artifact: expected {{'params': ...}}, got collections {sorted(params)}")
  variables_files.check_tree_shapes(dict(params), clip.abstract_params(config), f"save_artifact({directory})",
                                    "parameters are not CLIP's of this config")
  variables_files.save(directory, {"params": params["params"]}, meta_file=_META_FILE,
                       meta={"format": ARTIFACT_FORMAT, "config": config.to_dict(), "source": source,
                             "sha256": sha256},
                       what="CLIP artifact", overwrite=overwrite)


def is_artifact(directory: str | os.PathLike) -> bool:
  return (paths.path(directory) / _META_FILE).exists()


def load_artifact(directory: str | os.PathLike) -> tuple[clip.CLIPConfig, dict[str, Any]]:
  """Reads a CLIP artifact; returns (config, {'params': jax arrays}).

  Raises:
    FileNotFoundError / ValueError naming the path and what is missing or wrong.
  """
  directory = paths.name(directory)
  _, meta = variables_files.read_meta(directory, _META_FILE, ARTIFACT_FORMAT, section="config",
                                      missing=f"{directory} is not a CLIP artifact (no {_META_FILE})",
                                      label="CLIP artifact metadata")
  config = clip.CLIPConfig.from_dict(meta["config"])
  abstract = clip.abstract_params(config)
  params = variables_files.restore(directory, abstract, what="CLIP artifact", label="CLIP checkpoint")
  variables_files.check_tree_shapes(params, abstract, f"load_artifact({directory})",
                                    "parameters are not CLIP's of this config")
  return config, {"params": params["params"]}


def convert_file(weights: str | os.PathLike, out: str | os.PathLike, *, check_hash: bool = True,
                 overwrite: bool = False, config: Optional[clip.CLIPConfig] = None
                 ) -> tuple[clip.CLIPConfig, dict[str, Any]]:
  """OpenAI's `ViT-B-32.pt` -> CLIP artifact at `out`; returns (config, params) as written. `config` defaults to
  the one the shapes give (heads = width // 64)."""
  path = paths.name(require_weights_file(weights))
  state = load_torch_state_dict(path, check_hash=check_hash)
  config = config or config_from_state_dict(state)
  params = convert_state_dict(state, config)
  save_artifact(out, config, params, source=path, sha256=paths.sha256(path), overwrite=overwrite)
  return config, params


def random_state_dict(config: clip.CLIPConfig, seed: int = 0) -> dict[str, np.ndarray]:
  """An OpenAI-format state dict of random weights for `config` (matrices scaled by 1/sqrt(fan-in), LayerNorm scales
  near 1, embeddings and biases small), for tests and benchmarks where the released file is absent."""
  rng = np.random.default_rng(seed)
  sd = {}
  for key, shape in reference_state_dict_shapes(config).items():
    if key == "logit_scale":
      sd[key] = np.full(shape, np.log(1 / 0.07))
    elif key.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_final.weight")):
      sd[key] = 1.0 + 0.1 * rng.normal(size=shape)
    elif len(shape) >= 2 and "embedding" not in key:
      fan_in = int(np.prod(shape[1:])) if key.endswith("weight") else shape[0]
      sd[key] = rng.normal(size=shape) / np.sqrt(fan_in)
    else:
      sd[key] = 0.1 * rng.normal(size=shape)
  return {k: np.asarray(v, np.float32) for k, v in sd.items()}


def load_variables(source: str | os.PathLike, *, check_hash: bool = True,
                   config: Optional[clip.CLIPConfig] = None) -> tuple[clip.CLIPConfig, dict[str, Any]]:
  """(config, {'params'}) from a CLIP artifact directory or straight from OpenAI's `.pt` (converted in memory).

  A directory that is not an artifact but holds `ViT-B-32.pt` is read as that file; `config` (for a `.pt`) defaults
  to the one its shapes give.

  Raises:
    FileNotFoundError naming `ViT-B-32.pt` and OpenAI's URL when neither exists.
  """
  source = os.fspath(source)
  if is_artifact(source):
    return load_artifact(source)
  state = load_torch_state_dict(source, check_hash=check_hash)
  config = config or config_from_state_dict(state)
  return config, convert_state_dict(state, config)
