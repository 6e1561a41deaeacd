"""The sampling benchmark (ctxrq_jax/benchmarks/speed.py): both samplers agree, and the gathered fast path needs fewer
FLOPs than the reference."""

import numpy as np

from ctxrq_jax.core import config as configlib
from ctxrq_jax.benchmarks import speed as bench


def test_bench_sample_rows_agree_and_count_flops():
  # configs/imagenet.py:tiny with one layer per stack and depth D = 2 (fewer programs to compile); N = 16 positions.
  config = configlib.load_config_file("imagenet", "tiny")
  with config.unlocked():
    config.model.spatial_layers = config.model.depth_layers = 1
    config.data.code_shape = (4, 4, 2)
  rows = bench.bench_sample(config, batch=2, t_drafts=[4, 32], t_revise=2, num_revisions=1, repeats=1,
                            reference=True, seed=0)
  ok, skipped = rows
  assert ok["t_draft"] == 4 and ok["same_codes"]
  assert ok["fast_s"] > 0 and ok["ref_s"] > 0
  # Gathering N/T positions for the depth passes: fewer model FLOPs than depth passes over all N positions.
  assert 0 < ok["fast_flops"] < ok["ref_flops"] and np.isfinite(ok["ref_flops"])
  assert skipped == {"t_draft": 32, "skipped": "T > N=16"}
  table = bench.format_table(rows)
  assert "same codes" in table and "skipped (T > N=16)" in table


def test_param_table_lists_the_paper_sizes():
  table = bench.param_table()
  for name in ("ctx-rq 333m", "ctx-rq 821m", "ctx-rq 1.4b", "rq-vae 8x8x4"):
    assert name in table, table
  assert "1,387,518,208" in table  # configs/imagenet.py:1.4b, as tests/unit/test_inference_restore.py counts it
  assert "104,402,051" in table  # the released RQ-VAE, its padding row counted
