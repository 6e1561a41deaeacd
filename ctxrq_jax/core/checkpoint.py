"""Atomic, resumable training checkpoints (orbax CheckpointManager) and a SIGTERM/SIGINT guard.

Layout of `directory` (one sub-directory per step, written by orbax to `<step>.orbax-checkpoint-tmp-*` first and
renamed when complete, so a step directory that exists was finished):

  <step>/state/     the train-state pytree (params, optimizer state, EMA, step, RNG key data), sharded arrays
  <step>/data/      the grain data-iterator position, one JSON file per process (grain's orbax handler)
  <step>/metadata/  optional JSON written by process 0 only (orbax's JSON handler)

Typed PRNG keys (`jax.random.key`) are stored as their raw uint32 key data and re-wrapped with the target's key
implementation on restore, so both typed keys and raw uint32 keys round-trip bit for bit.

Storage: `directory` is any `core.paths` location, local or a bucket (`gs://...`). Locally orbax finalises a step by
renaming its temp directory; on an object store (no atomic rename) it writes into the step directory and commits it
with a marker file written last. The manifest below is one object written after the step was committed.

Integrity: orbax's array files carry no checksums (garbage bytes in a data file restore silently as garbage
values), so once a save has completed process 0 records the size and CRC-32 of every file of the step in the file
`_checksums-<step>.json` beside the step directories (reading the step back: while the next periodic save writes in
the background, or in `wait` / `close`, so a preemption save never waits for it; a step that save drops by
`max_to_keep` gets none) (outside the step directory, which orbax finalised atomically;
a file, not a sub-directory, because on an object store orbax deletes every sub-directory without a commit marker as
an unfinished save). Manifests of older runs in `_checksums/<step>.json` are still read. `restore` verifies them
first; a step saved without a manifest (killed between finalising and checksumming) is restored unverified.

Corruption: `restore` walks the steps newest first. A step that fails to restore (missing or garbage files) is
reported with `logging.warning` naming its directory, and the previous step is tried. Once an older step restores,
the failed newer ones are renamed to `<step>.corrupt-<time>` (never deleted) so they neither shadow the restored
step when training saves that step number again nor count towards `max_to_keep`. If *no* step restores, nothing is
renamed and the first error is raised: then the checkpoints are probably fine and the target (model config) wrong.

Process count: a step saved by P processes resumes with P' processes when the saved data-iterator positions allow
it (`_carried_iterator_state`); otherwise `ProcessCountMismatch` (a ValueError) says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import threading
import time
import zlib
from typing import Any, Mapping, Optional

from etils import epath
import grain
import grain.checkpoint as grain_checkpoint
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import save_decision_policy as save_policy

from ctxrq_jax.core import paths

log = logging.getLogger(__name__)

_STATE = "state"
_DATA = "data"
_METADATA = "metadata"
_CHECKSUMS = "_checksums"  # manifest files: _checksums-<step>.json


def _is_typed_key(x: Any) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def _keys_to_data(tree: Any) -> Any:
  """Typed PRNG key leaves -> their uint32 key data (orbax stores plain arrays)."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_typed_key(x) else x, tree)


def _abstract_leaf(x: Any) -> Any:
  """A restore target leaf: ShapeDtypeStruct (with sharding) for arrays, typed keys as their key data."""
  if _is_typed_key(x):
    data = jax.eval_shape(jax.random.key_data, x)
    # Key data has a trailing dimension; a shorter NamedSharding spec leaves it replicated.
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(x, "sharding", None))
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  if isinstance(x, (np.ndarray, np.generic, int, float, bool)):
    return np.asarray(x)
  raise TypeError(f"cannot restore into a leaf of type {type(x).__name__}; expected arrays or ShapeDtypeStructs")


