"""A model's variables on disk, as both artifacts store them (the stage-1 RQ-VAE, `artifact.py`, and the FID
Inception, `inception_convert.py`): an orbax checkpoint `variables/` plus a small JSON file that describes it, written
last and atomically by process 0 (its commit marker: on a bucket a directory without it is unfinished), after
which every host passes a barrier. `directory` is local or a bucket (`core.paths`). Shapes are checked against the
model's abstract variables on save and on load.

Replacing an artifact (`overwrite`: `convert ... --overwrite`, the stage-1 export at the end of every training run)
never destroys the old one before the new one is complete: the new checkpoint is written beside it into
`variables.new/`, and only then does process 0 swap it in (JSON removed, `variables/` renamed to `variables.old/`,
`variables.new/` to `variables/`, the JSON written, the old checkpoint deleted). An interruption while the new
variables are written, however long that takes, leaves the old artifact loadable; the swap itself is renames (on a
bucket, copies of the one checkpoint).
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from ctxrq_jax.core import paths

VARIABLES_DIR = "variables"
_STAGING_DIR = VARIABLES_DIR + ".new"  # a replacement's checkpoint while it is written
_REPLACED_DIR = VARIABLES_DIR + ".old"  # the replaced checkpoint during the swap


def check_tree_shapes(tree: Any, expected: Any, where: str, mismatch: str) -> None:
  """ValueError `{where}: {mismatch}: ...` listing missing, unexpected and mis-shaped leaves (at most 8 shown)."""
  got = {jax.tree_util.keystr(p): tuple(np.shape(v)) for p, v in jax.tree_util.tree_leaves_with_path(tree)}
  want = {jax.tree_util.keystr(p): tuple(v.shape) for p, v in jax.tree_util.tree_leaves_with_path(expected)}
  problems = [f"missing {k}" for k in sorted(set(want) - set(got))]
  problems += [f"unexpected {k}" for k in sorted(set(got) - set(want))]
  problems += [f"{k}: shape {got[k]} != {want[k]}" for k in sorted(set(got) & set(want)) if got[k] != want[k]]
  if problems:
    shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} problems)" if len(problems) > 8 else "")
    raise ValueError(f"{where}: {mismatch}: {shown}")


def save(directory: str, state: Any, *, meta_file: str, meta: dict[str, Any], what: str, overwrite: bool) -> None:
  """Writes `directory/variables/` (orbax) and then `directory/meta_file` (JSON, atomically, on process 0); an
  existing artifact (`overwrite`) is replaced only once the new variables are complete (the module doc).

  Raises FileExistsError naming `what` when the checkpoint exists and not `overwrite`.
  """
  root = paths.path(directory)
  ckpt_dir = root / VARIABLES_DIR
  replacing = ckpt_dir.exists()
  if replacing and not overwrite:
    raise FileExistsError(f"{what} already exists at {directory} (pass overwrite=True, --overwrite, to replace it)")
  chief = jax.process_index() == 0
  if chief and not replacing and (root / meta_file).exists():
    (root / meta_file).unlink()  # a marker without variables: it must not describe the ones written below
  root.mkdir(parents=True, exist_ok=True)
  target = root / _STAGING_DIR if replacing else ckpt_dir
  try:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(target, state, force=True)  # force: the staging directory an interrupted replacement left
      ckptr.wait_until_finished()
  except BaseException:
    if chief and replacing and target.exists():
      target.rmtree()
    raise
  if chief:
    if replacing:
      old = root / _REPLACED_DIR
      if old.exists():
        old.rmtree()
      if (root / meta_file).exists():
        (root / meta_file).unlink()  # first: during the swap no marker describes a checkpoint half moved
      ckpt_dir.rename(old)
      target.rename(ckpt_dir)
    paths.write_json(root / meta_file, meta, indent=2, sort_keys=True)
    if replacing:
      (root / _REPLACED_DIR).rmtree()
  paths.barrier(f"ctxrq_variables_files_{root.name}")


def read_json(path: str, label: str) -> Any:
  """The parsed JSON file; ValueError `{label} {path} is unreadable: ...` otherwise."""
  try:
    return json.loads(paths.path(path).read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{label} {path} is unreadable: {e}") from e


def read_meta(directory: str, meta_file: str, fmt: str, *, missing: str, label: str, section: str | None = None,
              prefix: str = "") -> tuple[Any, dict[str, Any]]:
  """(path, parsed JSON) of an artifact's `directory/meta_file`, checked to be a `fmt` file (with a mapping under
  `section` when given).

  Raises FileNotFoundError(`missing`) when the file is absent, ValueError `{label} ... is unreadable` when it is not
  JSON and `{prefix}{path} is not a {fmt} file` when it is not one.
  """
  meta_path = paths.path(directory) / meta_file
  if not meta_path.exists():
    raise FileNotFoundError(missing)
  meta = read_json(meta_path, label)
  if not isinstance(meta, dict) or meta.get("format") != fmt or (section and not isinstance(meta.get(section), dict)):
    raise ValueError(f"{prefix}{meta_path} is not a {fmt} file")
  return meta_path, meta


def restore(directory: str, abstract: Any, *, what: str, label: str) -> Any:
  """Restores `directory/variables/` into the structure of `abstract` (ShapeDtypeStructs), whole on this process's
  first local device: in a multi-host job every host gets its own full copy (orbax needs the target sharding; the
  one recorded in the checkpoint names the devices of the job that saved it).

  Raises FileNotFoundError naming `what` when there is no checkpoint, ValueError `{label} ... could not be restored`
  when orbax cannot read it.
  """
  ckpt_dir = paths.path(directory) / VARIABLES_DIR
  if not ckpt_dir.is_dir():
    raise FileNotFoundError(f"{what} {directory} has no checkpoint directory {VARIABLES_DIR}/")
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(ckpt_dir, target)
  except Exception as e:  # orbax raises assorted types for truncated/corrupt files
    raise ValueError(f"{label} {ckpt_dir} could not be restored: {type(e).__name__}: {e}") from e
