"""Preprocessing (resize + normalisation), batched feature extraction, ADM-layout npz files, and the evaluation."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxrq_jax.evaluation import fid
from ctxrq_jax.evaluation import frechet
from ctxrq_jax.evaluation import inception_features as feats
from ctxrq_jax.models import inception
from ctxrq_jax.models import inception_convert
from tests import pytorch_fid_reference as ref


def _images(n, h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("shape,size", [((13, 17), 75), ((40, 31), 29), ((64, 64), 299)])
def test_pytorch_fid_resize_matches_torch_interpolate(shape, size):
  """x / 255 -> bilinear (align_corners=False) -> 2x - 1, up- and downsampling, as pytorch-fid's InceptionV3."""
  torch = pytest.importorskip("torch")
  x = _images(2, *shape)
  ours = np.asarray(feats.preprocess(jnp.asarray(x), image_size=size))
  t = torch.nn.functional.interpolate(ref.nchw(x.astype(np.float32) / 255.0), size=(size, size), mode="bilinear",
                                      align_corners=False)
  np.testing.assert_allclose(ours, ref.nhwc(2 * t - 1), rtol=0, atol=1e-5)  # float32 rounding only
  assert ours.dtype == np.float32 and ours.shape == (2, size, size, 3)


def test_downsampling_needs_antialias_off():
  """jax.image.resize antialiases by default when downsampling; torch's bilinear does not, so `preprocess` turns it
  off (without torch installed, the check above is skipped and this one still holds it)."""
  x = _images(1, 40, 40)
  ours = np.asarray(feats.preprocess(jnp.asarray(x), image_size=17))
  scaled = jnp.asarray(x, jnp.float32) / 255.0
  with_aa = 2 * np.asarray(jax.image.resize(scaled, (1, 17, 17, 3), "bilinear")) - 1
  without = 2 * np.asarray(jax.image.resize(scaled, (1, 17, 17, 3), "bilinear", antialias=False)) - 1
  np.testing.assert_allclose(ours, without, rtol=0, atol=1e-6)
  assert np.abs(ours - with_aa).max() > 1.0 / 255


def test_adm_normalisation_and_tf1_sampling():
  x = _images(1, 8, 8)
  same = np.asarray(feats.preprocess(jnp.asarray(x), image_size=8, resize="adm_tf1"))
  np.testing.assert_allclose(same, (x.astype(np.float32) - 128.0) / 128.0, atol=1e-7)  # TF1 at scale 1: identity
  # Upsampling 2 -> 4: output pixel i samples input coordinate i / 2 (no half-pixel centres).
  row = np.array([[10.0, 30.0]], np.float32).reshape(1, 1, 2, 1)
  got = np.asarray(feats.tf1_resize_bilinear(jnp.asarray(row), (1, 4)))[0, 0, :, 0]
  np.testing.assert_allclose(got, [10.0, 20.0, 30.0, 30.0])
  with pytest.raises(ValueError, match="resize must be one of"):
    feats.preprocess(jnp.asarray(x), resize="bicubic")


@pytest.mark.slow
def test_tf1_resize_matches_tensorflow(tmp_path):
  """Against TF's own legacy ResizeBilinear (run in a subprocess: importing TF next to JAX costs memory)."""
  x = np.random.default_rng(0).uniform(0, 255, size=(2, 13, 9, 3)).astype(np.float32)
  np.save(tmp_path / "x.npy", x)
  script = textwrap.dedent(f"""
      import numpy as np, tensorflow as tf
      x = np.load({str(tmp_path / 'x.npy')!r})
      for size in [(29, 31), (5, 4), (13, 9)]:
        y = tf.compat.v1.image.resize_bilinear(x, size, align_corners=False, half_pixel_centers=False).numpy()
        np.save({str(tmp_path)!r} + f"/y_{{size[0]}}x{{size[1]}}.npy", y)
  """)
  env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
  if proc.returncode != 0 and "No module named 'tensorflow'" in proc.stderr:
    pytest.skip("tensorflow is not installed")
  assert proc.returncode == 0, proc.stderr[-2000:]
  for size in [(29, 31), (5, 4), (13, 9)]:
    want = np.load(tmp_path / f"y_{size[0]}x{size[1]}.npy")
    got = np.asarray(feats.tf1_resize_bilinear(jnp.asarray(x), size))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-4)


def test_preprocess_rejects_non_uint8():
  with pytest.raises(AssertionError):
    feats.preprocess(jnp.zeros((1, 8, 8, 3), jnp.float32))
  with pytest.raises(ValueError, match="uint8"):
    feats.check_images(np.zeros((1, 8, 8, 3), np.float32))
  with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
    feats.check_images(np.zeros((1, 8, 8), np.uint8))


