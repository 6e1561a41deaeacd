"""SIGTERM in a real `python -m ctxrq_jax.train` process: it saves a checkpoint and exits 0, and a resumed run continues
bit for bit as if it had never stopped.

Deterministic: the child is given far more steps than it can run during the test (it cannot finish before the
signal), the signal is sent only once the child has written a checkpoint from inside the training loop (so the
signal handler is installed), and the reference is computed afterwards for exactly the step the child stopped at.
"""

import os
import signal
import subprocess
import sys
import time

import jax
import pytest

from ctxrq_jax.core import checkpoint
from ctxrq_jax.core import sharding
from ctxrq_jax.stage2 import trainer
from tests import helpers

pytestmark = pytest.mark.slow

NUM_STEPS = 1_000_000  # never reached: the child is always stopped by the signal
CKPT_EVERY = 5
RESUME_STEPS = 4


def _final_state(workdir, config):
  model, tx = trainer.build_model(config), trainer.make_optimizer(config)
  abstract, _ = trainer.abstract_train_state(model, tx, config, sharding.make_mesh(config.mesh),
                                             sharding.logical_rules(config))
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=3, save_interval_steps=1,
                               read_only=True) as c:
    return c.restore(abstract)


def test_sigterm_saves_and_exits_zero_then_resume_matches(stage2_codes_dir, tmp_path, subprocess_env):
  # One layer per stack, as stage2/test_trainer.py trains the tiny model: fewer programs to trace and compile.
  overrides = dict(train__num_steps=NUM_STEPS, train__ckpt_every=CKPT_EVERY, train__log_every=NUM_STEPS,
                   train__eval_every=NUM_STEPS, model__spatial_layers=1, model__depth_layers=1)
  config = helpers.tiny_stage2_config(stage2_codes_dir, **overrides)
  workdir = str(tmp_path / "preempted")
  cmd = [sys.executable, "-m", "ctxrq_jax.train", "--config=configs/imagenet.py:tiny", f"--workdir={workdir}",
         f"--config.data.codes_dir={stage2_codes_dir}", f"--config.train.num_steps={NUM_STEPS}",
         f"--config.train.ckpt_every={CKPT_EVERY}", f"--config.train.log_every={NUM_STEPS}",
         f"--config.train.eval_every={NUM_STEPS}", f"--config.optim.learning_rate={config.optim.learning_rate}",
         "--config.model.spatial_layers=1", "--config.model.depth_layers=1"]
  proc = subprocess.Popen(cmd, cwd=helpers.REPO, env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  try:
    # A finished checkpoint directory exists only once the loop (and so the signal handler) is running.
    first_ckpt = os.path.join(workdir, "checkpoints", str(CKPT_EVERY))
    deadline = time.time() + 600  # start-up and compiling, on a shared CPU
    while not os.path.isdir(first_ckpt) and proc.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0].decode()[-3000:]
    assert os.path.isdir(first_ckpt), "the child wrote no checkpoint within 600 s"
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=600)[0].decode()
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == 0, out[-3000:]
  assert "stopped at step" in out, out[-3000:]
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=3, save_interval_steps=1,
                               read_only=True) as c:
    stopped_at = c.latest_step()
  assert CKPT_EVERY <= stopped_at < NUM_STEPS, out[-3000:]
  assert f"stopped at step {stopped_at}" in out, out[-3000:]

  # The child's checkpoint equals an uninterrupted in-process run to the same step (same config, same schedule).
  reference = str(tmp_path / "reference")
  ref = trainer.train_and_evaluate(config, reference, stop_after_steps=stopped_at)
  assert ref["step"] == stopped_at
  child, step = _final_state(workdir, config)
  assert step == stopped_at
  helpers.assert_trees_equal(child, ref["state"])

  # Resuming the preempted run continues bit for bit (state and data-iterator position restored): it ends where an
  # uninterrupted run of the same config ends.
  resumed = trainer.train_and_evaluate(config, workdir, stop_after_steps=RESUME_STEPS)
  uninterrupted = trainer.train_and_evaluate(config, str(tmp_path / "uninterrupted"),
                                             stop_after_steps=stopped_at + RESUME_STEPS)
  assert resumed["step"] == uninterrupted["step"] == stopped_at + RESUME_STEPS
  assert int(jax.device_get(resumed["state"].step)) == stopped_at + RESUME_STEPS
  helpers.assert_trees_equal(resumed["state"], uninterrupted["state"])
