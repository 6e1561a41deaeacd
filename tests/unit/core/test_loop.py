"""The shared training loop (ctxrq_jax/core/loop.py) with a toy state and step: logging and periodic cadence,
checkpoint cadence, stop / resume bit for bit (also by signal), and the non-finite policies."""

import os
import signal
import threading

import flax
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxrq_jax.core import checkpoint
from ctxrq_jax.core import loop
from tests import helpers

NUM_STEPS = 10


@flax.struct.dataclass
class Toy:
  step: jax.Array
  w: jax.Array


def _state():
  return Toy(step=jnp.zeros((), jnp.int32), w=jnp.zeros((), jnp.float32))


def _iterator():
  """A grain iterator over 0, 1, 2, ... (its position is checkpointed with the state)."""
  return iter(grain.MapDataset.range(1000).to_iter_dataset())


def _step(bad_batches=()):
  """w += batch; the loss is the new w. Batches in `bad_batches` give a non-finite loss and leave the state alone
  (as the trainers' steps drop such an update on device)."""

  def train_step(state, batch):
    finite = jnp.asarray(batch not in bad_batches)
    w = jnp.where(finite, state.w + batch, state.w)
    loss = jnp.where(finite, w, jnp.nan)
    return Toy(step=state.step + 1, w=w), {"loss": loss, "finite": finite.astype(jnp.float32)}

  return train_step


class Writer:
  """Records what the loop writes."""

  def __init__(self):
    self.scalars, self.flushed = [], 0

  def write_scalars(self, step, scalars):
    self.scalars.append((step, dict(scalars)))

  def write_images(self, step, images):
    raise AssertionError("the loop writes no images itself")

  def flush(self):
    self.flushed += 1

  def steps_with(self, prefix):
    return [s for s, d in self.scalars if any(k.startswith(prefix) for k in d)]


def _run(directory, *, state=None, it=None, writer=None, save_every=100, train_step=None, **kw):
  it = _iterator() if it is None else it
  ckpt = checkpoint.Checkpointer(directory, max_to_keep=20, save_interval_steps=save_every)
  if state is None:
    restored, _ = ckpt.restore(_state(), data_iterator=it)
    state = _state() if restored is None else restored
  kw = {"num_steps": NUM_STEPS, "log_every": 100, **kw}
  return loop.run(state, name="toy", train_step=train_step or _step(), next_batch=lambda: np.float32(next(it)),
                  checkpointer=ckpt, data_iterator=it, writer=writer or Writer(), **kw)


def _saved_steps(directory):
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def test_log_periodic_and_checkpoint_cadence(tmp_path):
  writer, calls = Writer(), {"p": [], "q": []}

  def p(step, state):
    calls["p"].append((step, int(state.step)))
    return {"p/step": float(step)}

  def q(step, state):
    calls["q"].append(step)  # returns nothing: nothing written or kept

  result = _run(tmp_path / "ckpt", writer=writer, log_every=3, save_every=4,
                periodic=[loop.Periodic("p", 4, p), loop.Periodic("q", 5, q)])
  assert result.step == NUM_STEPS and not result.stopped and result.skipped_steps == 0
  # Train metrics every log_every steps and at the last step; the loss after step t is 0 + 1 + ... + (t - 1).
  assert writer.steps_with("train/") == [3, 6, 9, 10]
  assert result.history == [(3, 3.0), (6, 15.0), (9, 36.0), (10, 45.0)]
  assert result.train == {"train/loss": 45.0, "train/finite": 1.0}
  # Periodic work on its cadence and at the last step, with the state of that step.
  assert calls == {"p": [(4, 4), (8, 8), (10, 10)], "q": [5, 10]}
  assert writer.steps_with("p/") == [4, 8, 10] and result.periodic == {"p": {"p/step": 10.0}}
  # Checkpoints on the interval and at the last step.
  assert _saved_steps(tmp_path / "ckpt") == [4, 8, 10]
  assert int(result.state.step) == 10 and float(result.state.w) == 45.0
  assert writer.flushed >= 3  # at every checkpoint: a killed run's event file (a bucket object) keeps its metrics


