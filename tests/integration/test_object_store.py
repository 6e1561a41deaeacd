"""The pipeline with every location in a bucket (`gs://`), offline: tests/fake_gcs.py serves the bucket from a local
directory through the same layers a real one goes through (epath, orbax's tensorstore, array_record's GCS reader).

Encode digits into a code dataset in the bucket, train stage 2 with its workdir there, send it a real SIGTERM and
resume it bit-exactly (in-process: the double lives in this process), corrupt the newest checkpoint and fall back to
the previous one, sample from it into the bucket. Any write that bypassed the path layer would land in a local `gs:`
directory under the working directory: none may appear. The same steps on local paths are the other tests
(stage1/test_encode, stage2/test_trainer, integration/test_preemption, ...).
"""

import io
import os
import signal

import jax
import numpy as np
import pytest
from etils import epath

from ctxrq_jax.core import checkpoint
from ctxrq_jax.core import paths
from ctxrq_jax.data import codes as code_data
from ctxrq_jax.models import artifact as artifact_lib
from ctxrq_jax.models import rqvae
from ctxrq_jax.sampling import loader
from ctxrq_jax.sampling import runner
from ctxrq_jax.sampling.logits import PhaseSettings
from ctxrq_jax.stage1 import encode
from ctxrq_jax.stage2 import trainer as stage2_trainer
from tests import fake_gcs
from tests import helpers

# In the worker of stage2/test_trainer.py, whose one-layer programs it trains with.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("stage2_one_layer")]


