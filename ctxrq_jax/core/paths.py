"""Every location a user can name (workdir, codes_dir, artifacts, sample outputs, statistics) as one path type.

`path(p)` is an `etils.epath.Path` (what orbax, grain and tfds use): a local path is made absolute, a URL
(`gs://bucket/dir`) is kept as it is, so `os.path.abspath("gs://b/x")` = `<cwd>/gs:/b/x` never happens. Local paths
go through the standard library; non-local ones through TensorFlow's gfile, imported only when such a path is used.

Atomic writes, the way the storage allows:
  local         write `<name>.tmp-<pid>`, then rename over `<name>` (POSIX rename is atomic).
  object store  write the object directly: an object becomes visible only once its upload completed, and a rename is
                a copy plus a delete there. A directory of several files is complete when its commit marker, the
                file written last (a code dataset's metadata.json, an artifact's JSON, orbax's commit file), exists.

Multi-host: `barrier(name)` is jax's `sync_global_devices` when there is more than one process (a no-op otherwise).
Shared metadata is written by process 0 before a barrier, and read by every host after it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from typing import Any, Callable, Iterator, Union

from etils import epath

PathLike = Union[str, os.PathLike]


def is_local(p: PathLike) -> bool:
  """Whether `p` names the local filesystem (no `scheme://` prefix)."""
  return "://" not in os.fspath(p)


# A location that looks like a mistyped URL: `gs:/bucket` (one slash) would otherwise become the local directory
# `<cwd>/gs:/bucket`, and epath refuses an upper-case scheme with a bare KeyError.
_MALFORMED_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/(?!/)")


def path(p: PathLike) -> epath.Path:
  """`p` as an epath.Path: local paths absolute (so a snapshot works from any directory), URLs unchanged.

  Raises ValueError naming `p` for a mistyped URL (`gs:/bucket`, one slash) or a scheme epath does not know.
  """
  if isinstance(p, epath.Path) and not is_local(p):
    return p
  s = os.fspath(p)
  if is_local(s):
    if _MALFORMED_URL.match(s):
      raise ValueError(f"{s!r} looks like a mistyped URL (scheme:/ with one slash); write scheme://bucket/...")
    return epath.Path(os.path.abspath(os.path.expanduser(s)))
  try:
    return epath.Path(s)
  except KeyError:
    raise ValueError(f"{s!r}: unknown storage scheme {s.split('://', 1)[0]!r}:// (lower-case gs:// or s3://, or a "
                     "local path)") from None


def name(p: PathLike) -> str:
  """`p` as the string to record in a config or metadata (absolute when local)."""
  return os.fspath(path(p))


def _write(p: PathLike, data: Union[bytes, str]) -> epath.Path:
  target = path(p)
  binary = isinstance(data, bytes)
  if not is_local(target):
    with target.open("wb" if binary else "w") as f:
      f.write(data)
    return target
  tmp = target.parent / f"{target.name}.tmp-{os.getpid()}"
  try:
    with tmp.open("wb" if binary else "w") as f:
      f.write(data)
    tmp.replace(target)
  except BaseException:
    if tmp.exists():
      tmp.unlink()
    raise
  return target


def write_bytes(p: PathLike, data: bytes) -> epath.Path:
  """Writes `data` to `p` atomically (see the module doc); returns the path."""
  return _write(p, bytes(data))


def write_text(p: PathLike, text: str) -> epath.Path:
  """Writes `text` (UTF-8) to `p` atomically; returns the path."""
  return _write(p, text.encode("utf-8"))


def write_json(p: PathLike, obj: Any, **kwargs: Any) -> epath.Path:
  """Writes `obj` as JSON to `p` atomically; returns the path."""
  return write_text(p, json.dumps(obj, **kwargs))


def read_json(p: PathLike) -> Any:
  return json.loads(path(p).read_text())


def _umask() -> int:
  """The process's umask (read by setting it, so set back at once: os has no getter before Python 3.13's)."""
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def local_file(p: PathLike, *, suffix: str = "") -> Iterator[str]:
  """A local file name to write `p` through, for writers that need a real file (ArrayRecord, numpy memory maps).

  Local `p`: a temp file beside it, renamed onto `p` on success. Non-local `p`: a local temp file copied to `p` on
  success. On an exception nothing is written to `p` and the temp file is removed. The file gets the mode any other
  new file gets (0o666 less the umask: 0644 under umask 022), not mkstemp's private 0600, so that another user or a
  container with another uid (an evaluator job, a shared runs/ directory) can read it.
  """
  target = path(p)
  if is_local(target):
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.fspath(target.parent), prefix=f".{target.name}.", suffix=".tmp" + suffix)
  else:
    fd, tmp = tempfile.mkstemp(prefix="ctxrq-", suffix=suffix)
  os.close(fd)
  os.chmod(tmp, 0o666 & ~_umask())
  try:
    yield tmp
    if is_local(target):
      os.replace(tmp, os.fspath(target))
    else:
      target.parent.mkdir(parents=True, exist_ok=True)
      epath.Path(tmp).copy(target, overwrite=True)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


@contextlib.contextmanager
def scratch_dir() -> Iterator[str]:
  """A local scratch directory (memory-mapped intermediates), removed on exit; never a user-named location."""
  d = tempfile.mkdtemp(prefix="ctxrq-scratch-")
  try:
    yield d
  finally:
    shutil.rmtree(d, ignore_errors=True)


def write_with(p: PathLike, write_fn: Callable[[Any], None], *, binary: bool = True) -> epath.Path:
  """Atomically writes what `write_fn(file)` writes (e.g. `np.save`) to `p`."""
  import io  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO() if binary else io.StringIO()
  write_fn(buf)
  return _write(p, buf.getvalue())


def glob(pattern: str) -> list[str]:
  """Files matching a glob `pattern` (`~` expanded), sorted; for a bucket, the wildcards after its fixed prefix."""
  if is_local(pattern):
    import glob as glob_lib  # pylint: disable=g-import-not-at-top
    return sorted(glob_lib.glob(os.path.expanduser(pattern)))
  cut = min([pattern.find(c) for c in "*?[" if c in pattern] or [len(pattern)])
  root = pattern[:pattern.rfind("/", 0, cut)]
  rest = pattern[len(root) + 1:]
  if not rest:
    return [pattern] if path(pattern).exists() else []
  return sorted(str(p) for p in path(root).glob(rest))


def require_file(p: PathLike, default_name: str, missing: Callable[[str], str]) -> str:
  """`p`, or `p/default_name` when `p` is a directory, as a string; FileNotFoundError(missing(that path)) when it
  is not there (e.g. a released weights file the user must supply)."""
  target = path(p)
  if target.is_dir():
    target = target / default_name
  if not target.exists():
    raise FileNotFoundError(missing(os.fspath(target)))
  return os.fspath(target)


def sha256(p: PathLike) -> str:
  """Hex SHA-256 of the file at `p`, read in 1 MiB chunks."""
  h = hashlib.sha256()
  with path(p).open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


_COPIES: dict[str, str] = {}


def local_copy(p: PathLike) -> str:
  """A local file with the contents of `p`, for readers that need random access to a real file (zip/npz readers,
  memory maps): `p` itself when local, else a copy fetched once per process into a temp dir removed at exit."""
  if is_local(p):
    return os.fspath(path(p))
  key = os.fspath(p)
  if key not in _COPIES or not os.path.exists(_COPIES[key]):
    if not _COPIES:
      import atexit  # pylint: disable=g-import-not-at-top
      root = tempfile.mkdtemp(prefix="ctxrq-copies-")
      atexit.register(shutil.rmtree, root, ignore_errors=True)
      _COPIES[""] = root
    source = path(p)
    fd, tmp = tempfile.mkstemp(dir=_COPIES[""], suffix="-" + source.name)
    os.close(fd)
    source.copy(epath.Path(tmp), overwrite=True)
    _COPIES[key] = tmp
  return _COPIES[key]


def barrier(tag: str) -> None:
  """All processes wait here (jax's multihost sync); nothing to do in a single-process run."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(tag)


__all__ = ["PathLike", "barrier", "glob", "is_local", "local_copy", "local_file", "name", "path", "read_json", "scratch_dir",
           "write_bytes", "write_json", "write_text", "write_with"]
