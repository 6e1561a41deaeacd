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
  * checkpoints are saved on the checkpointer's interval and at the last step, never past an unchecked step; each
    holds the last logged train scalars and periodic outputs as its metadata, so a run resumed at (or past)
    `num_steps`, which trains no step, returns the results of its last steps (or, from a checkpoint without them,
    runs each `Periodic` once) instead of empty ones.

Several steps per call (`StepsPerCall`, e.g. `train.steps_per_call` of stage 2): one compiled program runs up to k
steps (`scan_steps`) on k batches stacked on a leading axis, so per-call costs are paid once per k steps. On a CPU
the largest of them is the step's temporary buffer, which the allocator maps afresh (and the kernel zero-fills
page by page) at every call (docs/speed.md). A call ends at the next multiple of k, or earlier at the next multiple
of `log_every`, the checkpoint interval or a periodic cadence, and at `num_steps` (`call_end`): every step listed
above still happens at its step, and the calls depend only on the config, never on where a run was interrupted,
so a resumed run repeats the uninterrupted run's calls. Signals and `stop_after_steps` take effect at the end of a
call; a non-finite step is named exactly.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from ctxrq_jax.core import checkpoint
from ctxrq_jax.core import reporting

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Periodic:
  """`fn(step, state) -> dict of scalars or None`, run every `every` steps and at the last step."""
  name: str
  every: int
  fn: Callable[[int, Any], Optional[dict[str, float]]]


@dataclasses.dataclass(frozen=True)
class StepsPerCall:
  """Up to `count` steps per call: `train_steps(state, next_batches(n)) -> (state, metrics)`, the n batches stacked
  on a leading axis and each metric stacked [n] (`scan_steps` of the one-step function builds `train_steps`)."""
  count: int
  train_steps: Callable[[Any, Any], tuple[Any, Any]]
  next_batches: Callable[[int], Any]


def scan_steps(step_fn: Callable[..., tuple[Any, Any]]) -> Callable[..., tuple[Any, Any]]:
  """`step_fn(state, batch, *args) -> (state, metrics)` -> `fn(state, batches, *args) -> (state, metrics)` running
  it on each batch of `batches` (every leaf with a leading [n] axis) in turn, in one `lax.scan`; metrics [n, ...]."""

  def steps(state: Any, batches: Any, *args: Any) -> tuple[Any, Any]:
    return jax.lax.scan(lambda s, batch: step_fn(s, batch, *args), state, batches)

  return steps


