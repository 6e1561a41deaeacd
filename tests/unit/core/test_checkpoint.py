"""Checkpointer: bit-exact round trips (state + iterator), keep-N, corruption fallback; PreemptionGuard."""

import logging
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxrq_jax.core import checkpoint
from ctxrq_jax.core import cli
from ctxrq_jax.data import codes as codes_lib
from tests import helpers


def _state(seed: int = 0):
  k = jax.random.key(seed)
  k1, k2 = jax.random.split(k)
  params = {"dense": {"kernel": jax.random.normal(k1, (8, 16)), "bias": jnp.zeros((16,), jnp.bfloat16)}}
  return {
      "step": jnp.asarray(seed, jnp.int32),
      "params": params,
      "opt": (jax.random.uniform(k2, (8, 16)), jnp.asarray(seed, jnp.int32)),
      "ema": jax.tree.map(lambda x: x * 0.5, params),
      "rng": jax.random.fold_in(k, 7),  # typed key
      "raw_rng": jax.random.key_data(jax.random.key(seed + 1)),  # raw uint32 key data
  }


def _code_iterator(tmp_path):
  d = tmp_path / "codes"
  rng = np.random.default_rng(0)
  with codes_lib.CodeDatasetWriter(d, code_shape=(2, 2, 2), codebook=np.ones((8, 3), np.float32), num_classes=3,
                                   source="test") as w:
    w.write("train", rng.integers(0, 8, (24, 2, 2, 2)), rng.integers(0, 3, (24,)))
  return lambda: codes_lib.make_code_iterator(str(d), split="train", batch_size=4, seed=1, train=True,
                                              num_threads=0)


def _steps(directory):
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def test_round_trip_bit_exact_with_iterator(tmp_path):
  make_it = _code_iterator(tmp_path)
  it = make_it()
  for _ in range(3):
    next(it)
  state = _state(3)
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", max_to_keep=2, save_interval_steps=1)
  assert ckpt.save(3, state, data_iterator=it, metadata={"note": "hi"})
  expected_next = [next(it) for _ in range(4)]  # What training would have read after the save.
  ckpt.close()

  fresh_it = make_it()
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", max_to_keep=2, save_interval_steps=1)
  assert ckpt.latest_step() == 3
  restored, step = ckpt.restore(_state(0), data_iterator=fresh_it)
  assert step == 3
  helpers.assert_trees_equal(restored, state)
  assert jnp.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)
  for want in expected_next:
    got = next(fresh_it)
    np.testing.assert_array_equal(got["codes"], want["codes"])
    np.testing.assert_array_equal(got["label"], want["label"])
  assert ckpt.read_metadata() == {"note": "hi"}
  ckpt.close()


def test_restore_into_abstract_target_with_sharding(tmp_path):
  state = _state(5)
  with checkpoint.Checkpointer(tmp_path, max_to_keep=1, save_interval_steps=1) as ckpt:
    ckpt.save(5, state)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda x: x if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
      else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), _state(0))
  with checkpoint.Checkpointer(tmp_path, max_to_keep=1, save_interval_steps=1) as ckpt:
    restored, step = ckpt.restore(abstract)
  assert step == 5
  helpers.assert_trees_equal(restored, state)
  assert restored["params"]["dense"]["kernel"].sharding == sharding


def test_no_checkpoint_returns_none(tmp_path):
  with checkpoint.Checkpointer(tmp_path / "empty", max_to_keep=1, save_interval_steps=1) as ckpt:
    assert ckpt.restore(_state()) == (None, None)
    assert ckpt.latest_step() is None


def test_interval_force_and_keep_n(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=2)
  saved = [s for s in range(1, 8) if ckpt.save(s, _state(s), force=(s == 7))]
  ckpt.wait()
  assert saved == [2, 4, 6, 7]
  assert _steps(tmp_path) == [6, 7]
  assert not ckpt.save(7, _state(7), force=True)  # Already on disk: no-op, no error.
  ckpt.close()


