"""bench/device.sh (the accelerator checks) runs end to end on the CPU with the tiny config."""

import os
import pathlib
import subprocess
import sys

import pytest

from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_device_script_on_cpu_with_the_tiny_config(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "TIMEOUT_S": "400",
         "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla_cache"), **helpers.compilation_cache_env()}
  env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
  proc = subprocess.run(
      ["bash", str(ROOT / "bench" / "device.sh"), "--config=configs/imagenet.py:tiny", "--batch_size=4",
       # One layer per stack: the same checks with half the programs' size to compile.
       "--config.model.spatial_layers=1", "--config.model.depth_layers=1",
       "--t_draft=2,32", "--num_revisions=1", "--train_batches=4096,4", "--memory_limit_gb=0.05", "--check_batch=2"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out
  assert "bf16 vs fp32 sampler (tiny config): sampled_ok True, finite True" in out, out
  assert "sample T_draft=2:" in out and "skipped (T > N=16)" in out, out
  # The first training batch cannot be allocated: the next one is timed.
  assert "train batch 4096: out of memory" in out and "train step batch 4:" in out, out
  assert "MFU probe" in out and "s/sample" in out, out


def test_device_script_is_valid_bash():
  subprocess.run(["bash", "-n", str(ROOT / "bench" / "device.sh")], check=True)