# ------------------------------------------------------------------------------------------ feature extraction


@pytest.fixture(scope="module")
def random_variables():
  """Random weights (He-scaled) and BatchNorm statistics, drawn without torch, so features are far from constant."""
  return inception_convert.convert_state_dict(inception_convert.random_state_dict(0))


@pytest.mark.slow
def test_extractor_batches_equal_one_direct_call(random_variables):
  extractor = feats.InceptionFeatureExtractor(random_variables, batch_size=4, image_size=75)
  x = _images(5, 20, 24, seed=1)  # 5 images in chunks of 4: the last chunk is padded and trimmed
  out = extractor(x)
  assert out["pool"].shape == (5, 2048) and out["logits"].shape == (5, 1008)
  assert out["spatial"].shape == (5, 3 * 3 * feats.SFID_CHANNELS)  # Mixed_6d is 3x3 at a 75x75 input
  model = inception.FIDInceptionV3()
  direct = jax.jit(lambda v, x: model.apply(v, feats.preprocess(x, image_size=75), spatial=True))(
      random_variables, jnp.asarray(x))
  np.testing.assert_allclose(out["pool"], direct["pool"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["logits"], direct["logits_unbiased"], rtol=1e-5, atol=1e-5)
  want_spatial = np.asarray(direct["spatial"])[..., :7].reshape(5, -1)  # (h, w, c) order, as ADM flattens NHWC
  np.testing.assert_allclose(out["spatial"], want_spatial, rtol=1e-5, atol=1e-5)
  assert np.std(out["pool"], axis=0).mean() > 1e-3  # the images give different features
  # Streaming odd-sized batches gives the same features in the same order.
  streamed = list(extractor.iter_batches([x[:1], x[1:4], x[4:]]))
  np.testing.assert_allclose(np.concatenate([s["pool"] for s in streamed]), out["pool"], rtol=1e-6, atol=1e-6)
  # And the whole evaluation runs on the real network: identical sets score FID 0 and precision = recall = 1.
  with_reference(extractor, x)
  streamed_reference(extractor, x, out)


def streamed_reference(extractor, x, out):
  """`fid.build_reference` from odd-sized batches: the statistics of all images, the first `keep_images` kept."""
  import tempfile  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "ref.npz")
    done = []
    info = fid.build_reference(extractor, [x[:2], x[2:3], x[3:]], path, keep_images=4, progress=done.append)
    assert info == {"num_images": 5, "kept_images": 4} and done == [2, 3, 5]
    ref = feats.read_reference(path)
    assert ref.num_images == 4 and sorted(os.listdir(d)) == ["ref.npz"]  # the scratch file is gone
    assert ref.resize == extractor.resize  # recorded: evaluation with another mode is refused
    with np.load(path) as z:
      np.testing.assert_array_equal(z["arr_0"], x[:4])
    want = frechet.FeatureStats.from_features(out["pool"])
    np.testing.assert_allclose(ref.mu, want.mu, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ref.sigma, want.sigma, rtol=1e-5, atol=1e-6)
    assert ref.mu_s.shape == (out["spatial"].shape[1],)
    with pytest.raises(ValueError, match="no images to build a reference from"):
      fid.build_reference(extractor, [], os.path.join(d, "none.npz"), keep_images=4)


def with_reference(extractor, x):
  import tempfile  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as d:
    feats.write_reference(os.path.join(d, "ref.npz"), images=x)
    np.savez(os.path.join(d, "same.npz"), arr_0=x)
    seen = []
    same = fid.evaluate(extractor, os.path.join(d, "same.npz"), os.path.join(d, "ref.npz"), split_size=5,
                        progress=seen.append)
  assert seen[-1] == 2 * len(x) and seen == sorted(seen)  # counted over both files
  assert abs(same["fid"]) < 1e-6 * 2048 and abs(same["sfid"]) < 1e-6 * 63
  assert (same["precision"], same["recall"]) == (1.0, 1.0)


@pytest.mark.slow
def test_pool_features_match_pytorch_fid_end_to_end():
  """uint8 images through our resize, normalisation and network vs pytorch-fid's InceptionV3 (resize_input=True,
  normalize_input=True) on the same random weights, at the real 299x299."""
  torch = pytest.importorskip("torch")
  wrapper, inner = ref.build_pool_feature_network(seed=5)
  variables = inception_convert.convert_state_dict(inner.state_dict())
  x = _images(2, 48, 40, seed=2)
  ours = feats.InceptionFeatureExtractor(variables, batch_size=2, spatial=False)(x)["pool"]
  with torch.no_grad():
    theirs = wrapper(ref.nchw(x.astype(np.float32) / 255.0))[0].flatten(1).numpy()
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5 * np.abs(theirs).max())


