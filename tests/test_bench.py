"""The sampling benchmark: both samplers agree, and the gathered fast path needs fewer FLOPs than the reference."""

import numpy as np

from ctxrq_jax import bench
from ctxrq_jax import configlib


def test_bench_sample_rows_agree_and_count_flops():
  config = configlib.load_config_file("imagenet", "tiny")  # 4x4x4 codes: N = 16
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
