"""The benchmarks on the tiny config: samplers agree, FLOPs and rates are counted, the training step is timed."""

import os

import jax
import numpy as np
import pytest

from ctxrq_jax.core import config as configlib
from ctxrq_jax.benchmarks import official
from ctxrq_jax.benchmarks import speed

# One worker runs the bench tests in file order, so bench/device.sh's child finds test_bench_speed's programs in the
# compilation cache.
pytestmark = pytest.mark.xdist_group("bench")


@pytest.fixture(scope="module")
def tiny():
  return configlib.load_config_file("imagenet", "tiny")  # 4x4x4 codes: N = 16


@pytest.fixture(scope="module")
def small(tiny):
  """One layer per stack and depth D = 2 (N = 16 positions): smaller programs to compile. The configs that
  tests/unit/benchmarks/test_device_bench.py gives bench/device.sh (the same programs at the same batches)."""
  config = tiny.copy_and_resolve_references()
  with config.unlocked():
    config.model.spatial_layers = config.model.depth_layers = 1
    config.data.code_shape = (4, 4, 2)
  return config


@pytest.mark.slow
def test_bench_sample_rows_agree_and_count_flops(small):
  rows = speed.bench_sample(small, batch=2, t_drafts=[4, 32], t_revise=2, num_revisions=1, repeats=1,
                            reference=True, seed=0)
  ok, skipped = rows
  assert ok["t_draft"] == 4 and ok["same_codes"]
  assert ok["fast_s"] > 0 and ok["ref_s"] > 0 and ok["probe_flops"] > 0
  # Gathering N/T positions for the depth steps: fewer model FLOPs than depth steps over all N positions.
  assert 0 < ok["fast_flops"] < ok["ref_flops"] and np.isfinite(ok["ref_flops"])
  assert skipped == {"t_draft": 32, "skipped": "T > N=16"}
  table = speed.format_table(rows)
  for column in ("same codes", "% probe", "floor s", "skipped (T > N=16)", "matmul probe"):
    assert column in table


def test_param_table_lists_the_paper_sizes():
  table = speed.param_table()
  for name in ("ctx-rq 333m", "ctx-rq 821m", "ctx-rq 1.4b", "t2i 333m", "t2i 654m", "rq-vae 8x8x4"):
    assert name in table, table
  assert "1,387,518,208" in table  # configs/imagenet.py:1.4b, as tests/unit/test_inference_restore.py counts it
  assert "104,402,051" in table  # the released RQ-VAE, its padding row counted
  assert "652,734,976" in table  # configs/cc3m.py:654m


def test_cached_depth_flops_are_d_token_passes(tiny):
  model, variables, codebook = speed.random_model(tiny, 0)
  _, cached = speed.pass_flops(model, variables, codebook, 2, 16)
  uncached = sum(speed._flops(lambda v, h, c, e, at=at: model.apply(v, h, c, e, at=at, method=model.depth),
                              variables, np.zeros((2, 16, model.width), np.float32),
                              np.zeros((2, 16, model.code_depth), np.int32), codebook) for at in range(4))
  assert cached < 0.8 * uncached
  # Guidance: depth steps on both branches, the head once.
  _, guided = speed.pass_flops(model, variables, codebook, 2, 16, guided=True)
  assert cached < guided < 2 * cached


def test_bench_train_reports_mfu(small):
  result = speed.bench_train(small, batch=4, repeats=1, seed=0)
  assert result["step_s"] > 0 and result["model_flops"] > 0 and result["probe_flops"] > 0
  assert np.isfinite(result["loss"])
  # XLA's count of the whole step (backward and update included) exceeds one forward pass (model_flops / 3).
  assert result["xla_flops"] > result["model_flops"] / 3
  table = speed.format_train(result, {"batch": 4, "step_s": 2 * result["step_s"],
                                      "model_flops": result["model_flops"]})
  assert "MFU probe" in table and "official / ctxrq_jax step time: 2.00" in table
  # Three steps per call (one compiled scan over stacked batches), as train.steps_per_call runs them: the time is
  # per step, and XLA counts the scanned program's loop body once, one step's FLOPs.
  scanned = small.copy_and_resolve_references()
  with scanned.unlocked():
    scanned.train.steps_per_call = 3
  calls = speed.bench_train(scanned, batch=4, repeats=1, seed=0, probe=False)
  assert calls["steps_per_call"] == 3 and calls["step_s"] > 0 and np.isfinite(calls["loss"])
  assert calls["model_flops"] == result["model_flops"]
  np.testing.assert_allclose(calls["xla_flops"], result["xla_flops"], rtol=0.1)