def _data_to_keys(target: Any, restored: Any) -> Any:
  """Re-wraps uint32 key data as typed keys wherever the target holds a typed key."""

  def wrap(t, r):
    if _is_typed_key(t):
      impl = jax.random.key_impl(t) if isinstance(t, jax.Array) else None
      if impl is None:
        raise TypeError("an abstract typed-key target leaf needs a concrete key to know its implementation; "
                        "pass the key itself (e.g. jax.random.key(0)) in the target")
      return jax.random.wrap_key_data(r, impl=impl)
    return r

  return jax.tree.map(wrap, target, restored)


def _all_processes_agree(ok: bool) -> bool:
  """Whether `ok` holds on every process (one tiny all-gather; `ok` itself with one process). A step that one host
  could not read (a transient read error, a file only it sees damaged) is then skipped by all of them, instead of
  hosts resuming from different steps and waiting forever in their first collective."""
  if jax.process_count() == 1:
    return bool(ok)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def _path_name(path: tuple[Any, ...]) -> str:
  """A pytree path as orbax names the saved leaf: 'opt_state.1.0.mu.head.kernel'."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return ".".join(parts)


def _is_grain_iterator(it: Any) -> bool:
  types = [grain.DatasetIterator]
  loader_it = getattr(getattr(grain, "python", None), "DataLoaderIterator", None)
  if loader_it is not None:
    types.append(loader_it)
  return isinstance(it, tuple(types))


def _check_iterator(it: Any) -> None:
  if it is not None and not _is_grain_iterator(it):
    raise TypeError(f"data_iterator must be a grain DatasetIterator/DataLoaderIterator (with get_state/set_state),"
                    f" got {type(it).__name__}")


class ProcessCountMismatch(ValueError):
  """A step saved by another number of processes whose data-iterator positions cannot be carried over."""


def _manifest_path(directory: epath.Path, step: int) -> epath.Path:
  """The checksum manifest of `step` in a checkpoint directory (the module doc)."""
  path = directory / f"{_CHECKSUMS}-{step}.json"
  legacy = directory / _CHECKSUMS / f"{step}.json"  # written by earlier versions
  return legacy if not path.exists() and legacy.exists() else path


def step_fingerprint(directory: Any, step: int) -> Optional[str]:
  """SHA-256 (hex) of the checksum manifest of `step` in the checkpoint directory `directory`: the size and CRC-32 of
  every file of that save, its commit time among them, so it names one saved checkpoint (a copy keeps it, another
  save at the same step does not). None when the step has no manifest (saved by a version before manifests)."""
  path = _manifest_path(paths.path(directory), int(step))
  return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


class RestoreError(ValueError):
  """No checkpoint of a directory restores (its files are damaged, or they hold another model's state). A ValueError:
  the commands report it as one `error:` line; nothing is moved aside (the steps may be readable with another
  target)."""


def _carried_iterator_state(data_dir: epath.Path) -> Optional[dict[str, Any]]:
  """The data-iterator state for this process from a step saved by another number of processes, or None when the
  step holds this process's own file (grain's handler restores it).

  Every process's iterator is a strided slice of one global stream batched by B / P (`data.pipeline`), and all
  processes take the same number of batches, so a saved position {'next_index': k} is the global position k B for
  any process count: when every saved process holds that same plain position, it is this process's position too.
  Positions that differ or a worker pool's richer state raise ProcessCountMismatch; a set of files that is not one
  complete save by another process count (this process's file lost, say) is a damaged step: IOError, and `restore`
  tries the previous one.
  """
  index, count = jax.process_index(), jax.process_count()
  if (data_dir / f"process_{index}-of-{count}.json").exists():
    return None
  files = sorted(data_dir.glob("process_*-of-*.json"))
  saved_counts = {f.name[:-len(".json")].split("-of-")[-1] for f in files}
  saved = int(next(iter(saved_counts))) if len(saved_counts) == 1 and next(iter(saved_counts)).isdigit() else None
  if saved is None or saved == count or len(files) != saved:
    raise IOError(f"missing data-iterator state process_{index}-of-{count}.json (the step holds "
                  f"{[f.name for f in files]})")
  states = [json.loads(f.read_text()) for f in files]
  if all(state == states[0] for state in states) and isinstance(states[0], dict) and set(states[0]) == {"next_index"}:
    log.info("Checkpoint %s was saved by %d process(es); this run has %d: every process resumes at the saved "
             "position (%d batches into the global stream).", data_dir.parent, len(files), count,
             states[0]["next_index"])
    return states[0]
  raise ProcessCountMismatch(
      f"checkpoint {data_dir.parent} was saved by {saved} process(es), this run has {count}, and their data-iterator "
      f"positions cannot be carried over (they differ, or are not a plain position); resume with {saved} processes")


class Checkpointer:
  """Saves and restores (train state, data-iterator position, metadata) by step, keeping the newest N.

  Args:
    directory: where step directories live (created if missing).
    max_to_keep: number of newest checkpoints kept (older ones are deleted after a new one is complete).
    save_interval_steps: `save` writes only when `step % save_interval_steps == 0` unless forced.
    async_save: write in a background thread (arrays are copied to host before `save` returns, so the caller may
      donate or overwrite the state immediately).
    read_only: for readers of a run that may still be training (sampling, evaluation): nothing in the directory
      is created, cleaned up, renamed or written; an unreadable newest step is skipped, not moved aside.
  """

  def __init__(self, directory: str, *, max_to_keep: int, save_interval_steps: int, async_save: bool = True,
               read_only: bool = False):
    if int(max_to_keep) < 1:
      raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
    if int(save_interval_steps) < 1:
      raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
    self._dir = paths.path(directory)
    self.directory = str(self._dir)
    self.save_interval_steps = int(save_interval_steps)
    self.read_only = bool(read_only)
    if self.read_only and not self._dir.is_dir():
      raise FileNotFoundError(f"checkpoint directory {self.directory} does not exist")
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=int(max_to_keep),
        save_interval_steps=int(save_interval_steps),
        # Interval (+ orbax's multi-host preemption sync point) only: no extra save at the first step of a run.
        save_decision_policy=save_policy.AnySavePolicy([
            save_policy.FixedIntervalPolicy(int(save_interval_steps)),
            save_policy.PreemptionCheckpointingPolicy(),
        ]),
        create=not self.read_only,
        # Leftover `*.orbax-checkpoint-tmp-*` dirs are unfinished writes of a killed run, never good checkpoints;
        # a reader leaves them alone (they may be a live trainer's save in progress).
        cleanup_tmp_directories=not self.read_only,
        enable_async_checkpointing=async_save,
        read_only=self.read_only,
    )
    self._pending: list[int] = []  # Saved steps whose checksums are not written yet.
    self._manager = self._new_manager()

  def _new_manager(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(self._dir, options=self._options,
                                 item_names=(_STATE, _DATA, _METADATA))

  # ------------------------------------------------------------------ save
  def should_save(self, step: int) -> bool:
    return self._manager.should_save(int(step))

  def save(self, step: int, state: Any, data_iterator: Any = None, *, force: bool = False,
           metadata: Optional[Mapping[str, Any]] = None) -> bool:
    """Saves `state` (and the iterator position / JSON metadata) at `step`; returns whether it saved.

    Without `force` a step is saved only on the save interval. Saving a step that already exists on disk is a
    no-op returning False (it would otherwise raise inside orbax), so a forced final save after a periodic one
    at the same step is harmless.
    """
    step = int(step)
    if self.read_only:
      raise RuntimeError(f"Checkpointer({self.directory}) was opened read-only; it cannot save step {step}")
    _check_iterator(data_iterator)
    # The previous background save must be complete (orbax would wait for it anyway), but its checksum manifest,
    # which reads every byte of that step back, is not written first: a stop save after SIGTERM has seconds, and a
    # large model's step is gigabytes in a bucket. A forced save (stop or final) leaves the earlier manifests to
    # `wait` / `close`, after the new step is committed; a periodic save writes them while the new step is
    # written in the background.
    self._manager.wait_until_finished()
    if step in self._manager.all_steps():
      return False
    if jax.process_index() == 0:  # a manifest left by an earlier `step` (moved aside, or deleted by hand) is stale
      for stale in (self._dir / f"{_CHECKSUMS}-{step}.json", self._dir / _CHECKSUMS / f"{step}.json"):
        if stale.exists():
          stale.unlink()
    items = {_STATE: ocp.args.StandardSave(_keys_to_data(state))}
    if data_iterator is not None:
      items[_DATA] = grain_checkpoint.CheckpointSave(data_iterator)
    if metadata is not None:
      items[_METADATA] = ocp.args.JsonSave(dict(metadata))
    saved = bool(self._manager.save(step, args=ocp.args.Composite(**items), force=force))
    earlier, self._pending = self._pending, []
    if force:
      self._pending = earlier
    else:
      self._write_manifests(earlier)
      self._drop_stale_manifests()
    if saved:
      self._pending.append(step)
    return saved

  # ------------------------------------------------------------------ integrity
  def _checksum_path(self, step: int) -> epath.Path:
    return _manifest_path(self._dir, step)

  @staticmethod
  def _file_sum(path: epath.Path) -> list[int]:
    """[size in bytes, CRC-32] of one file, read in 4 MiB chunks."""
    crc = size = 0
    with path.open("rb") as f:
      while chunk := f.read(1 << 22):
        crc = zlib.crc32(chunk, crc)
        size += len(chunk)
    return [size, crc]

  def _step_files(self, step: int) -> dict[str, list[int]]:
    root = self._dir / str(step)
    out = {}
    for dirpath, _, files in root.walk():
      for name in files:
        path = epath.Path(dirpath) / name
        out[path.relative_to(root).as_posix()] = self._file_sum(path)
    return out

  def _write_manifests(self, steps: list[int]) -> None:
    """Process 0 writes the checksum manifest of each of `steps` that orbax still lists (completed saves)."""
    if jax.process_index() != 0:
      return
    present = set(self._manager.all_steps())
    for step in steps:
      if step in present:  # orbax drops the steps a save removes from its list before deleting them
        paths.write_json(self._dir / f"{_CHECKSUMS}-{step}.json", self._step_files(step))

  def _drop_stale_manifests(self) -> None:
    """Process 0 deletes the manifests of steps orbax no longer lists (garbage-collected by max_to_keep)."""
    if jax.process_index() != 0:
      return
    present = set(self._manager.all_steps())
    for entry in self._dir.iterdir():
      stem = entry.name[len(_CHECKSUMS) + 1:].split(".")[0]
      if entry.name.startswith(f"{_CHECKSUMS}-") and stem.isdigit() and int(stem) not in present:
        entry.unlink()

  def _finish_pending(self) -> None:
    """Waits for background saves, then (process 0) writes checksum manifests and drops stale ones."""
    if not self._pending:
      return
    self._manager.wait_until_finished()
    pending, self._pending = self._pending, []
    self._write_manifests(pending)
    self._drop_stale_manifests()

  def _manifest_problem(self, step: int) -> str:
    """What is wrong with `step`'s files against its manifest ('' when they match or it has no manifest)."""
    if not self._checksum_path(step).exists():
      return ""
    want = json.loads(self._checksum_path(step).read_text())
    root = self._dir / str(step)
    bad = []
    for rel, (size, crc) in want.items():
      path = root / rel
      if not path.exists():
        return f"missing file {rel}"
      got_size, got_crc = self._file_sum(path)
      if got_size != size:
        return f"file {rel} has {got_size} bytes, expected {size}"
      if got_crc != crc:
        bad.append(rel)
    return f"checksum mismatch in {', '.join(sorted(bad))}" if bad else ""

  def _verify(self, step: int) -> None:
    """Raises IOError if a file of `step` is missing or differs from its manifest (process 0 checks)."""
    problem = ""
    if jax.process_index() == 0:
      try:
        problem = self._manifest_problem(step)
      except Exception as e:  # noqa: BLE001 - every process must reach the broadcast below, whatever process 0 met
        problem = f"could not check it against its manifest ({type(e).__name__}: {e})"
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      problem = bytes(multihost_utils.broadcast_one_to_all(
          np.frombuffer(problem.encode().ljust(512)[:512], np.uint8))).decode().strip()
    if problem:
      raise IOError(problem)

  # ------------------------------------------------------------------ restore
  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def _restore_step(self, step: int, abstract: Any, data_iterator: Any, partial: bool) -> Any:
    self._verify(step)
    if partial:  # only the leaves of `abstract` are read (e.g. the parameters, not the optimizer state)
      items = {_STATE: ocp.args.PyTreeRestore(item=abstract, partial_restore=True,
                                              restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))}
    else:
      items = {_STATE: ocp.args.StandardRestore(abstract)}
    step_dir = self._dir / str(step)
    has_data = (step_dir / _DATA).is_dir()
    carried = damaged = None
    if data_iterator is not None and has_data:
      try:
        carried = _carried_iterator_state(step_dir / _DATA)
      except IOError as e:  # raised after the restore below, which every process runs, as grain's handler would
        damaged = e
      if carried is None and damaged is None:
        items[_DATA] = grain_checkpoint.CheckpointRestore(data_iterator)
    out = self._manager.restore(step, args=ocp.args.Composite(**items))
    if damaged is not None:
      raise damaged
    if carried is not None:
      data_iterator.set_state(carried)
      if hasattr(data_iterator, "start_prefetch"):  # as grain's handler does after set_state
        data_iterator.start_prefetch()
    if data_iterator is not None and not has_data:
      log.warning("Checkpoint %s has no data-iterator state; the iterator starts from its beginning.", step_dir)
    return out[_STATE]

  def _read_structure(self, step: int) -> Any:
    handler = ocp.PyTreeCheckpointHandler()
    try:
      meta = handler.metadata(self._dir / str(step) / _STATE)
    finally:
      handler.close()
    return getattr(meta, "tree", meta)

  def newest_readable_step(self) -> Optional[int]:
    """The newest step whose saved-state metadata reads (None if none does). A newer step whose metadata is missing
    or damaged is logged and passed over, as `restore` passes over a step it cannot restore."""
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        self._read_structure(step)
      except Exception as e:  # noqa: BLE001 - any read/decode failure: restore skips this step too.
        log.warning("Checkpoint %s has unreadable metadata (%s: %s); looking at the previous one.",
                    self._dir / str(step), type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        continue
      return step
    return None

  def saved_structure(self, step: Optional[int] = None) -> Any:
    """The saved state's tree of array metadata at `step` (default: the newest readable step, see
    `newest_readable_step`); reads no array data."""
    if step is None:
      step = self.newest_readable_step()
      if step is None:
        steps = self.all_steps()
        raise FileNotFoundError(f"no checkpoint in {self.directory}" if not steps else
                                f"none of the checkpoints {steps} in {self.directory} has readable metadata")
    return self._read_structure(int(step))

  def differences(self, target: Any, step: Optional[int] = None, *, limit: int = 3) -> list[str]:
    """How the saved state at `step` (default: the newest readable step) differs from `target` (arrays or
    ShapeDtypeStructs; typed keys count as their key data): leaves only one side has, and leaves of another shape or
    dtype. Reads metadata only. Empty when they agree (or there is no readable checkpoint); at most `limit` items,
    then a count of the rest.

    Restoring casts a leaf of another dtype silently, and a leaf that only one side has fails deep inside orbax:
    trainers check this before resuming (and before they overwrite the run's config snapshot).
    """
    step = self.newest_readable_step() if step is None else int(step)
    if step is None:
      return []
    saved = {_path_name(p): (tuple(x.shape), np.dtype(x.dtype))
             for p, x in jax.tree_util.tree_flatten_with_path(self.saved_structure(step))[0]}
    wanted = {_path_name(p): (tuple(x.shape), np.dtype(x.dtype))
              for p, x in jax.tree_util.tree_flatten_with_path(jax.tree.map(_abstract_leaf, target))[0]}
    out = []
    for name in sorted(set(saved) | set(wanted)):
      if name not in wanted:
        out.append(f"{name} is in the checkpoint only")
      elif name not in saved:
        out.append(f"{name} is not in the checkpoint")
      elif saved[name] != wanted[name]:
        (s_shape, s_dtype), (w_shape, w_dtype) = saved[name], wanted[name]
        out.append(f"{name}: saved {list(s_shape)} {s_dtype.name}, now {list(w_shape)} {w_dtype.name}")
    return out[:limit] + ([f"{len(out) - limit} more"] if len(out) > limit else [])

  def restore(self, target: Any, data_iterator: Any = None, *, partial: bool = False) -> tuple[Any, Optional[int]]:
    """Restores the newest good checkpoint into `target`'s structure, dtypes and shardings.

    Args:
      target: a pytree of concrete arrays or `jax.ShapeDtypeStruct`s (with `sharding`); arrays are restored
        directly into those shardings (each host reads only its shards).
      data_iterator: a grain iterator whose position is restored in place (if the checkpoint has one).
      partial: `target` is a dict holding only some top-level fields of the saved state (e.g. {'params': ...});
        only those arrays are read. Inference uses it to never load the optimizer state.

    Returns:
      (state, step), or (None, None) when the directory holds no checkpoint.

    Raises:
      RestoreError (with the first step's error) when checkpoints exist but none of them restores.
    """
    _check_iterator(data_iterator)
    self._finish_pending()
    self._manager.reload()
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return None, None
    abstract = jax.tree.map(_abstract_leaf, target)
    failed: list[int] = []
    first_error: Optional[BaseException] = None
    for step in steps:
      step_dir = self._dir / str(step)
      error: Optional[BaseException] = None
      try:
        restored = self._restore_step(step, abstract, data_iterator, partial)
      except (MemoryError, ProcessCountMismatch):
        raise  # the host or the run's layout, not the checkpoint, is the problem
      except Exception as e:  # noqa: BLE001 - any read/decode failure means this step is unusable.
        error = e
      if not _all_processes_agree(error is None) and error is None:
        error = IOError("another process could not restore it")  # all hosts must resume from the same step
      if error is not None:
        log.warning("Checkpoint %s could not be restored (%s: %s)%s", step_dir, type(error).__name__,
                        str(error).splitlines()[0] if str(error) else "",
                        "; trying the previous one." if step != steps[-1] else ".")
        failed.append(step)
        first_error = first_error or error
        continue
      if failed and not self.read_only:
        self._quarantine(failed)
      log.info("Restored checkpoint %s", step_dir)
      return _data_to_keys(target, restored), step
    first = (str(first_error).strip().splitlines() or [""])[0]
    raise RestoreError(f"none of the checkpoints {sorted(steps)} in {self.directory} could be restored (damaged, or "
                       f"another model's state; nothing was moved); the first error was {type(first_error).__name__}: "
                       f"{first}") from first_error

  def _quarantine(self, steps: list[int]) -> None:
    """Renames unreadable step directories aside (never deletes) so they stop shadowing good ones."""
    self._manager.wait_until_finished()
    if jax.process_index() == 0:
      stamp = time.strftime("%Y%m%d-%H%M%S")
      for step in steps:
        src = self._dir / str(step)
        dst = self._dir / f"{step}.corrupt-{stamp}"
        n = 1
        while dst.exists():  # the same step moved aside twice within a second
          dst, n = self._dir / f"{step}.corrupt-{stamp}-{n}", n + 1
        if src.is_dir():
          # Locally an atomic rename; on an object store a copy then a delete. An interrupted move leaves `src`
          # without some files: its manifest then fails and it is moved aside again on the next restore.
          manifest = self._checksum_path(step)
          src.rename(dst)
          if manifest.exists():  # it goes with its step: a later save of this step number gets its own
            manifest.rename(dst / "_checksums.json")
          log.warning("Moved unreadable checkpoint %s to %s", src, dst)
    paths.barrier("ctxrq_checkpoint_quarantine")
    self._manager.close()
    self._manager = self._new_manager()

  def read_metadata(self, step: Optional[int] = None) -> Optional[dict[str, Any]]:
    """The JSON metadata saved with `step` (default: latest), or None if there is none."""
    step = self.latest_step() if step is None else int(step)
    if step is None or not (self._dir / str(step) / _METADATA).is_dir():
      return None
    return self._manager.restore(step, args=ocp.args.Composite(**{_METADATA: ocp.args.JsonRestore()}))[_METADATA]

  # ------------------------------------------------------------------ lifecycle
  def wait(self) -> None:
    """Blocks until a background save has finished (and raises its error, if any)."""
    self._manager.wait_until_finished()
    self._finish_pending()

  def close(self) -> None:
    self.wait()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class PreemptionGuard:
  """Context manager turning SIGTERM/SIGINT into a flag the training loop polls at step boundaries.

  The first signal sets `should_stop` (the loop then saves and returns); a second SIGINT falls through to the
  previous handler (Ctrl-C twice still interrupts a stuck run). Old handlers are restored on exit. Outside the
  main thread signal handlers cannot be installed; the guard then only logs that and never fires.

  Multi-host: a scheduler signals every host, but not at the same step. `stop_requested(step)` agrees across
  processes (any host's flag stops all) with a tiny all-gather every `sync_every` steps, so all hosts save the
  same step and nobody waits in a collective alone.
  """

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT), sync_every: int = 1):
    self._signals = tuple(signals)
    self._old: dict[int, Any] = {}
    self._flag = threading.Event()
    self._received: Optional[int] = None
    self.sync_every = max(1, int(sync_every))

  @property
  def should_stop(self) -> bool:
    return self._flag.is_set()

  @property
  def received_signal(self) -> Optional[int]:
    return self._received

  def request_stop(self) -> None:
    """Sets the flag as a signal would (tests, or a loop that decides to stop early)."""
    self._flag.set()

  def _handler(self, signum, frame) -> None:
    if self._flag.is_set() and signum == signal.SIGINT:
      old = self._old.get(signum)
      if callable(old):
        old(signum, frame)
        return
      raise KeyboardInterrupt
    self._received = signum
    self._flag.set()
    log.warning("Received %s: will save a checkpoint and stop at the end of this step.",
                    signal.Signals(signum).name)

  def stop_requested(self, step: int) -> bool:
    """`should_stop`, agreed across processes (see class doc); cheap single-process."""
    if jax.process_count() == 1:
      return self.should_stop
    if int(step) % self.sync_every:
      return False
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.asarray(self.should_stop, np.int32))
    return bool(np.any(flags))

  def __enter__(self) -> "PreemptionGuard":
    if threading.current_thread() is not threading.main_thread():
      log.warning("PreemptionGuard outside the main thread: signal handlers not installed.")
      return self
    for s in self._signals:
      self._old[s] = signal.getsignal(s)
      signal.signal(s, self._handler)
    return self

  def __exit__(self, *exc) -> None:
    for s, old in self._old.items():
      signal.signal(s, old if old is not None else signal.SIG_DFL)
    self._old.clear()


__all__ = ["Checkpointer", "PreemptionGuard", "ProcessCountMismatch"]
