"""The one training-loop skeleton both trainers run: steps, preemption, checkpoint cadence, logging, periodic work.

    result = loop.run(state, train_step=..., next_batch=..., checkpointer=ckpt, data_iterator=it, ...)

Per step t (from the state's step + 1 to `num_steps`): `state, metrics = train_step(state, next_batch())`, then
  * the non-finite flag `metrics['finite']` (when `nonfinite` is set) is checked one step late, so dispatch stays
    asynchronous; 'stop' raises FloatingPointError naming the step without saving (the last good checkpoint stays
    the latest), 'skip' counts it (the train step itself must have dropped the update);
  * every `log_every` steps and at the last step the metrics are fetched, written to TensorBoard, and the loss shown
    on the progress line;
  * each `Periodic(every, fn)` runs `fn(step, state)` on its cadence and at the last step; the scalars it returns
    are written and kept in the result;
  * SIGTERM / SIGINT (any host, see `PreemptionGuard`) or `stop_after_steps` steps in this call save a checkpoint
    with the data-iterator position and return early (`stopped`); re-running the same command resumes bit for bit;
  * checkpoints are saved on the checkpointer's interval and at the last step, never past an unchecked step.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Optional, Sequence

import jax

from ctxrq_jax.core import checkpoint
from ctxrq_jax.core import reporting

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Periodic:
  """`fn(step, state) -> dict of scalars or None`, run every `every` steps and at the last step."""
  name: str
  every: int
  fn: Callable[[int, Any], Optional[dict[str, float]]]


@dataclasses.dataclass
class Result:
  state: Any
  step: int  # the last completed step
  stopped: bool  # stopped before num_steps (signal or stop_after_steps)
  train: dict[str, float] = dataclasses.field(default_factory=dict)  # last logged train scalars
  periodic: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)  # last output of each Periodic
  history: list[tuple[int, float]] = dataclasses.field(default_factory=list)  # (step, loss) at log steps
  skipped_steps: int = 0


def run(state: Any, *, name: str, train_step: Callable[[Any, Any], tuple[Any, Any]], next_batch: Callable[[], Any],
        checkpointer: checkpoint.Checkpointer, data_iterator: Any, num_steps: int, log_every: int, writer: Any,
        periodic: Sequence[Periodic] = (), nonfinite: Optional[str] = None,
        stop_after_steps: Optional[int] = None) -> Result:
  """Trains from `state.step` to `num_steps` (see the module doc); returns a `Result`."""
  if nonfinite not in (None, "stop", "skip"):
    raise ValueError(f"nonfinite must be None, 'stop' or 'skip', got {nonfinite!r}")
  start_step = int(jax.device_get(state.step))
  result = Result(state=state, step=start_step, stopped=False)
  pending: Optional[tuple[int, Any]] = None  # (step, finite flag), checked one step late

  def check_finite() -> None:
    nonlocal pending
    if pending is None:
      return
    step, flag = pending
    pending = None
    if bool(jax.device_get(flag)):
      return
    if nonfinite == "stop":
      checkpointer.close()
      raise FloatingPointError(
          f"non-finite loss or gradient at step {step}; the update was not applied and training stopped "
          f"(train.nonfinite='stop'). Latest checkpoint: step {checkpointer.latest_step()} in "
          f"{checkpointer.directory}.")
    result.skipped_steps += 1
    log.warning("non-finite loss or gradient at step %d: update skipped (%d so far)", step, result.skipped_steps)

  step = start_step
  with checkpoint.PreemptionGuard() as guard, reporting.Progress(name, num_steps, start=start_step) as progress:
    for step in range(start_step + 1, num_steps + 1):
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, metrics = train_step(state, next_batch())
      if nonfinite is not None:
        check_finite()
        pending = (step, metrics["finite"])
      last = step == num_steps
      if step % log_every == 0 or last:
        check_finite()
        scalars = {f"train/{k}": float(v) for k, v in jax.device_get(metrics).items()}
        writer.write_scalars(step, scalars)
        result.train = scalars
        if "train/loss" in scalars:
          result.history.append((step, scalars["train/loss"]))
          progress.update(step, f"loss {scalars['train/loss']:.4g}")
      progress.update(step)
      for p in periodic:
        if step % p.every == 0 or last:
          out = p.fn(step, state)
          if out:
            writer.write_scalars(step, out)
            result.periodic[p.name] = out
      if guard.stop_requested(step) or (stop_after_steps is not None and step - start_step >= stop_after_steps
                                        and not last):
        check_finite()
        checkpointer.save(step, state, data_iterator=data_iterator, force=True)
        log.warning("%s stopped at step %d (signal or stop_after_steps); checkpoint saved. Re-run the same "
                        "command to resume.", name, step)
        result.stopped = not last
        break
      if checkpointer.should_save(step) or last:
        check_finite()  # never checkpoint past an unchecked step
        checkpointer.save(step, state, data_iterator=data_iterator, force=last)
    check_finite()
  checkpointer.close()
  writer.flush()
  result.state, result.step = state, int(jax.device_get(state.step))
  return result