def call_end(step: int, *, num_steps: int, steps_per_call: int, cadences: Sequence[int] = ()) -> int:
  """The last step of the call after `step`: the next multiple of `steps_per_call`, or of any of `cadences` (log,
  checkpoint and periodic intervals) if one comes first, and at most `num_steps`."""
  end = int(num_steps)
  for every in (int(steps_per_call), *(int(c) for c in cadences)):
    if every < 1:
      raise ValueError(f"steps per call and cadences must be >= 1, got {every}")
    end = min(end, (int(step) // every + 1) * every)
  return end


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
        stop_after_steps: Optional[int] = None, steps_per_call: Optional[StepsPerCall] = None) -> Result:
  """Trains from `state.step` to `num_steps` (see the module doc); returns a `Result`."""
  if nonfinite not in (None, "stop", "skip"):
    raise ValueError(f"nonfinite must be None, 'stop' or 'skip', got {nonfinite!r}")
  per_call = 1 if steps_per_call is None else int(steps_per_call.count)
  if per_call < 1:
    raise ValueError(f"steps per call must be >= 1, got {per_call}")
  cadences = [int(log_every), checkpointer.save_interval_steps, *(int(p.every) for p in periodic)]
  start_step = int(jax.device_get(state.step))
  result = Result(state=state, step=start_step, stopped=False)
  pending: Optional[tuple[int, Any]] = None  # (first step of a call, its finite flag(s)), checked one call late

  def check_finite() -> None:
    nonlocal pending
    if pending is None:
      return
    first, flags = pending
    pending = None
    bad = [first + int(i) for i in np.flatnonzero(np.atleast_1d(jax.device_get(flags)) == 0)]
    if not bad:
      return
    if nonfinite == "stop":
      checkpointer.close()
      writer.flush()
      raise FloatingPointError(
          f"non-finite loss or gradient at step {bad[0]}; training stopped without saving it "
          f"(train.nonfinite='stop'). Latest checkpoint: step {checkpointer.latest_step()} in "
          f"{checkpointer.directory}.")
    for step in bad:
      result.skipped_steps += 1
      log.warning("non-finite loss or gradient at step %d: update skipped (%d so far)", step, result.skipped_steps)

  if start_step >= num_steps:  # nothing to train: the results of the run's last steps
    _restore_results(result, checkpointer, start_step, state, periodic)

  def save(step: int, force: bool) -> bool:
    return checkpointer.save(step, state, data_iterator=data_iterator, force=force,
                             metadata={_RESULTS: {"train": result.train, "periodic": result.periodic}})

  step = start_step
  with checkpoint.PreemptionGuard() as guard, reporting.Progress(name, num_steps, start=start_step) as progress:
    while step < num_steps:
      first = step + 1
      end = call_end(step, num_steps=num_steps, steps_per_call=per_call, cadences=cadences)
      with jax.profiler.StepTraceAnnotation("train", step_num=first):
        if end == first:
          state, metrics = train_step(state, next_batch())
        else:  # metrics stacked [end - first + 1]; the logged values are the last step's
          state, metrics = steps_per_call.train_steps(state, steps_per_call.next_batches(end - first + 1))
      step = end
      if nonfinite is not None:
        check_finite()
        pending = (first, metrics["finite"])
      last = step == num_steps
      if step % log_every == 0 or last:
        check_finite()
        scalars = {f"train/{k}": float(np.atleast_1d(v)[-1]) for k, v in jax.device_get(metrics).items()}
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
        save(step, force=True)
        writer.flush()
        log.warning("%s stopped at step %d (signal or stop_after_steps); checkpoint saved. Re-run the same "
                        "command to resume.", name, step)
        result.stopped = not last
        break
      if checkpointer.should_save(step) or last:
        check_finite()  # never checkpoint past an unchecked step
        save(step, force=last)
        # The metrics reach the event file at the checkpoint cadence too (on a bucket it is uploaded on flush).
        writer.flush()
    check_finite()
    # Still inside the guard: close() waits for the last (asynchronous) save, which a SIGTERM arriving now must not
    # kill half-written.
    checkpointer.close()
    writer.flush()
  result.state, result.step = state, int(jax.device_get(state.step))
  return result


_RESULTS = "results"  # the checkpoint metadata's key of {'train': scalars, 'periodic': {name: scalars}}


def _restore_results(result: Result, checkpointer: checkpoint.Checkpointer, step: int, state: Any,
                     periodic: Sequence[Periodic]) -> None:
  """Fills `result.train` / `result.periodic` of a run that trains no step: from the metadata of checkpoint `step`,
  or else (a checkpoint saved without them) by running each `Periodic` once on `state` (no checkpoint or log is
  written; a periodic job's own outputs, such as stage 1's reconstruction images, are written again)."""
  try:
    saved = (checkpointer.read_metadata(step) or {}).get(_RESULTS)
  except Exception as e:  # pylint: disable=broad-except  (an unreadable metadata item: evaluate instead)
    log.info("no results in checkpoint %d (%s); running the periodic work once", step, e)
    saved = None
  if isinstance(saved, dict) and isinstance(saved.get("periodic"), dict):
    result.train = {str(k): float(v) for k, v in (saved.get("train") or {}).items()}
    result.periodic = {str(n): {str(k): float(v) for k, v in out.items()} for n, out in saved["periodic"].items()}
    if all(p.name in result.periodic for p in periodic):
      return
  for p in periodic:
    if p.name not in result.periodic:
      out = p.fn(step, state)
      if out:
        result.periodic[p.name] = {k: float(v) for k, v in out.items()}

