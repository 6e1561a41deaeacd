"""What a person sees while a run goes: one progress line per stage, and result tables.

A `Progress` line shows the stage, steps done, steps/s and the ETA. On a terminal it is rewritten in place; in a log
(not a terminal) it prints when the stage ends, and at most every `log_every_secs` while it runs, so a log of a long
run still shows it advancing. Only process 0 prints. Metrics go to TensorBoard (`metric_writer`), not the terminal.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional, Sequence, TextIO

import jax


def _duration(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
  """`with Progress('stage 2', total=480, unit='steps') as p: ... p.update(step)`; one line per stage."""

  def __init__(self, name: str, total: int, *, unit: str = "steps", start: int = 0, stream: Optional[TextIO] = None,
               log_every_secs: float = 300.0, min_interval_secs: float = 0.5):
    self.name, self.total, self.unit = name, int(total), unit
    self.start_count = self.count = int(start)
    self.stream = stream if stream is not None else sys.stderr
    self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
    self.log_every_secs, self.min_interval_secs = float(log_every_secs), float(min_interval_secs)
    self.enabled = jax.process_index() == 0
    self.t0 = self._last_draw = self._last_log = time.perf_counter()
    self.extra = ""
    self._closed = False

  def rate(self) -> float:
    return (self.count - self.start_count) / max(time.perf_counter() - self.t0, 1e-9)

  def line(self) -> str:
    done = self.count - self.start_count
    rate = self.rate()
    # total <= 0: not known in advance (a streamed source): the count alone, no ETA.
    parts = [f"{self.name}: {self.count}{f'/{self.total}' if self.total > 0 else ''} {self.unit}"]
    if done:
      parts.append(f"{rate:.2f} {self.unit}/s")
      if self.count < self.total:
        parts.append(f"ETA {_duration((self.total - self.count) / max(rate, 1e-9))}")
      else:
        parts.append(f"in {_duration(time.perf_counter() - self.t0)}")
    if self.extra:
      parts.append(self.extra)
    return ", ".join(parts)

  def update(self, count: int, extra: str = "") -> None:
    """Sets the number done (absolute) and an optional short status (e.g. 'loss 1.83')."""
    self.count = int(count)
    if extra:
      self.extra = extra
    if not self.enabled:
      return
    now = time.perf_counter()
    if self.tty and (now - self._last_draw >= self.min_interval_secs or self.count >= self.total):
      self.stream.write("\r\033[K" + self.line())
      self.stream.flush()
      self._last_draw = now
    elif not self.tty and now - self._last_log >= self.log_every_secs and (self.total <= 0 or
                                                                         self.count < self.total):
      self.stream.write(self.line() + "\n")
      self.stream.flush()
      self._last_log = now

  def close(self) -> None:
    if self._closed:
      return
    self._closed = True
    if self.enabled:
      self.stream.write(("\r\033[K" if self.tty else "") + self.line() + "\n")
      self.stream.flush()

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class EventWriter:
  """TensorBoard event files (scalars and images) written with the `tensorboard` package's protobufs, so no
  TensorFlow import: `write_scalars(step, {name: value})`, `write_images(step, {name: uint8 [N, H, W, C]})`."""

  def __init__(self, logdir: str):
    import os  # pylint: disable=g-import-not-at-top
    import socket  # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
    from tensorboard.summary.writer.record_writer import RecordWriter  # pylint: disable=g-import-not-at-top
    from ctxrq_jax.core import paths  # pylint: disable=g-import-not-at-top
    directory = paths.path(logdir)
    directory.mkdir(parents=True, exist_ok=True)
    self.path = str(directory / f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}")
    self._file = paths.path(self.path).open("wb")  # local or a bucket (gfile uploads the object on flush/close)
    self._records = RecordWriter(self._file)
    self._event = event_pb2.Event
    self._records.write(self._event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())

  def _add(self, step: int, values: list[Any]) -> None:
    from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top
    event = self._event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values))
    self._records.write(event.SerializeToString())

  def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
    from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top
    self._add(step, [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()])

  def write_images(self, step: int, images: dict[str, Any]) -> None:
    import io  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from PIL import Image  # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top
    values = []
    for tag, batch in images.items():
      for i, img in enumerate(np.asarray(batch)):
        img = img[..., 0] if img.shape[-1] == 1 else img
        buf = io.BytesIO()
        Image.fromarray(np.asarray(img, np.uint8)).save(buf, format="PNG")
        pb = summary_pb2.Summary.Image(height=img.shape[0], width=img.shape[1],
                                       colorspace=1 if img.ndim == 2 else img.shape[-1],
                                       encoded_image_string=buf.getvalue())
        values.append(summary_pb2.Summary.Value(tag=tag if len(batch) == 1 else f"{tag}/{i}", image=pb))
    self._add(step, values)

  def flush(self) -> None:
    self._records.flush()

  def close(self) -> None:
    if not self._file.closed:
      self._records.close()


class NullWriter:
  """What processes other than 0 write: nothing."""

  def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
    del step, scalars

  def write_images(self, step: int, images: dict[str, Any]) -> None:
    del step, images

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


def metric_writer(workdir: str) -> EventWriter | NullWriter:
  """TensorBoard writer in `workdir` on process 0 (a `NullWriter` elsewhere). Scalars are not echoed to the terminal:
  the progress line and the final table are."""
  return EventWriter(workdir) if jax.process_index() == 0 else NullWriter()


def table(rows: Sequence[Sequence[Any]], header: Sequence[str], *, floatfmt: str = ".4g") -> str:
  """A plain-text table with aligned columns; floats formatted with `floatfmt`."""
  def fmt(v: Any) -> str:
    if isinstance(v, float):
      return format(v, floatfmt)
    return str(v)
  cells = [[fmt(v) for v in r] for r in rows]
  widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
  line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
  return "\n".join([line(list(header)), "  ".join("-" * w for w in widths)] + [line(r) for r in cells])


def markdown_table(rows: Sequence[Sequence[Any]], header: Sequence[str], *, floatfmt: str = ".4g") -> str:
  """The same table in markdown (for report files)."""
  fmt = lambda v: format(v, floatfmt) if isinstance(v, float) else str(v)  # noqa: E731
  line = lambda cells: "| " + " | ".join(fmt(c) for c in cells) + " |"  # noqa: E731
  return "\n".join([line(header), line(["---"] * len(header))] + [line(r) for r in rows])
