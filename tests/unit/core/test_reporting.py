"""What a person sees (ctxrq_jax/core/reporting.py): result tables, progress lines, TensorBoard event files."""

import io
import struct
import sys

import numpy as np

from ctxrq_jax.core import reporting


def test_table_formatting():
  out = reporting.table([["a", 1.23456], ["bb", 2], ["ccc", 1e-7]], ["name", "value"])
  assert out == ("name  value\n"
                 "----  -----\n"
                 "a     1.235\n"
                 "bb        2\n"
                 "ccc   1e-07")
  # First column left-aligned, the others right-aligned; floats by `floatfmt`, everything else by str().
  assert reporting.table([["x", 0.5, "50%"]], ["", "f", "pct"], floatfmt=".2f") == ("      f  pct\n"
                                                                                    "-  ----  ---\n"
                                                                                    "x  0.50  50%")
  assert reporting.table([], ["only", "header"]) == "only  header\n----  ------"


def test_duration():
  assert reporting._duration(5.4) == "5s"
  assert reporting._duration(65) == "1m05s"
  assert reporting._duration(3725) == "1h02m05s"
  assert reporting._duration(-3) == "0s"


class _Tty(io.StringIO):

  def isatty(self):
    return True


def test_progress_in_a_log_prints_one_line_at_the_end():
  stream = io.StringIO()
  with reporting.Progress("stage 2", 4, stream=stream) as p:
    p.update(2, "loss 1.5")
    assert stream.getvalue() == ""  # not a terminal: nothing while it runs (until log_every_secs)
    assert p.line().startswith("stage 2: 2/4 steps, ") and "ETA" in p.line() and p.line().endswith("loss 1.5")
    p.update(4)
  p.close()  # a second close prints nothing more
  lines = stream.getvalue().splitlines()
  assert len(lines) == 1 and lines[0].startswith("stage 2: 4/4 steps, ") and " in " in lines[0], lines
  assert lines[0].endswith("loss 1.5")
  # A long run in a log: a line at most every log_every_secs while it runs.
  stream = io.StringIO()
  p = reporting.Progress("encode", 10, unit="images", stream=stream, log_every_secs=0.0)
  p.update(3)
  assert stream.getvalue().startswith("encode: 3/10 images")
  # A streamed source of unknown size (total 0): the count alone, logged while it runs, no ETA.
  stream = io.StringIO()
  with reporting.Progress("encode train", 0, unit="images", stream=stream, log_every_secs=0.0) as p:
    p.update(3)
    assert stream.getvalue().startswith("encode train: 3 images, ") and "ETA" not in stream.getvalue()
  assert stream.getvalue().splitlines()[-1].startswith("encode train: 3 images, ")


def test_progress_on_a_terminal_rewrites_its_line():
  stream = _Tty()
  p = reporting.Progress("stage 1", 2, stream=stream, min_interval_secs=0.0)
  p.update(1)
  p.update(2)
  p.close()
  out = stream.getvalue()
  assert out.count("\r\033[K") == 3 and out.endswith("\n") and out.count("\n") == 1
  assert "stage 1: 2/2 steps" in out.split("\r\033[K")[-1]


def _records(path):
  """The payloads of a TFRecord file (length, length CRC, data, data CRC per record)."""
  data, out, i = open(path, "rb").read(), [], 0
  while i < len(data):
    (n,) = struct.unpack("<Q", data[i:i + 8])
    out.append(data[i + 12:i + 12 + n])
    i += 12 + n + 4
  return out


def test_event_writer_writes_scalars_and_images_without_tensorflow(tmp_path):
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  had_tf = "tensorflow" in sys.modules
  w = reporting.EventWriter(str(tmp_path / "logs"))
  w.write_scalars(3, {"train/loss": 1.5, "train/lr": np.float32(0.25)})
  w.write_images(4, {"recon": np.zeros((2, 4, 4, 1), np.uint8), "one": np.full((1, 3, 5, 3), 7, np.uint8)})
  w.flush()
  w.close()
  assert had_tf or "tensorflow" not in sys.modules
  events = [event_pb2.Event.FromString(r) for r in _records(w.path)]
  assert events[0].file_version == "brain.Event:2"
  scalars = {v.tag: v.simple_value for v in events[1].summary.value}
  assert events[1].step == 3 and scalars == {"train/loss": 1.5, "train/lr": 0.25}
  images = {v.tag: (v.image.height, v.image.width, v.image.colorspace) for v in events[2].summary.value}
  assert events[2].step == 4 and images == {"recon/0": (4, 4, 1), "recon/1": (4, 4, 1), "one": (3, 5, 3)}
  assert all(v.image.encoded_image_string.startswith(b"\x89PNG") for v in events[2].summary.value)


def test_metric_writer_on_process_zero(tmp_path):
  assert isinstance(reporting.metric_writer(str(tmp_path)), reporting.EventWriter)
  null = reporting.NullWriter()
  null.write_scalars(1, {"a": 1.0})
  null.write_images(1, {})
  null.flush()
  null.close()
