"""Stage-2 evaluation in training: the batches it scores and how it totals them."""

import logging

import numpy as np
import pytest

from ctxrq_jax.core import sharding
from ctxrq_jax.data import codes as codes_lib
from ctxrq_jax.stage2 import trainer as train
from tests import helpers


def test_eval_batches_are_the_training_micro_batch_and_totals_are_weighted(stage2_codes_dir):
  # With train.grad_accum_steps = A one training step's forward sees batch_size / A examples; the eval (every position
  # through the depth transformer) runs at that size too, so it fits wherever training does: 4 held-out examples,
  # batch 4, A = 2 -> two eval batches of 2.
  config = helpers.tiny_stage2_config(stage2_codes_dir, train__grad_accum_steps=2)
  mesh = sharding.make_mesh(config.mesh)
  meta = codes_lib.read_metadata(stage2_codes_dir)
  assert meta.num_examples(config.data.eval_split) == 4 and config.train.batch_size == 4
  seen, keys = [], []

  def eval_fn(params, batch, codebook, key):  # per batch: sums over its masked codes
    del params, codebook
    seen.append(batch["codes"].shape[0])
    keys.append(np.asarray(key))
    n = float(len(seen))  # batch i masks i codes of mean loss i
    return {"num_masked_codes": n, "loss": n * n, "mask_fraction": 0.5}

  out = train.evaluate(config, eval_fn, None, None, mesh, meta)
  assert seen == [2, 2]
  assert not np.array_equal(keys[0], keys[1])  # each batch its own fixed masks
  assert out == {"eval/num_masked_codes": 3.0, "eval/loss": (1.0 + 4.0) / 3.0}  # weighted by masked codes


def test_an_eval_split_smaller_than_one_batch_is_skipped_with_a_warning(stage2_codes_dir, caplog):
  # 4 held-out examples, batch 8: nothing to score (the iterator used to refuse the split before the warning).
  config = helpers.tiny_stage2_config(stage2_codes_dir, train__batch_size=8)
  meta = codes_lib.read_metadata(stage2_codes_dir)
  never = lambda *a: pytest.fail("no batch to evaluate")  # noqa: E731
  with caplog.at_level(logging.WARNING, logger=train.__name__):
    assert train.evaluate(config, never, None, None, sharding.make_mesh(config.mesh), meta) == {}
  assert "eval split 'validation' has fewer than one global batch (8); eval skipped" in caplog.text
