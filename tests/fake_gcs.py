"""An offline stand-in for Google Cloud Storage: `gs://BUCKET/...` paths served from a local directory.

Everything the package does with a `gs://` location goes through the same layers it uses against a real bucket:
  * etils.epath (our code, orbax's and grain's file handling): a backend that maps `gs://b/k` to `<root>/b/k`, with
    object-store semantics where they matter: no atomic rename (a directory rename is a copy then a delete, so
    code must not rely on it for atomicity);
  * orbax's tensorstore arrays: orbax builds a GCS kvstore for `gs://` directories; here it gets a file kvstore on the
    mapped directory (HNS bucket probes answer "no", so nothing calls the Cloud Storage API);
  * array_record's C++ reader: it opens `gs://` objects itself through google-cloud-cpp, pointed here at a small
    HTTP server that emulates the JSON API's media download (`CLOUD_STORAGE_EMULATOR_ENDPOINT`).
TensorFlow's `ram://` would serve epath and gfile only: neither tensorstore nor array_record can open it, and epath
1.15 does not route it (`epath.Path("ram://x")` raises KeyError), hence this double.

Code that bypasses the path layer (`os.path.join("gs://b", ...)`, built-in `open`) would read and write a local
`gs:` directory under the working directory instead; `FakeGcs.stray_local_files()` reports any.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import threading
import urllib.parse
from http import server
from typing import Iterator
from unittest import mock

from etils.epath import backend as epath_backend
from etils.epath import gpath


class _GcsBackend(epath_backend._OsPathBackend):  # pylint: disable=protected-access
  """epath backend for `gs://` paths, storing objects under a local root."""

  def __init__(self, root: str):
    self.root = root

  def local(self, p) -> str:
    s = os.fspath(p)
    if not s.startswith("gs://"):
      return s
    return os.path.join(self.root, s[len("gs://"):])

  def remote(self, p) -> str:
    rel = os.path.relpath(os.fspath(p), self.root)
    return "gs://" + rel.replace(os.sep, "/")

  def open(self, path, mode):
    if "w" in mode or "a" in mode:
      os.makedirs(os.path.dirname(self.local(path)), exist_ok=True)  # buckets have no directories to create
    return super().open(self.local(path), mode)

  def exists(self, path):
    return super().exists(self.local(path))

  def isdir(self, path):
    return super().isdir(self.local(path))

  def listdir(self, path):
    return super().listdir(self.local(path))

  def glob(self, path):
    return [self.remote(p) for p in super().glob(self.local(path))]

  def walk(self, top, *, top_down=True, on_error=None):
    for root, dirs, files in super().walk(self.local(top), top_down=top_down, on_error=on_error):
      yield self.remote(root), dirs, files

  def makedirs(self, path, *, exist_ok=False, mode=None):
    return super().makedirs(self.local(path), exist_ok=exist_ok, mode=mode)

  def mkdir(self, path, *, exist_ok=False, mode=None):
    return super().mkdir(self.local(path), exist_ok=exist_ok, mode=mode)

  def rmtree(self, path):
    return super().rmtree(self.local(path))

  def remove(self, path):
    return super().remove(self.local(path))

  def _move(self, path, dst, *, overwrite: bool) -> None:
    src, dst = self.local(path), self.local(dst)
    if os.path.exists(dst) and (not overwrite or os.path.isdir(dst)):
      raise FileExistsError(f"cannot move {path}: {dst} exists")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.isdir(src):  # object stores move "directories" object by object: copy, then delete
      shutil.copytree(src, dst)
      shutil.rmtree(src)
    else:
      shutil.copyfile(src, dst)
      os.remove(src)

  def rename(self, path, dst):
    self._move(path, dst, overwrite=False)

  def replace(self, path, dst):
    self._move(path, dst, overwrite=True)

  def copy(self, path, dst, overwrite):
    os.makedirs(os.path.dirname(self.local(dst)), exist_ok=True)
    return super().copy(self.local(path), self.local(dst), overwrite=overwrite)

  def stat(self, path):
    return super().stat(self.local(path))


def _media_server(root: str) -> server.ThreadingHTTPServer:
  """GET /storage/v1/b/BUCKET/o/OBJECT?alt=media with Range headers, as google-cloud-cpp's reader sends them."""

  class Handler(server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802 - the http.server API
      url = urllib.parse.urlparse(self.path)
      m = re.fullmatch(r"/storage/v1/b/([^/]+)/o/(.+)", url.path)
      local = m and os.path.join(root, m.group(1), urllib.parse.unquote(m.group(2)))
      if not local or not os.path.isfile(local):
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()
        return
      with open(local, "rb") as f:
        data = f.read()
      total, start, end, status = len(data), 0, len(data) - 1, 200
      rng = self.headers.get("Range")
      if rng:
        last = re.fullmatch(r"bytes=-(\d+)", rng)
        span = re.fullmatch(r"bytes=(\d+)-(\d*)", rng)
        if last:
          start = max(0, total - int(last.group(1)))
        elif span:
          start = int(span.group(1))
          end = min(total - 1, int(span.group(2))) if span.group(2) else end
        status = 206
      body = data[start:end + 1]
      self.send_response(status)
      self.send_header("Content-Type", "application/octet-stream")
      self.send_header("Content-Range", f"bytes {start}-{end}/{total}")
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      self.wfile.write(body)

    def log_message(self, *args):
      del args

  return server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)