# ---------------------------------------------------------------------------------------------------- npz files


@pytest.mark.parametrize("compressed", [False, True])
def test_streaming_npz_reader(tmp_path, compressed):
  x = _images(11, 5, 6)
  path = tmp_path / "s.npz"
  (np.savez_compressed if compressed else np.savez)(path, arr_0=x, labels=np.arange(11))
  batches = list(feats.iter_npz_batches(path, batch_size=4))
  assert [len(b) for b in batches] == [4, 4, 3]
  np.testing.assert_array_equal(np.concatenate(batches), x)
  assert feats.npz_array_info(path) == ((11, 5, 6, 3), np.dtype(np.uint8))
  with pytest.raises(KeyError, match="has no array 'images'"):
    next(feats.iter_npz_batches(path, "images"))


def test_reference_layouts(tmp_path):
  rng = np.random.default_rng(0)
  x = _images(6, 8, 8)
  mu, a = rng.normal(size=2048), rng.normal(size=(2048, 4))
  sigma = a @ a.T
  # Images only (a samples file, or a reference without statistics).
  feats.write_reference(tmp_path / "images.npz", images=x)
  r = feats.read_reference(tmp_path / "images.npz")
  assert r.has_images and not r.has_stats and r.num_images == 6 and r.image_shape == (8, 8, 3)
  np.testing.assert_array_equal(np.concatenate(list(r.batches(4))), x)
  # ADM's reference layout: images plus precomputed statistics, sFID ones included.
  feats.write_reference(tmp_path / "ref.npz", images=x, stats=(mu, sigma), spatial_stats=(mu[:5], sigma[:5, :5]))
  r = feats.read_reference(tmp_path / "ref.npz")
  assert r.has_images and r.has_stats and r.has_spatial_stats
  np.testing.assert_array_equal(r.sigma, sigma)
  np.testing.assert_array_equal(r.mu_s, mu[:5])
  # Statistics only.
  np.savez(tmp_path / "stats.npz", mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))
  r = feats.read_reference(tmp_path / "stats.npz")
  assert not r.has_images and r.has_stats and not r.has_spatial_stats and r.mu.dtype == np.float64
  assert r.resize is None  # a file made elsewhere records no resize mode
  with pytest.raises(ValueError, match="has no images"):
    r.batches()
  feats.write_reference(tmp_path / "tf1.npz", stats=(mu, sigma), resize="adm_tf1")
  assert feats.read_reference(tmp_path / "tf1.npz").resize == "adm_tf1"


def test_reference_errors(tmp_path):
  with pytest.raises(FileNotFoundError):
    feats.read_reference(tmp_path / "missing.npz")
  np.savez(tmp_path / "half.npz", mu=np.zeros(2048))
  with pytest.raises(ValueError, match="'mu'/'sigma' but not the other"):
    feats.read_reference(tmp_path / "half.npz")
  np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
  with pytest.raises(ValueError, match="arr_0 must be uint8"):
    feats.read_reference(tmp_path / "float.npz")
  np.savez(tmp_path / "other.npz", labels=np.arange(3))
  with pytest.raises(ValueError, match="neither images"):
    feats.read_reference(tmp_path / "other.npz")
  np.savez(tmp_path / "bicubic.npz", mu=np.zeros(4), sigma=np.eye(4), resize=np.array("bicubic"))
  with pytest.raises(ValueError, match="resize must be one of"):
    feats.read_reference(tmp_path / "bicubic.npz")
  with pytest.raises(ValueError, match="needs images or statistics"):
    feats.write_reference(tmp_path / "empty.npz", resize="adm_tf1")
  (tmp_path / "text.npz").write_text("hello")
  with pytest.raises(ValueError, match="not an .npz"):
    feats.read_reference(tmp_path / "text.npz")


# ----------------------------------------------------------------------------------------------- the evaluation


class _FakeExtractor:
  """Stands in for InceptionFeatureExtractor in the bookkeeping tests: cheap features that depend on the images
  (fixed random projections of per-image pixel statistics)."""

  batch_size = 3
  resize = "pytorch_fid"

  def __init__(self):
    rng = np.random.default_rng(0)
    self.proj = rng.normal(size=(6, 64 + 1008 + 20))

  def iter_batches(self, batches):
    for b in batches:
      b = feats.check_images(b).astype(np.float64) / 255.0
      for i in range(0, len(b), self.batch_size):
        c = b[i:i + self.batch_size]
        s = np.concatenate([c.mean(axis=(1, 2)), c.std(axis=(1, 2))], axis=1)
        z = np.tanh(s @ self.proj).astype(np.float32)
        yield {"pool": z[:, :64], "logits": 5 * z[:, 64:1072], "spatial": z[:, 1072:]}