def _corrupt_garbage(step_dir):
  # The largest array-data file of the state item gets garbage bytes.
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs]
  data_files = [f for f in files if f"{os.sep}d{os.sep}" in f]
  target = max(data_files, key=os.path.getsize)
  with open(target, "r+b") as f:
    n = os.path.getsize(target)
    f.write(np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes())


def _corrupt_truncate(step_dir):
  for name in ("manifest.ocdbt", "_METADATA"):
    with open(os.path.join(step_dir, "state", name), "r+b") as f:
      f.truncate(5)


def _corrupt_missing(step_dir):
  os.remove(os.path.join(step_dir, "state", "_METADATA"))
  os.remove(os.path.join(step_dir, "state", "manifest.ocdbt"))


@pytest.mark.parametrize("corrupt", [_corrupt_garbage, _corrupt_truncate, _corrupt_missing])
def test_corrupt_latest_falls_back(tmp_path, caplog, corrupt):
  ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=3, save_interval_steps=1)
  for s in (1, 2):
    ckpt.save(s, _state(s))
  ckpt.close()
  corrupt(str(tmp_path / "2"))
  # A leftover unfinished write of a later step (a killed run) must be ignored too.
  tmp_dir = tmp_path / "3.orbax-checkpoint-tmp-123"
  tmp_dir.mkdir()
  (tmp_dir / "junk").write_bytes(b"\x00garbage")

  ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=3, save_interval_steps=1)
  with caplog.at_level(logging.WARNING):
    restored, step = ckpt.restore(_state(0))
  assert step == 1
  helpers.assert_trees_equal(restored, _state(1))
  assert any(str(tmp_path / "2") in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
  # The good checkpoint is untouched; the bad one moved aside, not deleted.
  assert _steps(tmp_path) == [1]
  assert any(n.startswith("2.corrupt-") for n in os.listdir(tmp_path))
  # Training resumes and can save step 2 again; the good step 1 is still restorable.
  assert ckpt.save(2, _state(22))
  ckpt.close()
  with checkpoint.Checkpointer(tmp_path, max_to_keep=3, save_interval_steps=1) as ckpt:
    restored, step = ckpt.restore(_state(0))
  assert step == 2
  helpers.assert_trees_equal(restored, _state(22))
  assert _steps(tmp_path) == [1, 2]


def test_a_step_saved_again_is_never_checked_against_its_predecessors_manifest(tmp_path, monkeypatch):
  # Step 2 is corrupt and moved aside, twice within the same second (distinct names, each with its manifest).
  monkeypatch.setattr(checkpoint.time, "strftime", lambda fmt: "20261202-120000")
  ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=5, save_interval_steps=1)
  ckpt.save(1, _state(1))
  ckpt.close()
  for attempt in range(2):
    with checkpoint.Checkpointer(tmp_path, max_to_keep=5, save_interval_steps=1) as ckpt:
      assert ckpt.save(2, _state(20 + attempt))
    _corrupt_garbage(str(tmp_path / "2"))
    with checkpoint.Checkpointer(tmp_path, max_to_keep=5, save_interval_steps=1) as ckpt:
      assert ckpt.restore(_state(0))[1] == 1
  moved = sorted(n for n in os.listdir(tmp_path) if n.startswith("2.corrupt-"))
  assert moved == ["2.corrupt-20261202-120000", "2.corrupt-20261202-120000-1"]
  assert all(os.path.isfile(tmp_path / n / "_checksums.json") for n in moved)
  # Training saves step 2 again and dies before that save's manifest is written (killed between orbax's commit and
  # the checksums): the new step 2 restores (unverified), it is not judged by a manifest of a step moved aside.
  ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=5, save_interval_steps=1)
  assert ckpt.restore(_state(0))[1] == 1 and ckpt.save(2, _state(30))
  ckpt._manager.wait_until_finished()  # committed; no close(): the process died
  del ckpt
  with checkpoint.Checkpointer(tmp_path, max_to_keep=5, save_interval_steps=1) as ckpt:
    restored, step = ckpt.restore(_state(0))
  assert step == 2
  helpers.assert_trees_equal(restored, _state(30))