def test_probe_and_peak():
  assert speed.matmul_probe(64, 32, 32, repeats=2) > 0
  assert speed.device_peak_flops(jax.devices("cpu")[0]) is None


def test_official_config_and_checkout_check(tiny, tmp_path):
  cfg = official.official_config(tiny)
  assert cfg.embed_dim == 32 and cfg.body.n_layer == 2 and cfg.head.n_layer == 2 and cfg.block_size == [4, 4, 4]
  assert cfg.copy().body is not cfg.body
  with pytest.raises(FileNotFoundError, match="not a checkout"):
    official.load_transformer_class(str(tmp_path))


@pytest.mark.skipif(not os.environ.get("RQ_TRANSFORMER_SRC"), reason="set RQ_TRANSFORMER_SRC to a checkout of "
                    "kakaobrain/rq-vae-transformer to test the official baseline")
def test_official_baseline_runs(tiny):
  pytest.importorskip("torch")
  src = os.environ["RQ_TRANSFORMER_SRC"]
  assert official.time_sampler(src, tiny, batch=2, repeats=1, seed=0) > 0
  step = official.time_train_step(src, tiny, batch=2, repeats=1, seed=0)
  assert step["step_s"] > 0 and np.isfinite(step["loss"])


def test_fid_cost_table_and_a_failing_child(tmp_path):
  from ctxrq_jax.benchmarks import fid_cost  # pylint: disable=g-import-not-at-top
  rows = [{"samples": 1000, "reference": 1000, "image_bytes": 64 * 64 * 3, "seconds": 20.0, "peak_rss_mib": 1500.0},
          {"samples": 5000, "reference": 1000, "image_bytes": 64 * 64 * 3, "seconds": 60.0, "peak_rss_mib": 1540.0}]
  table = fid_cost.format_table(rows)
  assert "10.0" in table and "+40 MiB" in table  # 60 s / 6000 images; 1540 - 1500
  assert "pool features are 31 MiB, their images 47 MiB" in table  # 4000 x 8 KiB; 4000 x 12 KiB
  path = fid_cost.write_random_images(str(tmp_path / "x.npz"), 3, 8, seed=0)
  (tmp_path / "x.npz.json").write_text("{}")  # an earlier bench's result: its own scratch, replaced
  with pytest.raises(RuntimeError, match="evaluate fid failed") as e:  # no such weights: the child's error is shown
    fid_cost.run_fid(path, path, str(tmp_path / "missing"), batch_size=4)
  assert "missing" in str(e.value) and "exists" not in str(e.value), str(e.value)


@pytest.mark.slow  # 26-36 s on a loaded 2-core CPU: a training step and the sampler of a text-to-image model compile
def test_benchmarks_run_text_to_image_configs(tiny):
  from ctxrq_jax.models import transformer  # pylint: disable=g-import-not-at-top
  # configs/cc3m.py:tiny (captions of L = 8 tokens of a 64-token vocabulary), one layer per stack, D = 2.
  config = configlib.load_config_file("cc3m", "tiny")
  with config.unlocked():
    config.model.spatial_layers = config.model.depth_layers = 1
    config.data.code_shape = (4, 4, 2)
  model = transformer.from_run_config(config)
  key = jax.random.key(0)
  cond = np.asarray(speed.random_conditions(model, key, 64))
  assert cond.shape == (64, 8) and cond.dtype == np.int32
  assert cond.min() >= 0 and cond.max() < 64 and len(np.unique(cond)) > 32  # the text vocabulary, not class ids
  assert set(speed.training_conditions(model, key, 4)) == {"cond"}
  labels = speed.training_conditions(transformer.from_run_config(tiny), key, 64)["label"]
  assert labels.shape == (64,) and 0 <= int(labels.min()) and int(labels.max()) < 10  # class configs: as before
  result = speed.bench_train(config, batch=4, repeats=1, seed=0, probe=False)
  assert result["step_s"] > 0 and np.isfinite(result["loss"]) and result["model_flops"] > 0
  (row,) = speed.bench_sample(config, batch=2, t_drafts=[4], t_revise=2, num_revisions=1, repeats=1, reference=False,
                              seed=0, probe=False)
  assert row["t_draft"] == 4 and row["fast_s"] > 0 and row["fast_flops"] > 0
