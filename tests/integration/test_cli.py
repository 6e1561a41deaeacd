"""Every command answers --help without importing JAX, and every flag the README shows exists."""

import functools
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from ctxrq_jax.core import config as configlib

REPO = pathlib.Path(__file__).resolve().parents[2]
COMMANDS = ("bench", "convert", "demo", "encode", "evaluate", "sample", "tokenize", "train", "train_rqvae")


def _readme_commands():
  """(module, [args]) for every `python -m ctxrq_jax.X ...` in the README's code blocks (continuations joined)."""
  text = (REPO / "README.md").read_text()
  out = []
  for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S):
    for line in block.replace("\\\n", " ").splitlines():
      for part in line.split("&&"):
        words = shlex.split(part.strip()) if "python -m ctxrq_jax." in part else []
        if words:
          i = words.index("-m")
          out.append((words[i + 1].split(".", 1)[1], words[i + 2:]))
  return out


README_COMMANDS = _readme_commands()


def test_readme_shows_the_commands():
  assert {m for m, _ in README_COMMANDS} >= {"demo", "train", "train_rqvae", "encode", "sample", "evaluate", "convert",
                                             "bench"}


@pytest.mark.parametrize("command", COMMANDS)
def test_help_is_fast_and_imports_no_jax(command):
  out = subprocess.run([sys.executable, "-X", "importtime", "-m", f"ctxrq_jax.{command}", "--helpfull"],
                       capture_output=True, text=True, timeout=60, check=False, cwd=REPO)
  # absl's --helpfull exits 1 by design; the command's own flags are listed under its module name.
  assert out.returncode in (0, 1) and f"ctxrq_jax/{command}.py:" in out.stdout, out.stderr[-2000:]
  imported = {l.split("|")[-1].strip() for l in out.stderr.splitlines() if l.startswith("import time:")}
  heavy = sorted(m for m in imported if m.split(".")[0] in ("jax", "flax", "orbax", "tensorflow", "grain", "optax"))
  assert not heavy, f"--help of {command} imports {heavy[:5]}"


@functools.cache
def _helpfull(module):
  """`python -m ctxrq_jax.<module> --helpfull`'s stdout, run once per module (and test process) for all the README's
  commands of that module."""
  return subprocess.run([sys.executable, "-m", f"ctxrq_jax.{module}", "--helpfull"], capture_output=True, text=True,
                        timeout=60, check=False, cwd=REPO).stdout


@pytest.mark.parametrize("index", range(len(README_COMMANDS)),
                         ids=[f"{m}-{i}" for i, (m, _) in enumerate(README_COMMANDS)])
def test_every_readme_flag_exists(index):
  module, args = README_COMMANDS[index]
  helpfull = _helpfull(module)
  config_file = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
  for arg in args:
    if not arg.startswith("--"):
      continue
    name = arg[2:].split("=", 1)[0]
    if name.startswith("config."):
      assert config_file, f"{arg} without --config"
      path, _, config_arg = config_file.partition(":")
      config = configlib.load_config_file(str(REPO / path), config_arg or None)
      node = config
      for key in name.split(".")[1:]:
        assert key in node, f"README: {module} {arg}: no key {key!r} in {config_file}"
        node = node[key]
    else:
      # A flag's definition line (`  --name: ...`, `  --[no]name: ...`), not any mention (e.g. in a docstring).
      definition = rf"^\s+--(\[no\])?{re.escape(name.removeprefix('no'))}:"
      assert re.search(definition, helpfull, re.M) or re.search(rf"^\s+--{re.escape(name)}:", helpfull, re.M), (
          f"README: {module} has no flag --{name}")


def test_sample_merge_needs_no_workdir(tmp_path):
  # `sample --merge --out=DIR` only merges the shards in DIR (here: none, named in one line); without --out it needs
  # the run's workdir to find them.
  run = lambda *a: subprocess.run([sys.executable, "-m", "ctxrq_jax.sample", *a], capture_output=True,  # noqa: E731
                                  text=True, timeout=120, check=False, cwd=REPO, env={**os.environ,
                                                                                   "JAX_PLATFORMS": "cpu"})
  out = run("--merge", f"--out={tmp_path}")
  assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith("error: no sample shards"), out.stderr
  out = run("--merge")
  assert out.returncode == 2 and "--workdir=DIR is required" in out.stderr, out.stderr