def test_read_only_reader_leaves_a_live_run_alone(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=3, save_interval_steps=1)
  for s in (1, 2):
    ckpt.save(s, _state(s))
  ckpt.close()
  _corrupt_truncate(str(tmp_path / "2"))
  in_flight = tmp_path / "3.orbax-checkpoint-tmp-123"  # a trainer's save in progress
  in_flight.mkdir()
  (in_flight / "part").write_bytes(b"\x00")
  before = sorted(os.listdir(tmp_path))

  reader = checkpoint.Checkpointer(tmp_path, max_to_keep=1, save_interval_steps=1, read_only=True)
  restored, step = reader.restore(_state(0))
  assert step == 1  # the unreadable newest step is skipped...
  helpers.assert_trees_equal(restored, _state(1))
  with pytest.raises(RuntimeError, match="read-only"):
    reader.save(5, _state(5))
  reader.close()
  assert sorted(os.listdir(tmp_path)) == before  # ...but nothing is renamed, cleaned up or written
  with pytest.raises(FileNotFoundError, match="does not exist"):
    checkpoint.Checkpointer(tmp_path / "missing", max_to_keep=1, save_interval_steps=1, read_only=True)


def test_wrong_target_raises_and_keeps_checkpoints(tmp_path):
  with checkpoint.Checkpointer(tmp_path, max_to_keep=3, save_interval_steps=1) as ckpt:
    ckpt.save(1, _state(1))
    ckpt.save(2, _state(2))
  bad_target = _state(0)
  bad_target["params"]["dense"]["kernel"] = jnp.zeros((4, 4))
  with checkpoint.Checkpointer(tmp_path, max_to_keep=3, save_interval_steps=1) as ckpt:
    with pytest.raises(checkpoint.RestoreError, match="none of the checkpoints"):
      ckpt.restore(bad_target)
  assert _steps(tmp_path) == [1, 2]


def test_no_step_restores_is_a_one_line_error(tmp_path):
  # Every step damaged: the commands print one `error:` line (a ValueError, cli.USER_ERRORS) that names the
  # directory and the first step's cause, and the steps stay where they are.
  with checkpoint.Checkpointer(tmp_path, max_to_keep=3, save_interval_steps=1) as ckpt:
    ckpt.save(1, _state(1))
    ckpt.save(2, _state(2))
  for step in ("1", "2"):
    _corrupt_truncate(str(tmp_path / step))
  with checkpoint.Checkpointer(tmp_path, max_to_keep=3, save_interval_steps=1) as ckpt:
    with pytest.raises(cli.USER_ERRORS) as e:
      ckpt.restore(_state(0))
  assert isinstance(e.value, checkpoint.RestoreError)
  message = str(e.value)
  assert "\n" not in message and f"none of the checkpoints [1, 2] in {tmp_path}" in message, message
  assert "the first error was" in message
  assert _steps(tmp_path) == [1, 2]


def test_preemption_guard_sets_flag_and_restores_handlers():
  before = signal.getsignal(signal.SIGTERM)
  with checkpoint.PreemptionGuard() as guard:
    assert not guard.should_stop
    os.kill(os.getpid(), signal.SIGTERM)
    assert guard.should_stop and guard.stop_requested(0)
    assert guard.received_signal == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) is before


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="max_to_keep"):
    checkpoint.Checkpointer(tmp_path, max_to_keep=0, save_interval_steps=1)
  with checkpoint.Checkpointer(tmp_path, max_to_keep=1, save_interval_steps=1) as ckpt:
    with pytest.raises(TypeError, match="data_iterator"):
      ckpt.save(1, _state(), data_iterator=iter([1, 2]))


