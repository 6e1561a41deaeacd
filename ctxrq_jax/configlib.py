"""Config loading and validation shared by every command.

Configs are `ml_collections` files with `get_config(arg)`; they return locked ConfigDicts so a misspelled override
(`--config.train.batch_sise=8`) fails at the flag parser. `check_keys` catches the same mistake in configs built or
edited in code (notebooks, tests) by comparing against the file's own defaults, before anything is compiled.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Mapping

import ml_collections


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


CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """Loads `get_config(arg)` from a config file; a bare name ('demo') means configs/demo.py of this checkout.

  The same as `--config=path:arg` on the command line, for notebooks and tests.
  """
  if os.sep not in path and not path.endswith(".py"):
    path = os.path.join(CONFIG_DIR, path + ".py")
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path} does not exist")
  spec = importlib.util.spec_from_file_location(f"_ctxrq_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path} has no get_config()")
  return module.get_config(arg) if arg is not None else module.get_config()