def test_stop_after_steps_saves_and_resume_continues_bit_for_bit(tmp_path):
  full = _run(tmp_path / "full", log_every=1)
  part = _run(tmp_path / "split", stop_after_steps=4, log_every=1)
  assert part.stopped and part.step == 4
  assert _saved_steps(tmp_path / "split") == [4]  # saved although 4 is not on the save interval
  assert [s for s, _ in part.history] == [1, 2, 3, 4]
  # A fresh process would restore the state and the iterator position and go on from step 5.
  rest = _run(tmp_path / "split", log_every=1)
  assert not rest.stopped and rest.step == NUM_STEPS
  assert rest.history == full.history[4:]  # the same batches 4, 5, ... as the uninterrupted run
  helpers.assert_trees_equal(rest.state, full.state)
  # stop_after_steps reaching the last step is simply the end of the run.
  again = _run(tmp_path / "to_the_end", stop_after_steps=NUM_STEPS)
  assert not again.stopped and again.step == NUM_STEPS


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="signal handlers need the main thread")
def test_sigterm_stops_after_the_step_and_saves(tmp_path):
  inner = _step()

  def train_step(state, batch):
    if int(batch) == 2:  # during step 3
      os.kill(os.getpid(), signal.SIGTERM)
    return inner(state, batch)

  before = signal.getsignal(signal.SIGTERM)
  stopped = _run(tmp_path / "ckpt", train_step=train_step)
  assert signal.getsignal(signal.SIGTERM) is before  # the guard put the old handler back
  assert stopped.stopped and stopped.step == 3 and _saved_steps(tmp_path / "ckpt") == [3]
  rest = _run(tmp_path / "ckpt")
  assert rest.step == NUM_STEPS and float(rest.state.w) == 45.0


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="signal handlers need the main thread")
def test_a_signal_while_the_last_save_completes_does_not_kill_it(tmp_path, monkeypatch):
  # close() waits for the last asynchronous save; a preemption notice arriving then must not kill the process with
  # the checkpoint half-written (the default SIGTERM action), so the guard is still installed while it runs.
  real_close = checkpoint.Checkpointer.close

  def close(self):
    os.kill(os.getpid(), signal.SIGTERM)
    real_close(self)

  monkeypatch.setattr(checkpoint.Checkpointer, "close", close)
  outside = []  # what the process's own handler (here a recorder, by default: death) received
  before = signal.signal(signal.SIGTERM, lambda signum, frame: outside.append(signum))
  try:
    result = _run(tmp_path / "ckpt")
  finally:
    signal.signal(signal.SIGTERM, before)
  assert not outside, "SIGTERM reached the process's own handler while the last checkpoint was being completed"
  assert result.step == NUM_STEPS and _saved_steps(tmp_path / "ckpt") == [NUM_STEPS]


def test_nonfinite_stop_raises_naming_the_step_without_saving_it(tmp_path):
  # Batch 4 is used by step 5: its flag is checked one step late, at step 6, which raises before saving 6.
  with pytest.raises(FloatingPointError, match=r"non-finite loss or gradient at step 5; .*Latest checkpoint: step 4"):
    _run(tmp_path / "ckpt", train_step=_step(bad_batches=(4,)), nonfinite="stop", save_every=2)
  assert _saved_steps(tmp_path / "ckpt") == [2, 4]


def test_nonfinite_skip_counts_and_finishes(tmp_path):
  writer = Writer()
  result = _run(tmp_path / "ckpt", train_step=_step(bad_batches=(2, 6)), nonfinite="skip", writer=writer,
                log_every=1)
  assert result.step == NUM_STEPS and not result.stopped and result.skipped_steps == 2
  assert float(result.state.w) == 45.0 - 2 - 6  # the two updates were dropped
  assert [s for s, d in writer.scalars if d.get("train/finite") == 0.0] == [3, 7]


def test_nonfinite_setting_is_checked(tmp_path):
  with pytest.raises(ValueError, match="nonfinite must be None, 'stop' or 'skip', got 'ignore'"):
    _run(tmp_path / "ckpt", nonfinite="ignore")


# ------------------------------------------------------------------ several steps per call
def test_call_end_stops_at_every_cadence_and_the_last_step():
  ends, step = [], 0
  while step < 20:
    step = loop.call_end(step, num_steps=20, steps_per_call=4, cadences=(6, 10))
    ends.append(step)
  assert ends == [4, 6, 8, 10, 12, 16, 18, 20]
  assert loop.call_end(5, num_steps=20, steps_per_call=1, cadences=(6,)) == 6  # one step per call
  assert loop.call_end(7, num_steps=9, steps_per_call=10) == 9
  with pytest.raises(ValueError, match="steps per call and cadences must be >= 1, got 0"):
    loop.call_end(0, num_steps=9, steps_per_call=0)


def _calls(bad_batches=()):
  """`loop.StepsPerCall` arguments of the toy step: the jitted `scan_steps` of a traceable twin of `_step`, and a
  record of the number of steps in each call."""
  bad = jnp.asarray(bad_batches, jnp.float32)

  def step(state, batch):
    finite = ~jnp.any(batch == bad)
    w = jnp.where(finite, state.w + batch, state.w)
    return Toy(step=state.step + 1, w=w), {"loss": jnp.where(finite, w, jnp.nan), "finite": finite.astype(jnp.float32)}

  sizes = []
  steps = jax.jit(loop.scan_steps(step))

  def train_steps(state, batches):
    sizes.append(int(batches.shape[0]))
    return steps(state, batches)

  return train_steps, sizes