def test_saved_structure_and_partial_restore(tmp_path):
  with checkpoint.Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=1) as ckpt:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
      ckpt.saved_structure()
    ckpt.save(1, _state(1))
    ckpt.save(2, _state(2))
  with checkpoint.Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=1, read_only=True) as ckpt:
    saved = ckpt.saved_structure()
    assert sorted(saved) == sorted(_state())
    assert tuple(saved["params"]["dense"]["kernel"].shape) == (8, 16)
    assert tuple(ckpt.saved_structure(1)["opt"][0].shape) == (8, 16)
    # Only the requested top-level field is read, from the newest step.
    restored, step = ckpt.restore({"params": _state(0)["params"]}, partial=True)
  assert step == 2 and sorted(restored) == ["params"]
  helpers.assert_trees_equal(restored["params"], _state(2)["params"])


def test_hosts_agree_on_the_step_they_resume_from(tmp_path, monkeypatch):
  # Another process cannot read the newest step (a transient error on its side only): this one, which can, falls
  # back with it to the previous step instead of resuming from another step than its peer.
  ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=3, save_interval_steps=1)
  for s in (1, 2):
    ckpt.save(s, _state(s))
  ckpt.close()
  votes = []

  def agree(ok):  # the all-gather of two processes, the peer failing at the first step tried
    votes.append(ok)
    return ok and len(votes) > 1

  monkeypatch.setattr(checkpoint, "_all_processes_agree", agree)
  ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=3, save_interval_steps=1, read_only=True)
  restored, step = ckpt.restore(_state(0))
  assert votes == [True, True] and step == 1
  helpers.assert_trees_equal(restored, _state(1))


def test_one_process_agrees_with_itself():
  assert checkpoint._all_processes_agree(True) and not checkpoint._all_processes_agree(False)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing"])
def test_unreadable_metadata_of_the_newest_step_is_passed_over(tmp_path, caplog, damage):
  # The config check before a resume reads the newest step's metadata: damaged, it must not end the run (restore
  # moves such a step aside and resumes from the previous one).
  with checkpoint.Checkpointer(tmp_path, max_to_keep=3, save_interval_steps=1) as ckpt:
    for s in (1, 2):
      ckpt.save(s, _state(s))
  meta = tmp_path / "2" / "state" / "_METADATA"
  if damage == "garbage":
    meta.write_text("garbage{")
  elif damage == "truncated":
    meta.write_bytes(meta.read_bytes()[:10])
  else:
    meta.unlink()
  changed = _state(0)
  changed["extra"] = jnp.zeros(3)
  ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=3, save_interval_steps=1)
  with caplog.at_level(logging.WARNING):
    assert ckpt.newest_readable_step() == 1
    assert ckpt.differences(_state(0)) == []
    assert ckpt.differences(changed) == ["extra is not in the checkpoint"]
    assert sorted(ckpt.saved_structure()) == sorted(_state())
  assert any(str(tmp_path / "2") in r.getMessage() and "unreadable metadata" in r.getMessage() for r in caplog.records)
  from ctxrq_jax.core import config as configlib  # pylint: disable=g-import-not-at-top
  configlib.check_resumable(ckpt, _state(0), str(tmp_path))  # passes: step 1 holds this state
  with pytest.raises(configlib.ConfigError, match=r"checkpoint \(step 1\) of another state"):
    configlib.check_resumable(ckpt, changed, str(tmp_path))
  restored, step = ckpt.restore(_state(0))
  assert step == 1
  helpers.assert_trees_equal(restored, _state(1))
  ckpt.close()