@pytest.mark.parametrize("flag, message", [("--seed=4294967297", r"--seed must be in \[0, 2\*\*32\)"),
                                           ("--preview_classes=0", "--preview_classes must be >= 1, got 0"),
                                           ("--batch_size=0", "--batch_size must be >= 1, got 0")])
def test_sample_refuses_settings_that_would_repeat_or_lose_samples(tmp_path, flag, message):
  # Seed 2**32 + 1 would draw seed 1's samples (JAX keeps 32 bits); a preview of nothing used to fail after drawing.
  out = subprocess.run([sys.executable, "-m", "ctxrq_jax.sample", f"--workdir={tmp_path}", flag],
                       capture_output=True, text=True, timeout=60, check=False, cwd=REPO)
  assert out.returncode == 2 and re.search(message, out.stderr.strip().splitlines()[-1]), out.stderr


@pytest.mark.parametrize("config, message", [
    ("/no/such/config.py", r"^error: --config=/no/such/config.py could not be loaded: \[Errno 2\] No such file"),
    ("configs/rqvae_mnist.py:nope", r"^error: flag --config=configs/rqvae_mnist.py:nope: .*unknown argument 'nope'")])
def test_a_config_that_cannot_load_is_one_line_before_any_work(config, message):
  # ml_collections defers a missing file's error to the config's first use (a traceback after stage 1 in the demo).
  out = subprocess.run([sys.executable, "-m", "ctxrq_jax.train_rqvae", f"--config={config}", "--workdir=x"],
                       capture_output=True, text=True, timeout=60, check=False, cwd=REPO)
  assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
  assert re.search(message, out.stderr.strip()), out.stderr


def test_evaluate_never_replaces_an_earlier_result_unasked(tmp_path):
  # Refused before any work (no Inception, CLIP or run is loaded): the file is untouched.
  (tmp_path / "s.fid.json").write_text('{"fid": 1.0}')
  (tmp_path / "ref.npz").write_bytes(b"a downloaded reference")
  (tmp_path / "ablation").mkdir()
  (tmp_path / "ablation" / "ablation.json").write_text("{}")
  cases = [["fid", f"--samples={tmp_path}/s.npz", f"--reference={tmp_path}/ref.npz", "--inception=x"],
           ["reference-stats", "--config=configs/rqvae_mnist.py", "--inception=x", f"--out={tmp_path}/ref.npz"],
           ["ablation", "--workdir=x", f"--out_dir={tmp_path}/ablation"]]  # (clip: the same check, the same code)
  for args in cases:
    out = subprocess.run([sys.executable, "-m", "ctxrq_jax.evaluate", *args], capture_output=True, text=True,
                         timeout=120, check=False, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 2 and "exists (an earlier result); pass --overwrite" in out.stderr, (args, out.stderr)
  assert (tmp_path / "s.fid.json").read_text() == '{"fid": 1.0}'
  assert (tmp_path / "ref.npz").read_bytes() == b"a downloaded reference"


def test_readme_commands_pass_only_flags_their_subcommand_reads():
  # sample, evaluate, encode and convert refuse a flag the chosen subcommand ignores (`core.cli.check_flags`): no
  # command the README shows may pass one.
  from ctxrq_jax import convert, encode, evaluate, sample  # pylint: disable=g-import-not-at-top
  tables = {"sample": sample.MODE_FLAGS, "evaluate": evaluate.COMMAND_FLAGS, "encode": encode.COMMAND_FLAGS,
            "convert": convert.SUBCOMMAND_FLAGS}
  checked = 0
  for module, args in README_COMMANDS:
    if module not in tables or "..." in args:
      continue
    args = args[:args.index("#")] if "#" in args else args  # a comment after the command
    words = [a for a in args if not a.startswith("-")]
    names = [a[2:].split("=", 1)[0] for a in args if a.startswith("--")]
    command = words[0] if words else (sample.MERGE if module == "sample" and "merge" in names else "")
    for name in names:
      name = name if name in tables[module] else name.removeprefix("no")
      assert command in tables[module].get(name, (command,)), f"README: {module} {command} --{name} is refused"
    checked += 1
  assert checked >= 15