def _run_calls(directory, per_call, bad_batches=(), **kw):
  it = _iterator()
  train_steps, sizes = _calls(bad_batches)
  spc = loop.StepsPerCall(per_call, train_steps=train_steps,
                          next_batches=lambda n: np.stack([np.float32(next(it)) for _ in range(n)]))
  return _run(directory, it=it, steps_per_call=spc, train_step=_step(bad_batches), **kw), sizes


def test_steps_per_call_keeps_every_step_cadence_and_result(tmp_path):
  writer, calls = Writer(), []
  result, sizes = _run_calls(tmp_path / "ckpt", 4, writer=writer, log_every=3, save_every=5,
                             periodic=[loop.Periodic("p", 4, lambda step, state: calls.append((step, int(state.step))))])
  # Calls end at multiples of 4 and at every log (3), checkpoint (5) and periodic (4) step: steps 1-3, 4, 5, 6,
  # 7-8, 9, 10; a one-step call runs the one-step function.
  assert sizes == [3, 2]
  assert writer.steps_with("train/") == [3, 6, 9, 10]
  assert result.history == [(3, 3.0), (6, 15.0), (9, 36.0), (10, 45.0)]
  assert calls == [(4, 4), (8, 8), (10, 10)] and _saved_steps(tmp_path / "ckpt") == [5, 10]
  assert int(result.state.step) == 10 and float(result.state.w) == 45.0


def test_steps_per_call_stop_and_resume_repeat_the_uninterrupted_calls(tmp_path):
  full, full_sizes = _run_calls(tmp_path / "full", 4, log_every=10)
  assert full_sizes == [4, 4, 2]
  part, part_sizes = _run_calls(tmp_path / "split", 4, log_every=10, stop_after_steps=3)
  assert part.stopped and part.step == 4 and part_sizes == [4]  # at the end of the call that reached step 3
  assert _saved_steps(tmp_path / "split") == [4]
  rest, rest_sizes = _run_calls(tmp_path / "split", 4, log_every=10)
  assert rest_sizes == [4, 2] and rest.step == NUM_STEPS
  helpers.assert_trees_equal(rest.state, full.state)


def test_steps_per_call_names_the_nonfinite_step(tmp_path):
  # Batch 5 is step 6's, inside the call of steps 5-8: 'stop' names step 6 and saves nothing after step 4.
  with pytest.raises(FloatingPointError, match=r"non-finite loss or gradient at step 6; .*Latest checkpoint: step 4"):
    _run_calls(tmp_path / "stop", 4, bad_batches=(5,), nonfinite="stop", save_every=4)
  assert _saved_steps(tmp_path / "stop") == [4]
  result, _ = _run_calls(tmp_path / "skip", 4, bad_batches=(1, 2, 9), nonfinite="skip")
  assert result.skipped_steps == 3 and float(result.state.w) == 45.0 - 1 - 2 - 9


def test_a_finished_run_run_again_returns_its_last_results(tmp_path):
  # No step runs the second time: the train scalars and the periodic outputs of the last steps come back from the
  # checkpoint's metadata (train.py / the demo print them), and nothing is evaluated again.
  calls = []

  def evaluate(step, state):
    calls.append(step)
    return {"eval/w": float(state.w)}

  periodic = [loop.Periodic("eval", 4, evaluate)]
  first = _run(tmp_path / "ckpt", log_every=3, periodic=periodic)
  calls.clear()
  again = _run(tmp_path / "ckpt", log_every=3, periodic=periodic)
  assert again.step == NUM_STEPS and not again.stopped and calls == []
  assert again.train == first.train == {"train/loss": 45.0, "train/finite": 1.0}
  assert again.periodic == first.periodic == {"eval": {"eval/w": 45.0}}
  # A checkpoint saved without them (an earlier version): the periodic work runs once, nothing is written.
  ckpt = checkpoint.Checkpointer(tmp_path / "old", max_to_keep=2, save_interval_steps=100)
  ckpt.save(NUM_STEPS, Toy(step=jnp.asarray(NUM_STEPS, jnp.int32), w=jnp.asarray(7.0)), force=True)
  ckpt.close()
  writer = Writer()
  old = _run(tmp_path / "old", periodic=periodic, writer=writer)
  assert calls == [NUM_STEPS] and old.periodic == {"eval": {"eval/w": 7.0}} and writer.scalars == []
