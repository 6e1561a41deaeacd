"""Inference restores the parameters alone: never the optimizer state, on the sampling mesh."""

import jax
import numpy as np
import pytest

from ctxrq_jax.core import checkpoint
from ctxrq_jax.core import config as configlib
from ctxrq_jax.core import sharding
from ctxrq_jax.models import common
from ctxrq_jax.sampling import loader
from ctxrq_jax.stage2 import trainer


def _nbytes(tree):
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def test_the_1_4b_restore_target_holds_parameters_only():
  config = configlib.load_config_file("imagenet", "1.4b")
  mesh = loader.inference_mesh()
  target = loader.params_target(config, mesh)
  n = common.count_params(target)
  assert n == 1_387_518_208
  assert _nbytes(target) == 4 * n  # float32 parameters: 5.55 GB, nothing else
  # What the trainer would restore: parameters plus Adam's two moments (and the step and key).
  model = trainer.build_model(config)
  full, _ = trainer.abstract_train_state(model, trainer.make_optimizer(config), config, mesh,
                                         sharding.logical_rules(config))
  assert _nbytes(full) > 2.9 * _nbytes(target)
  assert all(isinstance(s.sharding, jax.sharding.NamedSharding) for s in jax.tree.leaves(target))


@pytest.mark.parametrize("ema_decay", [0.0, 0.5])
def test_restore_reads_only_the_parameters(tmp_path, monkeypatch, ema_decay):
  config = configlib.load_config_file("imagenet", "tiny")
  with config.unlocked():
    config.train.ema_decay = ema_decay
    config.model.spatial_layers = config.model.depth_layers = 1  # the depth does not matter here; compiles faster
  mesh = loader.inference_mesh()
  rules = sharding.logical_rules(config)
  model = trainer.build_model(config)
  tx = trainer.make_optimizer(config)
  state, _ = trainer.create_train_state(model, tx, config, mesh, rules)
  if ema_decay:  # make the EMA differ from the parameters so the test can tell which one came back
    state = state.replace(ema_params=jax.jit(lambda p: jax.tree.map(lambda x: x + 1.0, p))(state.params))
  workdir = str(tmp_path / "run")
  configlib.save_snapshot(config, workdir)
  with checkpoint.Checkpointer(f"{workdir}/checkpoints", max_to_keep=1, save_interval_steps=1) as ckpt:
    ckpt.save(7, state, force=True)

  requested = []
  original = checkpoint.Checkpointer._restore_step

  def spy(self, step, abstract, data_iterator, partial):
    requested.append((sorted(abstract), partial))
    return original(self, step, abstract, data_iterator, partial)

  monkeypatch.setattr(checkpoint.Checkpointer, "_restore_step", spy)
  params, step, which = loader.restore_params(workdir, config, mesh)
  want_name = "ema_params" if ema_decay else "params"
  assert (step, which) == (7, want_name)
  assert requested == [([want_name], True)]  # one partial read of one field: no opt_state, step or rng
  want = state.ema_params if ema_decay else state.params
  jax.tree.map(np.testing.assert_array_equal, params, want)
  params, _, which = loader.restore_params(workdir, config, mesh, use_ema=False)
  assert which == "params"
  jax.tree.map(np.testing.assert_array_equal, params, state.params)


def test_missing_run_is_a_clear_error(tmp_path):
  config = configlib.load_config_file("imagenet", "tiny")
  with pytest.raises(FileNotFoundError, match="no stage-2 checkpoints"):
    loader.restore_params(str(tmp_path), config, loader.inference_mesh())