@pytest.fixture()
def gcs(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # where a stray os.path / open on "gs://..." would write
  with fake_gcs.fake_gcs(str(tmp_path / "bucket-root"), str(tmp_path)) as fake:
    yield fake
    assert fake.stray_local_files() == []


def _corrupt_one_file(directory: str) -> str:
  """Flips the first bytes of the largest array data file under `directory` (local side of the bucket)."""
  files = [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs if f"{os.sep}d{os.sep}" in
           os.path.join(d, f)]
  target = max(files, key=os.path.getsize)
  with open(target, "r+b") as f:
    head = f.read(16)
    f.seek(0)
    f.write(bytes(b ^ 0xFF for b in head))
  return target


def test_paths_keep_urls_and_write_atomically(gcs, tmp_path):
  assert str(paths.path("gs://b/run/821m")) == "gs://b/run/821m"  # not <cwd>/gs:/b/run/821m
  assert paths.name("rel/dir") == os.path.join(str(tmp_path), "rel", "dir")
  url = gcs.url("meta/info.json")
  paths.write_json(url, {"a": 1})
  assert paths.read_json(url) == {"a": 1} and os.path.isfile(gcs.local(url))
  with paths.local_file(gcs.url("meta/blob.bin")) as tmp:
    assert paths.is_local(tmp)
    with open(tmp, "wb") as f:
      f.write(b"xyz")
  assert epath.Path(gcs.url("meta/blob.bin")).read_bytes() == b"xyz"
  with pytest.raises(RuntimeError), paths.local_file(gcs.url("meta/never.bin")) as tmp:
    raise RuntimeError("a failed write publishes nothing")
  assert not epath.Path(gcs.url("meta/never.bin")).exists()


def test_checkpoint_commit_marker_checksums_and_fallback(gcs):
  url = gcs.url("run/checkpoints")
  state = {"w": np.arange(6.0, dtype=np.float32), "k": jax.random.key(1)}
  with checkpoint.Checkpointer(url, max_to_keep=3, save_interval_steps=1, async_save=False) as ckpt:
    for step in (1, 2):
      ckpt.save(step, {"w": state["w"] * step, "k": jax.random.key(step)})
  local = gcs.local(url)
  # Object-store layout: steps committed by a marker file in place (no temp directory renamed), manifests are files.
  assert os.path.isfile(os.path.join(local, "2", "commit_success.txt"))
  assert sorted(n for n in os.listdir(local) if n.startswith("_checksums")) == ["_checksums-1.json",
                                                                                  "_checksums-2.json"]
  _corrupt_one_file(os.path.join(local, "2"))
  with checkpoint.Checkpointer(url, max_to_keep=3, save_interval_steps=1, read_only=True) as reader:
    restored, step = reader.restore(state)
  assert step == 1 and os.path.isdir(os.path.join(local, "2"))  # a reader moves nothing
  np.testing.assert_array_equal(restored["w"], state["w"])
  with checkpoint.Checkpointer(url, max_to_keep=3, save_interval_steps=1) as ckpt:
    restored, step = ckpt.restore(state)
    assert step == 1 and ckpt.all_steps() == [1]
  assert [n for n in os.listdir(local) if n.startswith("2.corrupt-")]  # moved aside, kept


class _StubDecoder:
  """What `runner.write_samples_npz` needs of a loaded run: code_shape, resolution and images (a fixed function of
  the codes)."""
  code_shape = (2, 2, 1)
  resolution = 2

  def images(self, codes, *, uint8=False, out=None):
    img = np.repeat(np.asarray(codes).reshape(len(codes), 2, 2, 1), 3, -1).astype(np.uint8)
    if out is None:
      return img
    out[...] = img
    return out


def test_sample_shards_reference_tokenizer_and_caption_shards_in_a_bucket(gcs, tmp_path):
  from ctxrq_jax.data import captions as captions_lib  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.evaluation import inception_features  # pylint: disable=g-import-not-at-top

  # Per-host sample shards named by process index, merged in the bucket.
  codes = np.arange(5 * 4).reshape(5, 4, 1) % 7
  out = gcs.url("samples")
  for host in range(2):
    mine = runner.shard_indices(5, host, 2)
    runner.write_samples_npz(_StubDecoder(), codes[mine], np.arange(5)[mine], runner.shard_path(out, host, 2),
                             indices=mine)
  merged = runner.merge_shards(out)
  with epath.Path(merged).open("rb") as f:
    z = np.load(io.BytesIO(f.read()))
    np.testing.assert_array_equal(z["labels"], np.arange(5))
    np.testing.assert_array_equal(z["arr_0"][..., 0], codes.reshape(5, 2, 2))

  # FID reference statistics written to and read from the bucket (zip members read from a local copy).
  ref = gcs.url("refs/ref.npz")
  inception_features.write_reference(ref, stats=(np.ones(3), np.eye(3)))
  got = inception_features.read_reference(ref)
  assert got.path == ref and np.array_equal(got.mu, np.ones(3)) and np.array_equal(got.sigma, np.eye(3))

  # A tokenizer trained into the bucket and loaded from it.
  vocab, merges = tokenizer_lib.train_tokenizer(["a red bus", "a blue bus", "a red car"] * 5, gcs.url("tok"),
                                                vocab_size=40, min_frequency=1)
  assert vocab.startswith("gs://") and merges.startswith("gs://")
  tok = tokenizer_lib.CaptionTokenizer.from_directory(gcs.url("tok"), context_length=6)
  assert tok.encode(["a red bus"]).shape == (1, 6)

  # Caption shards (webdataset tars) matched by a glob in the bucket and streamed from it.
  import tarfile  # pylint: disable=g-import-not-at-top
  for i in range(2):
    local = tmp_path / f"shard{i}.tar"
    with tarfile.open(local, "w") as tar:
      for name, data in ((f"k{i}.png", b"not decoded here"), (f"k{i}.txt", f"caption {i}".encode())):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    epath.Path(local).copy(epath.Path(gcs.url(f"cc/shard{i}.tar")))
  assert captions_lib.shard_paths(gcs.url("cc/*.tar")) == [gcs.url("cc/shard0.tar"), gcs.url("cc/shard1.tar")]
  examples = list(captions_lib.iter_webdataset(gcs.url("cc/*.tar"), captions_lib.CaptionStats()))
  assert [(e.key, e.captions) for e in examples] == [("shard0.tar:k0", ("caption 0",)),
                                                      ("shard1.tar:k1", ("caption 1",))]


def test_encode_train_resume_fallback_and_sample_in_a_bucket(gcs, monkeypatch):
  # A tiny RQ-VAE whose codes (4x4x4, K 64, n_z 16) are those of the tiny stage-2 config, so it decodes its samples.
  stage1 = helpers.tiny_stage1_config(model__code_depth=4, model__codebook_size=64, model__embed_dim=16)
  model = rqvae.RQVAE.from_config(stage1.model)
  variables = jax.jit(rqvae.init_variables, static_argnums=0)(model, helpers.rbg_key(3))
  artifact = gcs.url("stage1/rqvae")
  artifact_lib.save_artifact(artifact, stage1.model, variables)
  digits = gcs.url("digit_codes")
  meta = encode.encode_dataset(artifact, stage1.data, digits, ["test"], batch_size=16, max_examples=16, num_shards=2)
  assert meta.num_examples("test") == 16 and meta.source["stage1_artifact"] == artifact
  # Read back through array_record's own GCS reader (the emulator) = the same files read locally.
  from_bucket = code_data.load_codes(digits, "test")
  from_disk = code_data.load_codes(gcs.local(digits), "test")
  for a, b in zip(from_bucket, from_disk):
    np.testing.assert_array_equal(a, b)

  # Stage 2 as stage2/test_trainer.py trains its plain config (the same programs: one layer per stack, 'rbg' keys),
  # with its codes and workdir in the bucket.
  codes = helpers.write_stage2_codes(gcs.url("codes"), codebook=variables["quantizer"]["codebook"])
  config = helpers.tiny_stage2_config(codes, data__stage1_dir=artifact,
                                      model__spatial_layers=1, model__depth_layers=1)
  config.lock()
  full = stage2_trainer.train_and_evaluate(config, gcs.url("full"))
  workdir = gcs.url("stage2")
  real_stop_requested = checkpoint.PreemptionGuard.stop_requested

  def sigterm_at_step_3(guard, step):  # the scheduler's SIGTERM arrives during step 3
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return real_stop_requested(guard, step)

  with monkeypatch.context() as patch:
    patch.setattr(checkpoint.PreemptionGuard, "stop_requested", sigterm_at_step_3)
    part = stage2_trainer.train_and_evaluate(config, workdir)
  assert part["stopped"] and part["step"] == 3
  rest = stage2_trainer.train_and_evaluate(config, workdir)
  assert rest["step"] == 6
  helpers.assert_trees_equal(rest["state"].params, full["state"].params)
  helpers.assert_trees_equal(rest["state"].opt_state, full["state"].opt_state)
  assert [l for _, l in rest["history"]] == [l for _, l in full["history"]][3:]
  assert epath.Path(workdir, "config.json").exists()
  # Every host saves its own data-iterator position in each checkpoint (grain's handler names it by process).
  assert epath.Path(workdir, "checkpoints", "6", "data", "process_0-of-1.json").exists()

  _corrupt_one_file(os.path.join(gcs.local(workdir), "checkpoints", "6"))
  loaded = loader.Stage2Model(workdir, decode_batch_size=2)
  assert loaded.step == 4  # the corrupt step 6 is skipped
  out = gcs.url("stage2/samples")
  labels = np.array([0, 1], np.int32)
  history = runner.sample_codes(loaded, labels, jax.random.key(0), batch_size=2, t_draft=2, t_revise=1,
                                num_revisions=0, draft=PhaseSettings(), revise=PhaseSettings())  # the draft alone
  written = runner.write_outputs(loaded, history, labels, out, ncols=2)
  assert set(written) == {"samples_png", "phases_png", "samples_npz"}
  with epath.Path(written["samples_npz"]).open("rb") as f:
    npz = np.load(io.BytesIO(f.read()))
    assert npz["arr_0"].shape == (2, 16, 16, 3) and list(npz["labels"]) == [0, 1]
    np.testing.assert_array_equal(npz["codes"], history[-1].reshape(2, 4, 4, 4))
  assert epath.Path(out, "samples.png").exists()
