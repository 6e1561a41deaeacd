"""Config files, key checks and run snapshots (no JAX here: commands import this before anything heavy).

Configs are `ml_collections` files with `get_config(arg)`; they return locked ConfigDicts so a misspelled override
(`--config.train.batch_sise=8`) fails at the flag parser. `check_keys` catches the same mistake in configs built or
edited in code (notebooks, tests) by comparing against the package's defaults (`ctxrq_jax/configs/`), before anything
is compiled. A run's config is snapshotted as `config.json` in its workdir (`save_snapshot` / `load_snapshot`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from typing import Any, Mapping, Optional

import ml_collections

from ctxrq_jax.core import paths

log = logging.getLogger(__name__)


class ConfigError(ValueError):
  """A configuration that cannot run; the message names the offending key."""


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  items = d.items() if isinstance(d, (Mapping, ml_collections.ConfigDict)) else []
  for k, v in items:
    key = f"{prefix}{k}"
    if isinstance(v, (Mapping, ml_collections.ConfigDict)):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def check_keys(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming every key of `config` that `reference` does not have (and vice versa)."""
  got, want = set(_flatten(config)), set(_flatten(reference))
  unknown, missing = sorted(got - want), sorted(want - got)
  if unknown or missing:
    parts = []
    if unknown:
      parts.append(f"unknown config keys: {', '.join(unknown)}")
    if missing:
      parts.append(f"missing config keys: {', '.join(missing)}")
    raise ConfigError("; ".join(parts))


def changed_keys(old: Any, new: Any, prefixes: tuple[str, ...]) -> list[str]:
  """'key: old -> new' for every key under `prefixes` whose value differs between two configs (or dicts)."""
  a, b = _flatten(old), _flatten(new)
  norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731  (JSON turns tuples into lists)
  keys = sorted(k for k in set(a) | set(b) if k.startswith(prefixes))
  return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if norm(a.get(k)) != norm(b.get(k))]


def require(condition: bool, message: str) -> None:
  """Raises ConfigError(message) unless condition holds."""
  if not condition:
    raise ConfigError(message)


PACKAGE_CONFIGS = "ctxrq_jax.configs"
SNAPSHOT = "config.json"


def package_config_path(name: str) -> str:
  """The file of a config that ships inside the package (`ctxrq_jax/configs/NAME.py`); works from a wheel."""
  spec = importlib.util.find_spec(f"{PACKAGE_CONFIGS}.{name}")
  if spec is None or not spec.origin:
    raise ConfigError(f"no config named {name!r} in {PACKAGE_CONFIGS}")
  return spec.origin


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """Loads `get_config(arg)` from a config file; a bare name ('demo') means the package's `ctxrq_jax/configs/demo.py`.

  The same as `--config=path:arg` on the command line, for notebooks and tests.
  """
  if os.sep not in path and not path.endswith(".py"):
    path = package_config_path(path)
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path} does not exist")
  spec = importlib.util.spec_from_file_location(f"_ctxrq_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path} has no get_config()")
  return module.get_config(arg) if arg is not None else module.get_config()


def check_resumable(checkpointer: Any, target: Any, workdir: str) -> None:
  """ConfigError when `workdir`'s newest readable checkpoint holds another state than this config makes (`target`, arrays or
  ShapeDtypeStructs): another structure (e.g. EMA or gradient clipping turned on or off), shape or dtype. Call it
  before the config snapshot is overwritten; a run without a checkpoint passes."""
  step = checkpointer.newest_readable_step()  # a damaged newer step is restore's to report and move aside
  differences = checkpointer.differences(target, step) if step is not None else []
  if differences:
    raise ConfigError(f"{workdir} holds a checkpoint (step {step}) of another state than this "
                      f"config makes ({'; '.join(differences)}); resume it with its own config "
                      f"({paths.path(workdir) / SNAPSHOT}) or train in a new --workdir")


def save_snapshot(config: ml_collections.ConfigDict, workdir: str, *, write: bool = True,
                  resumed_step: Optional[int] = None, name: str = "run") -> str:
  """Writes the config as JSON into `workdir/config.json` atomically (only where `write`, i.e. process 0): the record
  of a run's settings (and the sampler's defaults).

  Resuming (`resumed_step`: the step of the newest checkpoint, None for a new run) under a config that differs from
  the saved one is allowed (a longer schedule, another logging cadence; the trainers refuse changes of the state's
  shapes themselves), but not silent: one warning names the run (`name`) and lists the changed keys, and the earlier
  snapshot is kept as config-<step>.json, so the settings the steps up to there were trained with are not lost.
  """
  path = paths.path(workdir) / SNAPSHOT
  if resumed_step is not None and path.exists():
    _keep_changed_snapshot(config, path, int(resumed_step), name, write)
  if write:
    path.parent.mkdir(parents=True, exist_ok=True)
    paths.write_text(path, config.to_json_best_effort(indent=2, sort_keys=True))
  return str(path)


def _keep_changed_snapshot(config: ml_collections.ConfigDict, path: Any, resumed_step: int, name: str,
                           write: bool) -> None:
  """`save_snapshot` on resume: the warning and config-<step>.json when `config` differs from the saved `path`."""
  try:
    saved = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError):
    saved = None
  diffs = changed_keys(saved, json.loads(config.to_json_best_effort()), ("",)) if isinstance(saved, dict) else []
  if not diffs:
    return
  kept = path.parent / f"config-{resumed_step}.json"
  if write and not kept.exists():  # an existing one already holds the settings the steps so far used
    paths.write_text(kept, path.read_text())
  shown = "; ".join(diffs[:_DIFFS_SHOWN]) + (f"; and {len(diffs) - _DIFFS_SHOWN} more"
                                             if len(diffs) > _DIFFS_SHOWN else "")
  log.warning("%s in %s resumes at step %d with another config (%s); the config of the steps so far is kept in %s",
              name, path.parent, resumed_step, shown, kept)


_DIFFS_SHOWN = 10


def load_snapshot(workdir: str) -> ml_collections.ConfigDict:
  """Reads a config written by `save_snapshot`; a clear error names a missing or unreadable file."""
  path = paths.path(workdir) / SNAPSHOT
  if not path.parent.is_dir():
    raise FileNotFoundError(f"workdir {workdir} does not exist")
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: is {workdir} the workdir of a training run?")
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"config snapshot {path} is unreadable: {e}") from e


def absolute_paths(config: ml_collections.ConfigDict, section: str, keys: tuple[str, ...]) -> ml_collections.ConfigDict:
  """A copy whose `section.key` directories are absolute (URLs kept), so the snapshot works from any directory."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for key in keys:
      path = config[section][key]
      if path:
        config[section][key] = paths.name(path)
  return config