def test_evaluate_npz_files(tmp_path, caplog):
  extractor = _FakeExtractor()
  x = _images(12, 16, 16, seed=3)
  y = _images(10, 16, 16, seed=4) // 2  # darker
  feats.write_reference(tmp_path / "ref.npz", images=x)
  np.savez(tmp_path / "same.npz", arr_0=x)
  np.savez(tmp_path / "other.npz", arr_0=y)
  same = fid.evaluate(extractor, tmp_path / "same.npz", tmp_path / "ref.npz", split_size=5)
  assert abs(same["fid"]) < 1e-6 and abs(same["sfid"]) < 1e-6
  assert (same["precision"], same["recall"]) == (1.0, 1.0)
  other = fid.evaluate(extractor, tmp_path / "other.npz", tmp_path / "ref.npz", split_size=5)
  assert other["fid"] > 1.0 and other["sfid"] > 0.01 and other["inception_score"] >= 1.0
  assert other["precision"] < 0.5 and other["recall"] < 0.5
  # A reference with precomputed statistics: they are used for FID/sFID as they stand.
  ref_acts = fid.npz_activations(extractor, tmp_path / "ref.npz")
  smp_acts = fid.npz_activations(extractor, tmp_path / "other.npz")
  assert ref_acts.count == 12 and smp_acts.count == 10
  feats.write_reference(tmp_path / "stats.npz", stats=(ref_acts.pool_stats.mu, ref_acts.pool_stats.sigma),
                        spatial_stats=(ref_acts.spatial_stats.mu, ref_acts.spatial_stats.sigma))
  from_stats = fid.evaluate(extractor, tmp_path / "other.npz", tmp_path / "stats.npz", split_size=5)
  assert from_stats["fid"] == pytest.approx(other["fid"], rel=1e-9)
  assert from_stats["sfid"] == pytest.approx(other["sfid"], rel=1e-9)
  assert from_stats["precision"] is None and from_stats["recall"] is None  # no reference images
  shifted = (ref_acts.pool_stats.mu + 1.0, ref_acts.pool_stats.sigma)
  feats.write_reference(tmp_path / "shifted.npz", images=x, stats=shifted)
  with_shift = fid.evaluate(extractor, tmp_path / "same.npz", tmp_path / "shifted.npz", split_size=5)
  assert with_shift["fid"] == pytest.approx(64.0, rel=1e-6)  # the file's mu, not the images', is used
  assert with_shift["precision"] == 1.0  # precision/recall still come from the reference images
  # The Inception Score's splits are of the rows shuffled with the fixed seed (`sample` writes them sorted by class);
  # `is_shuffle_seed=None` keeps the file's order, as ADM does.
  want_is = frechet.inception_score(smp_acts.logits, split_size=5, shuffle_seed=frechet.IS_SHUFFLE_SEED)
  assert other["inception_score"] == pytest.approx(want_is, rel=1e-9)
  in_order = fid.metrics(smp_acts, feats.read_reference(tmp_path / "ref.npz"), ref_acts, split_size=5,
                         is_shuffle_seed=None)["inception_score"]
  assert in_order == pytest.approx(frechet.inception_score(smp_acts.logits, split_size=5), rel=1e-9)
  assert in_order != pytest.approx(want_is, rel=1e-6)
  np.testing.assert_allclose(smp_acts.pool_stats.sigma, np.cov(smp_acts.pool.astype(np.float64), rowvar=False),
                             rtol=1e-8, atol=1e-10)
  with pytest.raises(ValueError, match="has no images"):
    fid.evaluate(extractor, tmp_path / "stats.npz", tmp_path / "ref.npz")
  # Statistics computed with another resize mode than this run's are refused; unrecorded ones (ADM's file) warned of.
  feats.write_reference(tmp_path / "tf1.npz", stats=shifted, resize="adm_tf1")
  with pytest.raises(ValueError, match=r"computed with --resize=adm_tf1; evaluate with the same \(this run: "
                                       r"--resize=pytorch_fid\)"):
    fid.evaluate(extractor, tmp_path / "same.npz", tmp_path / "tf1.npz")
  with caplog.at_level(logging.WARNING, logger=fid.__name__):
    fid.evaluate(extractor, tmp_path / "same.npz", tmp_path / "stats.npz", split_size=5)
  assert "does not record how its statistics were made: ADM's reference batches need --resize=adm_tf1" in caplog.text
  np.savez(tmp_path / "dim.npz", mu=np.zeros(2048), sigma=np.eye(2048))
  with pytest.raises(ValueError, match="2048 dimensions, the samples' pool features 64"):
    fid.evaluate(extractor, tmp_path / "same.npz", tmp_path / "dim.npz")