def test_a_forced_save_does_not_wait_for_the_previous_steps_checksums(tmp_path, monkeypatch):
  # The preemption save (forced) must not first read the previous periodic save back for its manifest: that is
  # gigabytes for a large model, against ~30 s between SIGTERM and the kill. It is written after the new step.
  events = []
  real_sum = checkpoint.Checkpointer._file_sum
  monkeypatch.setattr(checkpoint.Checkpointer, "_file_sum",
                      staticmethod(lambda path: events.append(("sum", path.relative_to(tmp_path).parts[0]))
                                   or real_sum(path)))
  ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=3, save_interval_steps=1)
  real_save = ckpt._manager.save
  monkeypatch.setattr(ckpt._manager, "save", lambda step, **kw: events.append(("save", str(step))) or
                      real_save(step, **kw))
  ckpt.save(1, _state(1))
  ckpt.save(2, _state(2), force=True)
  assert events == [("save", "1"), ("save", "2")]  # no file of step 1 read before step 2 was written
  ckpt.close()  # then both manifests
  assert {e for e in events if e[0] == "sum"} == {("sum", "1"), ("sum", "2")}
  assert all(os.path.isfile(tmp_path / f"_checksums-{s}.json") for s in (1, 2))
  # A periodic save writes the previous step's manifest after starting its own write.
  events.clear()
  ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=3, save_interval_steps=1)
  real_save = ckpt._manager.save
  monkeypatch.setattr(ckpt._manager, "save", lambda step, **kw: events.append(("save", str(step))) or
                      real_save(step, **kw))
  ckpt.save(3, _state(3))
  ckpt.save(4, _state(4))
  assert events[:2] == [("save", "3"), ("save", "4")] and {e[1] for e in events[2:]} == {"3"}
  ckpt.close()
  assert os.path.isfile(tmp_path / "_checksums-3.json") and os.path.isfile(tmp_path / "_checksums-4.json")
  # The manifests still guard the steps.
  _corrupt_garbage(str(tmp_path / "4"))
  with checkpoint.Checkpointer(tmp_path, max_to_keep=3, save_interval_steps=1) as ckpt:
    assert ckpt.restore(_state(0))[1] == 3


def test_a_manifest_that_cannot_be_read_skips_the_step_on_every_process(tmp_path, monkeypatch):
  # Process 0's read error while checking a manifest must become the step's problem (broadcast to all), not an
  # exception that leaves process 0 out of the broadcast the others wait in.
  with checkpoint.Checkpointer(tmp_path, max_to_keep=3, save_interval_steps=1) as ckpt:
    for s in (1, 2):
      ckpt.save(s, _state(s))
  (tmp_path / "_checksums-2.json").write_text("{not json")
  ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=3, save_interval_steps=1, read_only=True)
  broadcasts = []
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  with monkeypatch.context() as m:  # process 0 of two, for the check alone
    m.setattr(checkpoint.jax, "process_count", lambda: 2)
    m.setattr(multihost_utils, "broadcast_one_to_all", lambda x: broadcasts.append(bytes(x)) or x)
    with pytest.raises(IOError, match="could not check it against its manifest"):
      ckpt._verify(2)
  assert len(broadcasts) == 1 and broadcasts[0].startswith(b"could not check it against its manifest")
  restored, step = ckpt.restore(_state(0))  # and one process falls back past it
  assert step == 1
  helpers.assert_trees_equal(restored, _state(1))
  ckpt.close()


def _save_as_processes(tmp_path, count, positions):
  """Saves step 3 with the code iterator 3 batches in, then rewrites its data state as `count` processes would
  (their `positions`); returns (the iterator factory, the batches after the save)."""
  make_it = _code_iterator(tmp_path)
  it = make_it()
  for _ in range(3):
    next(it)
  with checkpoint.Checkpointer(tmp_path / "ckpt", max_to_keep=2, save_interval_steps=1, async_save=False) as ckpt:
    ckpt.save(3, _state(3), data_iterator=it)
  data = tmp_path / "ckpt" / "3" / "data"
  (data / "process_0-of-1.json").unlink()
  for i, position in enumerate(positions):
    (data / f"process_{i}-of-{count}.json").write_text(f'{{"next_index": {position}}}')
  os.remove(tmp_path / "ckpt" / "_checksums-3.json")  # the data files were rewritten on purpose
  return make_it, [next(it) for _ in range(3)]


def test_a_run_saved_by_more_processes_resumes_at_the_same_global_position(tmp_path):
  make_it, expected = _save_as_processes(tmp_path, 2, [3, 3])
  fresh = make_it()
  with checkpoint.Checkpointer(tmp_path / "ckpt", max_to_keep=2, save_interval_steps=1) as ckpt:
    restored, step = ckpt.restore(_state(0), data_iterator=fresh)
  assert step == 3
  helpers.assert_trees_equal(restored, _state(3))
  for want in expected:
    np.testing.assert_array_equal(next(fresh)["codes"], want["codes"])


