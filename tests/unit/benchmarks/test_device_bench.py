"""bench/device.sh (the accelerator checks) runs end to end on the CPU with the tiny config."""

import os
import pathlib
import shutil
import subprocess
import sys

import jax
import pytest

from tests import helpers

# One worker runs the bench tests in file order, so bench/device.sh's child finds test_bench_speed's programs in the
# compilation cache.
pytestmark = pytest.mark.xdist_group("bench")

ROOT = pathlib.Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_device_script_on_cpu_with_the_tiny_config(tmp_path):
  # The in-process tests' PRNG (faster to compile on a CPU) and, inside the suite, its compilation cache: the sampler,
  # FLOP counts and training step below are the programs of tests/unit/benchmarks/test_bench_speed.py.
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "TIMEOUT_S": "400",
         "JAX_DEFAULT_PRNG_IMPL": jax.config.jax_default_prng_impl,
         "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla_cache"), **helpers.compilation_cache_env()}
  env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
  # One layer per stack and D = 2 (N = 16 positions), for the benchmarked config and the bf16 check's: the same checks
  # with smaller programs to compile.
  small = ["model.spatial_layers=1", "model.depth_layers=1", "data.code_shape=(4,4,2)"]
  proc = subprocess.run(
      ["bash", str(ROOT / "bench" / "device.sh"), "--config=configs/imagenet.py:tiny",
       *(f"--config.{o}" for o in small), "--check_config=configs/imagenet.py:tiny",
       *(f"--check_config.{o}" for o in small), "--batch_size=2", "--t_draft=4,32", "--num_revisions=1",
       "--train_batches=4096,4", "--memory_limit_gb=0.05", "--check_batch=2"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out
  assert "bf16 vs fp32 sampler (tiny config): sampled_ok True, finite True" in out, out
  assert "sample T_draft=4:" in out and "skipped (T > N=16)" in out, out
  # The first training batch cannot be allocated: the next one is timed.
  assert "train batch 4096: out of memory" in out and "train step batch 4:" in out, out
  assert "MFU probe" in out and "s/sample" in out, out


def test_device_script_is_valid_bash():
  subprocess.run(["bash", "-n", str(ROOT / "bench" / "device.sh")], check=True)


# The lent H200's image (the device tool's KINDS.md, read 2026-11-17): the Python distributions `bench device` may
# import from it. Anything else it imports must be among bench/device_wheels.sh's wheels.
_DEVICE_IMAGE = {
    "absl-py", "attrs", "certifi", "chex", "cloudpickle", "etils", "filelock", "flatbuffers", "flax", "fsspec",
    "humanize", "jax", "jaxlib", "ml-dtypes", "msgpack", "numpy", "opt-einsum", "optax", "orbax-checkpoint",
    "pillow", "prometheus-client", "protobuf", "psutil", "pygments", "pyyaml", "rich", "setuptools", "simplejson",
    "tensorstore", "toolz", "typing-extensions", "uvloop", "markdown-it-py", "mdurl", "zipp", "treescope", "scipy",
    "matplotlib", "tokenizers",
}


def _wheel_packages() -> set[str]:
  text = (ROOT / "bench" / "device_wheels.sh").read_text()
  line = next(l for l in text.splitlines() if l.startswith("packages=("))
  return set(line[len("packages=("):-1].split())


def _normalized(name: str) -> str:
  return name.lower().replace("_", "-")


def test_device_wheels_cover_what_bench_device_imports_beyond_the_device_image():
  # The distributions whose files `python -m ctxrq_jax.bench device` imports before it runs anything (by file, not
  # by top-level name: a namespace such as google.* spans several distributions).
  code = ("import os, sys, importlib.metadata as m\n"
          "import ctxrq_jax.bench, ctxrq_jax.benchmarks.speed, ctxrq_jax.stage2.trainer, ctxrq_jax.sampling.decoder\n"
          "tops = m.packages_distributions()\n"
          "def owner(name, path):\n"
          "  dists = tops.get(name.split('.')[0], [])\n"
          "  if len(dists) < 2: return dists\n"
          "  return [d for d in dists if any(os.path.realpath(m.distribution(d).locate_file(f)) == path\n"
          "                                  for f in m.distribution(d).files or ())]\n"
          "print('\\n'.join(sorted({d for n, v in list(sys.modules.items()) if getattr(v, '__file__', None)\n"
          "                         for d in owner(n, os.path.realpath(v.__file__))})))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout
  imported = {_normalized(d) for d in out.split()} - {"ctxrq-jax"}
  carried = {_normalized(p) for p in _wheel_packages()}
  assert imported - _DEVICE_IMAGE - carried == set()
  assert carried <= imported  # nothing carried in vain


def test_device_wheels_script_names_a_missing_package(tmp_path):
  fake = tmp_path / "bin"
  fake.mkdir()
  (fake / "python3").write_text("#!/bin/sh\nexit 1\n")
  (fake / "python3").chmod(0o755)
  proc = subprocess.run(["bash", str(ROOT / "bench" / "device_wheels.sh"), str(tmp_path / "whl")], capture_output=True,
                        text=True, env={**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"})
  assert proc.returncode == 2
  assert proc.stderr.strip() == "error: ml_collections is not installed here: install the project first (pip install -e .)"
  assert not (tmp_path / "whl").exists()


@pytest.mark.parametrize("script", ["device.sh", "device_wheels.sh"])
def test_bench_scripts_are_shellcheck_clean(script):
  shellcheck = shutil.which("shellcheck")
  if shellcheck is None:
    pytest.skip("shellcheck not installed")
  result = subprocess.run([shellcheck, "--severity=style", str(ROOT / "bench" / script)], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr
