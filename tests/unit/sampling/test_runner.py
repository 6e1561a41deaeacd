"""Sample sets drawn piece by piece (ctxrq_jax/sampling/runner.py): sample i depends on (seed, i, settings) only,
so batch sizes and host shards give the same set, and shards merge into the single-host samples.npz."""

import os
import types

import jax
import numpy as np
import pytest

from ctxrq_jax.sampling import loader
from ctxrq_jax.sampling import runner
from ctxrq_jax.sampling.logits import PhaseSettings
from tests import helpers

N, D, K = 16, 2, 8


class _Decoder:
  """Stands in for the RQ-VAE decoder: a fixed function of the codes, uint8 [B, 8, 8, 3]."""

  def images(self, codes, *, uint8=False, out=None):
    codes = np.asarray(codes).reshape(len(codes), 4, 4, D)
    img = np.repeat(np.repeat(codes.sum(-1), 2, 1), 2, 2)[..., None].repeat(3, -1) * 16
    img = img.astype(np.uint8) if uint8 or out is not None else img.astype(np.float32) / 127.5 - 1
    if out is None:
      return img
    out[...] = img
    return out


@pytest.fixture(scope="module")
def loaded():
  model, params, codebook = helpers.tiny_sampling_model(code_depth=D, num_positions=N, vocab_size=K)
  dec = _Decoder()
  return types.SimpleNamespace(model=model, params=params, codebook=codebook, mesh=loader.inference_mesh(),
                               code_shape=(4, 4, D), images=dec.images, resolution=8)


KW = dict(t_draft=4, t_revise=2, num_revisions=1, draft=PhaseSettings(), revise=PhaseSettings(temperature=0.8))


@pytest.mark.slow
def test_batch_size_and_shards_do_not_change_the_samples(loaded, tmp_path):
  labels = np.array([0, 1, 2, 0, 1], np.int32)
  rng = jax.random.key(3)
  whole = runner.sample_codes(loaded, labels, rng, batch_size=5, **KW)
  np.testing.assert_array_equal(runner.sample_codes(loaded, labels, rng, batch_size=2, **KW), whole)
  out = str(tmp_path / "out")
  for host in range(2):  # two hosts, each its block of indices
    mine = runner.shard_indices(len(labels), host, 2)
    hist = runner.sample_codes(loaded, labels[mine], rng, batch_size=2, indices=mine, **KW)
    np.testing.assert_array_equal(hist, whole[:, mine])
    runner.write_samples_npz(loaded, hist[-1], labels[mine], runner.shard_path(out, host, 2), indices=mine)
  merged = runner.merge_shards(out)
  single = runner.write_samples_npz(loaded, whole[-1], labels, str(tmp_path / "single.npz"))
  with np.load(merged) as a, np.load(single) as b:
    assert sorted(a.files) == ["arr_0", "codes", "labels"]
    for key in a.files:
      np.testing.assert_array_equal(a[key], b[key])
  assert not [n for n in os.listdir(out) if n.startswith(".")]  # scratch files removed


def test_the_sampling_batch_is_rounded_up_to_a_multiple_of_the_devices():
  # The configs' batch 100 on an 8-device host (v3-8, v5e-8, 8 GPUs) draws 104 rows per call; the samples are the
  # same (tests/integration/test_multi_device.py draws them).
  assert [runner.device_batch_size(b, n) for b, n in [(100, 8), (100, 4), (1, 8), (8, 8), (10, 1)]] == [
      104, 100, 8, 8, 10]
  with pytest.raises(ValueError, match="sample batch_size must be a positive integer, got 0"):
    runner.device_batch_size(0, 8)


def test_shard_indices_and_incomplete_sets(loaded, tmp_path):
  blocks = [runner.shard_indices(10, i, 3) for i in range(3)]
  np.testing.assert_array_equal(np.concatenate(blocks), np.arange(10))
  assert [len(b) for b in blocks] == [4, 3, 3]
  with pytest.raises(ValueError, match=r"process_index 3 is outside \[0, 3\)"):
    runner.shard_indices(10, 3, 3)
  with pytest.raises(FileNotFoundError, match="no sample shards"):
    runner.merge_shards(str(tmp_path / "empty"))
  out = str(tmp_path / "out")
  codes = np.zeros((2, N, D), np.int32)
  runner.write_samples_npz(loaded, codes, np.zeros(2, np.int32), runner.shard_path(out, 0, 2), indices=[0, 1])
  with pytest.raises(ValueError, match=r"shards of hosts \[1\] \(of 2\) are missing"):
    runner.merge_shards(out)
  runner.write_samples_npz(loaded, codes, np.zeros(2, np.int32), runner.shard_path(out, 1, 2), indices=[1, 2])
  with pytest.raises(ValueError, match="not 0 ... 3 exactly once each"):
    runner.merge_shards(out)
  with pytest.raises(ValueError, match=r"indices \(3,\) must match labels \(2,\)"):
    runner.sample_codes(loaded, [0, 1], jax.random.key(0), batch_size=2, indices=[0, 1, 2], **KW)


def test_a_host_with_no_samples_writes_an_empty_shard(loaded, tmp_path):
  # Fewer samples than hosts (3 samples, 4 hosts): host 3 draws nothing, writes an empty shard, and the merge is
  # the whole set; no host fails before the barrier the others wait at.
  labels = np.array([0, 1, 2], np.int32)
  rng = jax.random.key(5)
  out = str(tmp_path / "out")
  for host in range(4):
    mine = runner.shard_indices(len(labels), host, 4)
    hist = runner.sample_codes(loaded, labels[mine], rng, batch_size=2, indices=mine, **KW)
    assert hist.shape == (2, len(mine), N, D)
    runner.write_samples_npz(loaded, hist[-1], labels[mine], runner.shard_path(out, host, 4), indices=mine)
  # A stale shard of an earlier job with another host count is ignored by the job that wrote these ...
  os.rename(runner.shard_path(out, 3, 4), runner.shard_path(out, 3, 4) + ".keep")
  runner.write_samples_npz(loaded, np.zeros((1, N, D), np.int32), labels[:1], runner.shard_path(out, 0, 2),
                           indices=[0])
  os.rename(runner.shard_path(out, 3, 4) + ".keep", runner.shard_path(out, 3, 4))
  with np.load(runner.merge_shards(out, 4)) as merged:
    assert merged["arr_0"].shape == (3, 8, 8, 3) and merged["labels"].tolist() == [0, 1, 2]
    np.testing.assert_array_equal(merged["codes"].reshape(3, N, D),
                                  runner.sample_codes(loaded, labels, rng, batch_size=4, **KW)[-1])
  # ... while `sample --merge` (no host count given) names the mix.
  with pytest.raises(ValueError, match=r"mixes shards of different host counts: \['00002', '00004'\]; remove"):
    runner.merge_shards(out)


def test_previews_that_show_nothing_are_refused_and_never_cost_the_samples(loaded, tmp_path):
  with pytest.raises(ValueError, match="preview_classes must be >= 1, got 0"):
    runner.sample_classes(loaded, [0, 1], str(tmp_path / "a"), per_class=1, rng=jax.random.key(0), batch_size=2,
                          preview_classes=0, **KW)
  assert not os.path.exists(tmp_path / "a")  # refused before anything was drawn
  # Called with the samples already drawn, the set is written before the previews are attempted.
  history = np.zeros((2, 2, N, D), np.int32)
  with pytest.raises(ValueError, match="preview_per_class must be >= 1, got 0"):
    runner.write_outputs(loaded, history, np.array([0, 1]), str(tmp_path / "b"), 1, preview_per_class=0)
  with np.load(tmp_path / "b" / "samples.npz") as f:
    assert f["arr_0"].shape == (2, 8, 8, 3)


def test_draft_mode_and_confidence_noise_reach_the_decoder(loaded, tmp_path, monkeypatch):
  # `sample --draft_mode=confidence --confidence_noise=4.5` (MaskGIT's draft) through every entry point: the class
  # and prompt sample sets go through `sample_codes`, inpainting through `decoder.inpaint`.
  from ctxrq_jax.sampling import decoder  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.sampling import editing  # pylint: disable=g-import-not-at-top
  seen = []

  def spy(*args, **kwargs):
    seen.append((kwargs["draft_mode"], kwargs["confidence_noise"]))
    raise StopIteration  # what was asked is all this test needs

  monkeypatch.setattr(decoder, "draft_and_revise", spy)
  monkeypatch.setattr(decoder, "inpaint", spy)
  with pytest.raises(StopIteration):
    runner.sample_classes(loaded, [0], str(tmp_path), per_class=1, rng=jax.random.key(0), batch_size=1,
                          draft_mode="confidence", confidence_noise=4.5, **KW)
  monkeypatch.setattr(editing, "encode_images", lambda model, variables, images: np.zeros((1, N, D), np.int32))
  stage1 = types.SimpleNamespace(code_shape=(4, 4, D), resolution=8, in_channels=1)
  edit_model = types.SimpleNamespace(**vars(loaded), decoder=types.SimpleNamespace(model=stage1, variables=None))
  with pytest.raises(StopIteration):
    editing.inpaint(edit_model, np.zeros((8, 8, 1)), np.ones((8, 8), bool), np.zeros(1), jax.random.key(0),
                    num_samples=1, draft_mode="confidence", confidence_noise=2.0, **KW)
  assert seen == [("confidence", 4.5), ("confidence", 2.0)]


def test_a_recipe_run_again_keeps_its_sample_set_and_its_results(tmp_path, monkeypatch):
  # `sample_all_classes` (the demo's sampling): a set drawn from the same saved checkpoint with the same settings is
  # kept with the `evaluate` results written beside it; another draw (here another number per class, then another
  # step, then another save at that step: a run retrained in the same directory) replaces the set, and with it
  # those results. The run is a stand-in: `sample_codes` draws zeros.
  from ctxrq_jax.core import config as configlib  # pylint: disable=g-import-not-at-top
  config = configlib.load_config_file("demo", "smoke")
  run = types.SimpleNamespace(workdir=str(tmp_path / "run"), config=config, step=8, checkpoint_id="save 1",
                              params_name="ema_params", model=types.SimpleNamespace(is_text=False),
                              code_shape=(4, 4, D), resolution=8, images=_Decoder().images)
  monkeypatch.setattr(loader, "Stage2Model", lambda workdir: run)
  draws = []

  def zeros(loaded, labels, rng, *, num_revisions, **kw):
    draws.append(len(labels))
    return np.zeros((num_revisions + 1, len(labels), N, D), np.int32)
  monkeypatch.setattr(runner, "sample_codes", zeros)
  out = tmp_path / "samples"
  first = runner.sample_all_classes(run.workdir, str(out), samples_per_class=2, classes="0,1")
  assert draws == [4] and list(first) == ["samples_png", "phases_png", "samples_npz", "settings_json"]
  record = runner.settings_record(run, 0, runner.run_settings(run), classes=[0, 1], per_class=2, num_samples=4)
  assert runner.kept_sample_set(str(out), record) == first
  (out / "samples.fid.json").write_text('{"fid": 1.0}')
  assert runner.sample_all_classes(run.workdir, str(out), samples_per_class=2, classes="0,1") == first
  assert draws == [4] and (out / "samples.fid.json").exists()
  runner.sample_all_classes(run.workdir, str(out), samples_per_class=3, classes="0,1")
  assert draws == [4, 6] and not (out / "samples.fid.json").exists()
  # Trained further; retrained to that step; a save without a manifest (its sets are never kept).
  for i, change in enumerate((dict(step=9, checkpoint_id="save 2"), dict(checkpoint_id="save 3"),
                              dict(checkpoint_id=None), dict(checkpoint_id=None))):
    (out / "samples.fid.json").write_text('{"fid": 1.0}')
    vars(run).update(change)
    runner.sample_all_classes(run.workdir, str(out), samples_per_class=3, classes="0,1")
    assert len(draws) == 3 + i and not (out / "samples.fid.json").exists(), change