def test_positions_that_cannot_be_carried_over_are_a_clear_error(tmp_path):
  make_it, _ = _save_as_processes(tmp_path, 2, [3, 4])
  with checkpoint.Checkpointer(tmp_path / "ckpt", max_to_keep=2, save_interval_steps=1) as ckpt:
    with pytest.raises(checkpoint.ProcessCountMismatch, match="saved by 2 process.*resume with 2 processes"):
      ckpt.restore(_state(0), data_iterator=make_it())
  assert _steps(tmp_path / "ckpt") == [3]  # nothing moved aside: the checkpoint is fine


@pytest.mark.parametrize("kept", [[], ["process_0-of-2.json"]])
def test_a_step_that_lost_its_data_state_falls_back_as_a_damaged_step(tmp_path, kept):
  # This process's file is gone from a save by the same number of processes ([]), or a save by two processes lost
  # one of its two files: not another layout to carry over, a damaged step; the previous one is restored.
  make_it = _code_iterator(tmp_path)
  with checkpoint.Checkpointer(tmp_path / "ckpt", max_to_keep=3, save_interval_steps=1) as ckpt:
    for s in (2, 3):
      ckpt.save(s, _state(s), data_iterator=_iterator_at(make_it, s))
  expected = next(_iterator_at(make_it, 2))
  data = tmp_path / "ckpt" / "3" / "data"
  (data / "process_0-of-1.json").unlink()
  for name in kept:
    (data / name).write_text('{"next_index": 3}')
  os.remove(tmp_path / "ckpt" / "_checksums-3.json")  # the manifest would catch the change itself
  fresh = make_it()
  with checkpoint.Checkpointer(tmp_path / "ckpt", max_to_keep=3, save_interval_steps=1) as ckpt:
    restored, step = ckpt.restore(_state(0), data_iterator=fresh)
  assert step == 2
  helpers.assert_trees_equal(restored, _state(2))
  np.testing.assert_array_equal(next(fresh)["codes"], expected["codes"])
  assert _steps(tmp_path / "ckpt") == [2] and any(n.startswith("3.corrupt-") for n in os.listdir(tmp_path / "ckpt"))


def _iterator_at(make_it, batches):
  it = make_it()
  for _ in range(batches):
    next(it)
  return it


def test_manifests_of_steps_max_to_keep_dropped_are_removed_at_each_save(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=1)
  for s in range(1, 6):
    ckpt.save(s, _state(s))
    ckpt._manager.wait_until_finished()
    manifests = sorted(int(n[len("_checksums-"):-len(".json")]) for n in os.listdir(tmp_path)
                       if n.startswith("_checksums-"))
    assert set(manifests) <= set(_steps(tmp_path)) and manifests == ([] if s == 1 else [s - 1])
  ckpt.close()
  assert sorted(n for n in os.listdir(tmp_path) if n.startswith("_checksums-")) == ["_checksums-4.json",
                                                                                     "_checksums-5.json"]


def test_step_fingerprint_names_one_save(tmp_path):
  # What a sample set records of the checkpoint that drew it: a copy of the run keeps it, another save at the same
  # step (a run retrained in the same directory) does not, and a step without a manifest has none.
  import shutil  # pylint: disable=g-import-not-at-top
  for name in ("a", "b"):
    with checkpoint.Checkpointer(tmp_path / name, max_to_keep=1, save_interval_steps=1) as ckpt:
      ckpt.save(1, _state(1))  # the same state, saved twice: the commit times differ
  first = checkpoint.step_fingerprint(tmp_path / "a", 1)
  assert first is not None and len(first) == 64
  shutil.copytree(tmp_path / "a", tmp_path / "copy")
  assert checkpoint.step_fingerprint(tmp_path / "copy", 1) == first
  assert checkpoint.step_fingerprint(tmp_path / "b", 1) != first
  os.remove(tmp_path / "copy" / "_checksums-1.json")
  assert checkpoint.step_fingerprint(tmp_path / "copy", 1) is None
