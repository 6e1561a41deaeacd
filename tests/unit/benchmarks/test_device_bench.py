"""bench/device.sh (the accelerator checks) runs end to end on the CPU with the tiny config."""

import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from ctxrq_jax.benchmarks import speed
from ctxrq_jax.core import config as configlib
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
       "--train_batches=4096,4", "--memory_limit_gb=0.05", "--check_batch=2", "--rqvae_config=configs/rqvae_mnist.py"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out
  assert "bf16 vs fp32 sampler (tiny config): sampled_ok True, finite True" in out, out
  assert "sample T_draft=4:" in out and "skipped (T > N=16)" in out, out
  # The first training batch cannot be allocated: the next one is timed.
  assert "train batch 4096: out of memory" in out and "train step batch 4:" in out, out
  assert "MFU probe" in out and "s/sample" in out, out
  # The decode to pixels, timed once and added to the codes' time in the table.
  assert "RQ-VAE decode to uint8 pixels, batch 2, 32px from codes 8x8x4:" in out and "total s" in out, out
  assert "failed" not in out and "Traceback" not in out, out


def _fake_checks(monkeypatch, clock=None, sample_s=0.0, train_error=None):
  """bench_device's checks replaced by fakes that take `sample_s` on `clock` (a one-item list) per sample check; the
  first training batch raises `train_error` when given."""
  def advance(seconds):
    if clock is not None:
      clock[0] += seconds

  def bench_sample(config, *, t_drafts, parts, **_):
    advance(sample_s)
    return [{"t_draft": t, "fast_s": 0.01 * t, "fast_flops": 1e9} for t in t_drafts]

  def bench_train(config, *, batch, **_):
    if train_error is not None and batch == 8:
      raise train_error
    return {"batch": batch, "step_s": 0.5, "model_flops": 1e12, "all_positions_flops": 1e12, "xla_flops": 2e12,
            "probe_flops": 4e12, "peak_flops": None, "mask_group": 1, "steps_per_call": 1, "memory_bytes": 1.0,
            "loss": 1.0}

  monkeypatch.setattr(speed, "precision_check", lambda *a, **k: {"sampled_ok": True, "finite": True})
  monkeypatch.setattr(speed, "random_model", lambda config, seed: ("model", "variables", "codebook"))
  monkeypatch.setattr(speed, "bench_sample", bench_sample)
  monkeypatch.setattr(speed, "bench_decode", lambda *a, batch, **k: {"batch": batch, "decode_s": 0.002,
                                                                       "code_shape": (8, 8, 4), "resolution": 256})
  monkeypatch.setattr(speed, "bench_train", bench_train)


def _device(clock=None, deadline_s=400.0, **kwargs):
  tiny = configlib.load_config_file("imagenet", "tiny")
  lines = []
  out = speed.bench_device(tiny, batch=4, t_drafts=[8, 32, 64], t_revise=2, num_revisions=2, train_batches=[4, 8],
                           check_config=tiny, check_batch=2, rqvae_config=None, deadline_s=deadline_s, seed=0,
                           log=lines.append, **({"clock": lambda: clock[0]} if clock is not None else {}), **kwargs)
  return out, "\n".join(lines)


def test_bench_device_goes_on_after_a_check_fails(monkeypatch):
  _fake_checks(monkeypatch, train_error=RuntimeError("INTERNAL: boom\nmore of the XLA message"))
  out, log = _device()
  # The failed batch is logged with its traceback and listed; the next smaller batch and the later checks run.
  assert out["failed"] == ["train batch 8"] and out["skipped"] == []
  assert "train batch 8: failed, RuntimeError: INTERNAL: boom\nTraceback (most recent call last)" in log, log
  assert out["train"]["batch"] == 4
  assert [r["t_draft"] for r in out["sample"]] == [8, 32, 64]
  assert all(r["decode_s"] == 0.002 for r in out["sample"])  # the decode goes into every row's total
  table = speed.format_table(out["sample"])
  assert "total s" in table and "0.0820" in table  # 0.08 s/sample for the codes at T_draft 8 + 0.002


def test_a_model_that_cannot_be_built_is_tried_once(monkeypatch):
  _fake_checks(monkeypatch)
  calls = []

  def broken(config, seed):
    calls.append(seed)
    raise RuntimeError("RESOURCE_EXHAUSTED while initialising")
  monkeypatch.setattr(speed, "random_model", broken)
  out, log = _device()
  assert len(calls) == 1 and out["failed"] == ["build the model"] and out["sample"] == []
  assert out["train"]["batch"] == 8 and out["decode"]["decode_s"] == 0.002  # the other checks still run
  assert log.splitlines()[0].startswith("device: cpu") and ", jax " in log.splitlines()[0]


def test_bench_device_skips_a_check_the_deadline_leaves_too_little_time_for(monkeypatch):
  clock = [0.0]
  _fake_checks(monkeypatch, clock=clock, sample_s=100.0)
  out, log = _device(clock=clock, deadline_s=250.0)
  # T_draft 8 ends at 100 s, T_draft 64 (the H200 target, next; 150 s left >= 1.2 x 100) at 200 s; T_draft 32
  # would need 120 of the 50 left. The decode and the training step, first of their kinds, still start.
  assert [r["t_draft"] for r in out["sample"]] == [8, 64]
  assert out["skipped"] == ["sample T_draft=32"] and out["failed"] == []
  assert "sample T_draft=32: skipped, 50 s left before the deadline" in log, log
  assert out["train"]["batch"] == 8 and "train: the largest of batches 8 / 4 that fits" in log, log


def test_a_check_still_running_at_exit_by_s_is_cut_with_the_tables_of_the_others(monkeypatch):
  import threading  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  _fake_checks(monkeypatch)
  slow_train, released, cut = speed.bench_train, threading.Event(), []

  def stuck_train(config, *, batch, **kwargs):  # a compile that would outlast the timeout
    if batch == 8:
      released.wait(10)
    return slow_train(config, batch=batch, **kwargs)
  monkeypatch.setattr(speed, "bench_train", stuck_train)

  def overrun(out, in_flight):
    cut.append(([r["t_draft"] for r in out["sample"]], in_flight))
    released.set()
  start = time.perf_counter()
  _device(exit_by_s=0.5, on_overrun=overrun, started=start)
  # Called once, from the watchdog, while the first training batch ran (last: after every T_draft's row).
  assert cut == [([8, 32, 64], "train batch 8")]
  assert time.perf_counter() - start < 5


def test_bench_device_refuses_to_run_on_a_cpu_it_was_not_told_to_use(monkeypatch):
  # On the GPU machine a missing CUDA plugin makes JAX fall back to the CPU: the 821M checks would spend the whole
  # device budget there. The check comes first, before any flag is read.
  from absl import app  # pylint: disable=g-import-not-at-top
  from ctxrq_jax import bench  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  with pytest.raises(app.UsageError, match="found no GPU or TPU .* set JAX_PLATFORMS=cpu to run the checks on the CPU"):
    bench._device(None, "cpu")


def test_flop_counts_compile_nothing_and_say_na_where_the_backend_cannot_count(monkeypatch):
  import jax.stages  # pylint: disable=g-import-not-at-top
  tiny = configlib.load_config_file("imagenet", "tiny")
  with tiny.unlocked():
    tiny.model.spatial_layers = tiny.model.depth_layers = 1
  model, variables, codebook = speed.random_model(tiny, 0)

  def no_compile(self, *args, **kwargs):
    raise AssertionError("a FLOP count compiled a program")
  monkeypatch.setattr(jax.stages.Lowered, "compile", no_compile)
  counted = speed.forward_flops(model, variables, codebook, 2)
  assert counted > 0
  # A backend whose lowered programs have no cost analysis (a GPU's PJRT plugin): 'n/a', still nothing compiled.
  monkeypatch.setattr(jax.stages.Lowered, "cost_analysis", lambda self: None)
  assert np.isnan(speed.forward_flops(model, variables, codebook, 2))
  assert np.isnan(speed._cost_flops({"flops": -1.0}))  # a GPU count made of library calls
  row = {"t_draft": 8, "fast_s": 0.1, "fast_flops": float("nan"), "probe_flops": 1e12}
  assert speed.format_table([row]).splitlines()[2].split() == ["8", "0.1000", "n/a", "n/a", "n/a", "n/a", "n/a"]


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
          "import ctxrq_jax.models.artifact\n"
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
