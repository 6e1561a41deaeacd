"""bench/device.sh (the accelerator checks) runs end to end on the CPU with the tiny config."""

import os
import pathlib
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