class FakeGcs:
  """The running double: `url(key)` names a location in the fake bucket, `local(url)` where it is on disk."""

  BUCKET = "ctxrq-test"

  def __init__(self, root: str, cwd: str):
    self.root, self.cwd = root, cwd
    self.backend = _GcsBackend(root)

  def url(self, key: str = "") -> str:
    return f"gs://{self.BUCKET}/{key}".rstrip("/")

  def local(self, url: str) -> str:
    return self.backend.local(url)

  def stray_local_files(self) -> list[str]:
    """Files written to a local `gs:` directory by code that bypassed the path layer (os.path / open)."""
    stray = os.path.join(self.cwd, "gs:")
    return [os.path.join(d, f) for d, _, fs in os.walk(stray) for f in fs] if os.path.exists(stray) else []


@contextlib.contextmanager
def fake_gcs(root: str, cwd: str) -> Iterator[FakeGcs]:
  """Installs the double (see the module doc) until the block ends; `cwd` is where stray local writes would land."""
  from orbax.checkpoint._src.path import gcs_utils  # pylint: disable=g-import-not-at-top

  fake = FakeGcs(root, cwd)
  os.makedirs(os.path.join(root, FakeGcs.BUCKET), exist_ok=True)
  httpd = _media_server(root)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()

  def kvstore(path: str) -> dict:  # orbax asks for a GCS kvstore of a gs:// path; the file driver serves its copy
    return {"driver": "file", "path": fake.local(os.fspath(path))}

  prefix_to_backend = dict(gpath._PREFIX_TO_BACKEND, gs=fake.backend)  # pylint: disable=protected-access
  with contextlib.ExitStack() as stack:
    stack.enter_context(mock.patch.object(gpath, "_PREFIX_TO_BACKEND", prefix_to_backend))
    stack.enter_context(mock.patch.object(gpath, "_GCS_BACKENDS", frozenset({fake.backend})))
    stack.enter_context(mock.patch.object(gpath, "_is_tf_installed", lambda: False))
    stack.enter_context(mock.patch.object(gcs_utils, "get_kvstore_for_gcs", kvstore))
    stack.enter_context(mock.patch.object(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False))
    stack.enter_context(mock.patch.dict(os.environ, {
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": f"http://127.0.0.1:{httpd.server_address[1]}"}))
    try:
      yield fake
    finally:
      httpd.shutdown()
      httpd.server_close()
      thread.join(timeout=5)
