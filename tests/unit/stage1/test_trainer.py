"""Stage-1 trainer (ctxrq_jax/stage1/trainer.py) end to end on tiny configs: artifact and images, EMA codebook,
bit-exact resume, the GAN step, and config validation before anything is built."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from ctxrq_jax.core import checkpoint
from ctxrq_jax.core import config as configlib
from ctxrq_jax.core import optim
from ctxrq_jax.core import sharding
from ctxrq_jax.models import artifact
from ctxrq_jax.models import rq
from ctxrq_jax.models import rqvae
from ctxrq_jax.stage1 import losses
from ctxrq_jax.stage1 import trainer as train_rqvae
from tests import helpers


def tiny_config(**train_overrides):
  """`helpers.tiny_stage1_config` with one downsampling (codes 8x8x2): a third less model to trace and compile for
  every run of this module, whose properties do not depend on the depth of the encoder."""
  config = helpers.tiny_stage1_config(**{f"train__{k}": v for k, v in train_overrides.items()})
  with config.unlocked():
    config.model.ch_mult = (1, 2)
  return config


def _mock_tfds_config():
  config = tiny_config(num_steps=2)
  with config.unlocked():
    config.data.name = "mnist"
    config.data.train_split = "train"
    config.data.eval_split = "test"
  return config


def _on_mock_tfds(data_dir, fn, *args, **kwargs):
  """`fn` on tfds MNIST mocked with 8 examples (the same examples every time)."""
  with tfds.testing.mock_data(num_examples=8, data_dir=str(data_dir)):
    return fn(*args, **kwargs)


@pytest.fixture(scope="module")
def mock_run(tmp_path_factory):
  """One uninterrupted 2-step run on mocked tfds MNIST: (config, tfds dir, workdir, eval results)."""
  config, root = _mock_tfds_config(), tmp_path_factory.mktemp("stage1_mock")
  results = _on_mock_tfds(root / "tfds", train_rqvae.train_and_evaluate, config, str(root / "wd"))
  return config, root / "tfds", root / "wd", results


@pytest.mark.slow
@pytest.mark.xdist_group("stage1_mock_run")  # the tests of `mock_run` in one worker: the run is made once
def test_mock_tfds_run_writes_artifact_and_images(mock_run):
  _, _, workdir, results = mock_run
  assert np.isfinite(results["psnr"])
  assert 0.0 < results["usage_d1"] <= 1.0
  model, variables = artifact.load_artifact(str(workdir / train_rqvae.ARTIFACT_DIR))
  assert model.code_shape == (8, 8, 2)
  assert os.path.isfile(workdir / "images" / "recon_0000002.png")  # image_every 2 and the last step
  assert os.path.isfile(workdir / "config.json")


def _random_batch():
  return {"image": np.asarray(jax.random.uniform(jax.random.key(1), (4, 16, 16, 1), minval=-1, maxval=1))}


@pytest.mark.slow
@pytest.mark.xdist_group("stage1_mock_run")
def test_resume_is_bit_exact(mock_run, tmp_path):
  # Stopped after step 1 and resumed (state, EMA codebook and tfds iterator position restored), the run ends as the
  # uninterrupted one does.
  config, tfds_dir, full_dir, full = mock_run
  split = str(tmp_path / "split")
  assert _on_mock_tfds(tfds_dir, train_rqvae.train_and_evaluate, config, split, stop_after_steps=1) == {
      "stopped_at": 1}
  resumed = _on_mock_tfds(tfds_dir, train_rqvae.train_and_evaluate, config, split)
  assert full["psnr"] == resumed["psnr"]
  _, v_full = artifact.load_artifact(str(full_dir / train_rqvae.ARTIFACT_DIR))
  _, v_split = artifact.load_artifact(str(tmp_path / "split" / train_rqvae.ARTIFACT_DIR))
  helpers.assert_trees_equal(v_full, v_split)
  # Resuming with a config that makes another state (here a larger codebook) is refused, naming the difference,
  # before the run's config.json is overwritten.
  saved = (tmp_path / "split" / "config.json").read_text()
  bigger = _mock_tfds_config()
  bigger.model.codebook_size = 2 * config.model.codebook_size
  with pytest.raises(configlib.ConfigError, match=r"another state than this config makes \(.*quantizer\.\S+: saved "):
    _on_mock_tfds(tfds_dir, train_rqvae.train_and_evaluate, bigger, split)
  assert (tmp_path / "split" / "config.json").read_text() == saved


@pytest.mark.slow
@pytest.mark.xdist_group("stage1_mock_run")
def test_a_finished_run_run_again_returns_its_stored_evaluation(mock_run, tmp_path, monkeypatch):
  # A copy of the finished run, run again: no step, no evaluation; the results it wrote (eval.json).
  # Evaluated again once what the evaluation depends on differs (here the number of held-out examples).
  import shutil  # pylint: disable=g-import-not-at-top
  config, tfds_dir, full_dir, full = mock_run
  workdir = tmp_path / "again"
  shutil.copytree(full_dir, workdir)
  saved = json.loads((workdir / train_rqvae.EVAL_FILE).read_text())
  assert saved["results"] == full and saved["step"] == 2
  evaluate = train_rqvae.reconstruction.evaluate_rqvae
  calls = []
  monkeypatch.setattr(train_rqvae.reconstruction, "evaluate_rqvae", lambda *a, **k: calls.append(1) or evaluate(
      *a, **k))
  assert _on_mock_tfds(tfds_dir, train_rqvae.train_and_evaluate, config, str(workdir)) == full
  assert not calls
  fewer = _mock_tfds_config()
  fewer.data.eval_examples = 4
  assert _on_mock_tfds(tfds_dir, train_rqvae.train_and_evaluate, fewer, str(workdir))["num_examples"] == 4
  assert len(calls) == 1
  assert json.loads((workdir / train_rqvae.EVAL_FILE).read_text())["results"]["num_examples"] == 4


def test_a_missing_eval_split_fails_before_the_first_step(tmp_path):
  # The held-out images of the reconstruction grids are read before anything is traced: a split that cannot be read
  # stops the run at once (nothing trained, no checkpoint), not at its first image step.
  config = tiny_config()
  config.data.eval_split = "nope"
  with pytest.raises(ValueError, match="unknown split 'nope' of the embedded MNIST set"):
    train_rqvae.train_and_evaluate(config, str(tmp_path / "wd"))
  assert not (tmp_path / "wd" / "checkpoints").exists() or not os.listdir(tmp_path / "wd" / "checkpoints")


@pytest.mark.slow
def test_all_stage1_loss_terms_present_and_finite():
  """The reference's recipe on the tiny config: recon + commitment + LPIPS + adaptive-weighted GAN, D hinge loss;
  the codebook EMA starting from the reference's zero counts and updated after each depth as the reference's is
  (restarts included); the discriminator starts at disc_start, then learns;
  with train.nonfinite='skip' a non-finite step changes nothing but the step count."""
  config = tiny_config(nonfinite="skip")
  with config.unlocked():
    config.loss.perceptual = True
    config.loss.gan = True
    config.loss.disc_start = 1
    config.loss.disc_ndf = 8
    config.loss.disc_layers = 1
    config.quantizer.init_cluster_size = 0.0
    config.quantizer.codebook_update = "per_depth"
  train_rqvae.validate_config(config)
  trainer = train_rqvae.Stage1Trainer(config)
  assert trainer.lpips_variables is not None
  mesh = sharding.make_mesh(config.mesh)
  rep = sharding.replicated(mesh)
  init = jax.jit(trainer.init, out_shardings=rep)
  step = jax.jit(trainer.train_step, donate_argnums=(0,), out_shardings=(rep, rep))
  state = init(jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(state.quantizer.cluster_size_ema), 0.0)
  codebook0 = np.asarray(state.quantizer.codebook)
  batch = sharding.host_local_batch_to_global(_random_batch(), mesh)
  lp = jax.device_put(trainer.lpips_variables, rep)
  disc_before = helpers.leaves(state.disc_params)  # state is donated to the step
  disc_opt_before = helpers.leaves(state.disc_opt_state)
  # The codebook the per-depth order leaves: `rq.rq_quantize_updating` on the step's encoder latents (dropout 0) with
  # the step's restart key.
  z = jax.jit(lambda s: trainer.model.apply(rqvae.with_codebook_state({"params": s.params}, s.quantizer),
                                            batch["image"], train=True, method="encode"))(state)
  restart_key = jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(state.key), 0))[1]
  q = config.quantizer
  _, _, want = rq.rq_quantize_updating(z, state.quantizer, trainer.model.code_depth, float(q.ema_decay), float(q.eps),
                                       restart_key)
  state, metrics = step(state, batch, lp)  # step 0 < disc_start: the discriminator and its optimizer stay put
  for got, expected in zip(jax.tree.leaves(state.quantizer), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-6)
  assert float(metrics["d_loss"]) == 0.0 and float(metrics["gan_weight"]) == 0.0
  helpers.assert_trees_equal(disc_before, helpers.leaves(state.disc_params))
  helpers.assert_trees_equal(disc_opt_before, helpers.leaves(state.disc_opt_state))
  for _ in range(2):  # from disc_start: its warmup gives learning rate 0 at its first step, the second one learns
    state, metrics = step(state, batch, lp)
  assert int(optim.applied_updates(state.disc_opt_state)) == 2
  m = {k: float(v) for k, v in metrics.items()}
  for term in ("recon_loss", "commitment_loss", "perceptual_loss", "g_loss", "gan_weight", "d_loss"):
    assert term in m and np.isfinite(m[term]), term
  assert m["recon_loss"] > 0 and m["perceptual_loss"] > 0 and m["gan_weight"] > 0 and m["d_loss"] > 0
  # loss = recon + 0.25 commitment + 1.0 LPIPS + g_weight (already x disc_weight) * g_loss.
  expected = m["recon_loss"] + 0.25 * m["commitment_loss"] + m["perceptual_loss"] + m["gan_weight"] * m["g_loss"]
  assert m["loss"] == pytest.approx(expected, rel=1e-5)
  assert m["finite"] == 1.0 and int(state.step) == 3
  # The zero counts were re-seeded from data at the first step: every count is >= 1 or has grown past it since; the
  # EMA moved the codebook.
  assert np.all(np.asarray(state.quantizer.cluster_size_ema) > 0.9)
  assert not np.allclose(np.asarray(state.quantizer.codebook), codebook0)
  assert any(not np.allclose(a, b) for a, b in zip(disc_before, helpers.leaves(state.disc_params)))
  # train.nonfinite='skip': a batch that makes the loss non-finite changes nothing but the step count (the loop counts
  # it): parameters, codebook, both players' optimizer states keep their values, never NaN.
  before = jax.device_get(state)
  nan_batch = {"image": np.array(_random_batch()["image"])}
  nan_batch["image"][0, 0, 0, 0] = np.nan
  state, metrics = step(state, sharding.host_local_batch_to_global(nan_batch, mesh), lp)
  assert int(state.step) == 4 and float(metrics["finite"]) == 0.0 and not np.isfinite(float(metrics["loss"]))
  helpers.assert_trees_equal(before.replace(step=None), jax.device_get(state).replace(step=None))


@pytest.mark.slow
def test_gan_loss_gradient_is_the_plain_gradient_with_the_adaptive_weight_held():
  """`loss_and_grads` (one forward and one backward of the RQ-VAE) equals the plain formulation on the same
  training graph (dropout on, the same key): g_weight = ||d nll / d W|| / (||d g / d W|| + 1e-4) * disc_weight for the
  decoder's last kernel W, each gradient taken over the whole model, and the gradient of L_G with g_weight fixed."""
  config = tiny_config()
  with config.unlocked():
    config.loss.gan = True  # LPIPS off (compiles faster): with it, the nll takes the same path
    config.loss.disc_start = 0
    config.loss.disc_ndf = 8
    config.loss.disc_layers = 1
    config.model.dropout = 0.1
  trainer = train_rqvae.Stage1Trainer(config)
  state = jax.jit(trainer.init)(jax.random.key(0))
  x, lp, drop_key = _random_batch()["image"], trainer.lpips_variables, jax.random.key(5)
  loss, aux, grads = jax.jit(trainer.loss_and_grads)(state, x, lp, drop_key, jax.random.key(6))

  @jax.jit
  def plain(params):
    def terms(p):  # [nll, commitment, generator loss] of the training forward
      out = trainer.model.apply(rqvae.with_codebook_state({"params": p}, state.quantizer), x, train=True,
                                rngs={"dropout": drop_key})
      g = losses.generator_loss(trainer.disc.apply({"params": state.disc_params}, out["recon"]))
      return jnp.stack([trainer.nll(x, out["recon"], lp)[0], out["commitment_loss"], g])
    values, jac = terms(params), jax.jacrev(terms)(params)  # each term's gradient over the whole model
    last = jac["decoder"]["conv_out"]["kernel"].reshape(3, -1)
    weight = jnp.linalg.norm(last[0]) / (jnp.linalg.norm(last[2]) + 1e-4) * 0.75
    coef = jnp.concatenate([jnp.array([1.0, 0.25]), weight[None]])  # L_G = nll + 0.25 commitment + weight g
    return weight, values @ coef, jax.tree.map(lambda j: jnp.tensordot(coef, j, 1), jac)

  weight, want_loss, want_grads = plain(state.params)
  assert 0 < float(weight) < float(config.loss.adaptive_max_weight)  # not clipped: the ratio itself is compared
  np.testing.assert_allclose(float(aux["gan_weight"]), float(weight), rtol=1e-5)
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
  scale = max(np.abs(g).max() for g in helpers.leaves(want_grads))  # (biases before a GroupNorm: ~0 +- rounding)
  for got, want in zip(helpers.leaves(grads), helpers.leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * scale)


def test_codebook_update_is_a_config_key(tmp_path):
  config = tiny_config()
  config.quantizer.codebook_update = "per_batch"
  with pytest.raises(configlib.ConfigError, match="quantizer.codebook_update must be one of"):
    train_rqvae.train_and_evaluate(config, str(tmp_path / "wd"))
  assert not os.path.exists(tmp_path / "wd")


def test_the_step_compiles_with_the_configs_ynnpack_fusions():
  # train.cpu_ynn_fusions reaches the compiled training step (a CPU here): '' leaves no YNNPACK fusion in its
  # program. That the check can fail: with XLA's own list, a convolution of the same kind goes to YNNPACK.
  config = tiny_config()
  config.train.cpu_ynn_fusions = ""
  trainer = train_rqvae.Stage1Trainer(config)
  state = jax.eval_shape(trainer.init, jax.random.key(0))
  res, channels = config.model.resolution, config.model.in_channels
  images = jax.ShapeDtypeStruct((2, res, res, channels), jnp.float32)
  assert "ynn_fusion" not in trainer.jit_train_step().lower(state, {"image": images}, None).compile().as_text()

  def conv_loss(w, x):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(y ** 2)

  shapes = (jax.ShapeDtypeStruct((3, 3, 8, 8), jnp.float32), jax.ShapeDtypeStruct((4, 16, 16, 8), jnp.float32))
  assert "ynn_fusion" in jax.jit(conv_loss).lower(*shapes).compile().as_text()


@pytest.mark.parametrize("value", ["dot", "LIBRARY_FUSION_TYPE_DOT,conv"])
def test_unknown_ynnpack_fusion_type_is_a_config_error(tmp_path, value):
  config = tiny_config()
  config.train.cpu_ynn_fusions = value
  with pytest.raises(configlib.ConfigError, match="train.cpu_ynn_fusions has unknown YNNPACK fusion types"):
    train_rqvae.train_and_evaluate(config, str(tmp_path / "wd"))
  assert not os.path.exists(tmp_path / "wd")


def test_perceptual_loss_config_errors(tmp_path):
  config = tiny_config()
  with config.unlocked():
    config.loss.perceptual = True
    config.loss.perceptual_precision = "fast"
  with pytest.raises(configlib.ConfigError, match="loss.perceptual_precision must be one of"):
    train_rqvae.train_and_evaluate(config, str(tmp_path / "wd"))
  with config.unlocked():
    config.loss.perceptual_precision = "highest"
    config.loss.perceptual_weights_path = str(tmp_path / "absent.npz")
  with pytest.raises(FileNotFoundError, match="LPIPS weights file not found"):
    train_rqvae.Stage1Trainer(config)


def test_wrong_image_size_is_a_clear_error(tmp_path):
  config = tiny_config()
  with config.unlocked():
    config.data.image_size = 32
  with pytest.raises(configlib.ConfigError, match="image_size 32 != model.resolution 16"):
    train_rqvae.train_and_evaluate(config, str(tmp_path))
  model = rqvae.RQVAE.from_config(config.model)
  variables = jax.eval_shape(lambda: rqvae.init_variables(model, jax.random.key(0)))  # tracing is enough
  with pytest.raises(ValueError, match="expects images"):
    jax.eval_shape(model.apply, variables, np.zeros((1, 32, 32, 1), np.float32))


@pytest.mark.parametrize("which", ["tx", "disc_tx"])
def test_imagenet_optimizers_move_weights_with_grad_clip_zero(which):
  """configs/rqvae_imagenet.py sets grad_clip 0 ("no clipping"); clip_by_global_norm(0) zeroed every update."""
  config = configlib.load_config_file("rqvae_imagenet")
  assert float(config.optim.grad_clip) == 0.0 and config.loss.gan
  tx = getattr(train_rqvae.Stage1Trainer(config), which)  # the real schedule, lr and disc_lr
  params = {"w": jax.numpy.zeros((3,))}
  state = tx.init(params)
  grads = {"w": jax.numpy.ones((3,))}
  updates, state = tx.update(grads, state, params)  # step 0: the warmup starts at lr 0
  params1 = optax.apply_updates(params, updates)
  updates, state = tx.update(grads, state, params1)
  params2 = optax.apply_updates(params1, updates)
  assert np.all(np.asarray(params2["w"]) < 0)


def test_negative_grad_clip_is_a_config_error(tmp_path):
  config = tiny_config()
  config.optim.grad_clip = -1.0
  with pytest.raises(configlib.ConfigError, match="optim.grad_clip must be >= 0"):
    train_rqvae.train_and_evaluate(config, str(tmp_path / "wd"))
  assert not os.path.exists(tmp_path / "wd")


@pytest.mark.parametrize("name", ["rqvae_imagenet", "rqvae_mnist"])
def test_stage1_configs_have_the_reference_keys(name):
  configlib.check_keys(configlib.load_config_file(name), train_rqvae.reference_config())


@pytest.mark.parametrize("edit, message", [
    ("unknown", "unknown config keys: train.batch_sise"),
    ("missing", "missing config keys: train.image_every"),
])
def test_unknown_or_missing_key_is_a_config_error_before_anything_is_built(tmp_path, edit, message):
  config = tiny_config()
  with config.unlocked():
    if edit == "unknown":
      config.train.batch_sise = 8
    else:
      del config.train["image_every"]
  with pytest.raises(configlib.ConfigError, match=message):
    train_rqvae.train_and_evaluate(config, str(tmp_path / "wd"))
  assert not os.path.exists(tmp_path / "wd")


@pytest.mark.parametrize("key", ["train.log_every", "train.image_every", "train.ckpt_every",
                                 "train.keep_checkpoints", "data.eval_examples"])
def test_zero_interval_or_count_is_a_config_error(tmp_path, key):
  config = tiny_config()
  section, name = key.split(".")
  config[section][name] = 0
  with pytest.raises(configlib.ConfigError, match=f"{key} must be >= 1, got 0"):
    train_rqvae.train_and_evaluate(config, str(tmp_path / "wd"))


def test_nonfinite_policy_is_a_config_key(tmp_path):
  config = tiny_config()
  config.train.nonfinite = "ignore"
  with pytest.raises(configlib.ConfigError, match="train.nonfinite must be 'stop' or 'skip', got 'ignore'"):
    train_rqvae.train_and_evaluate(config, str(tmp_path / "wd"))


def test_a_diverged_run_stops_before_saving_a_nonfinite_checkpoint(tmp_path):
  # train.nonfinite='stop' (the default): the run stops naming the step, and every checkpoint left is finite.
  config = tiny_config(num_steps=6, ckpt_every=1, keep_checkpoints=2, log_every=1)
  config.optim.learning_rate = 1e30
  with pytest.raises(FloatingPointError, match=r"non-finite loss or gradient at step (\d+); .*Latest checkpoint"):
    train_rqvae.train_and_evaluate(config, str(tmp_path / "wd"))
  ckpt = checkpoint.Checkpointer(tmp_path / "wd" / "checkpoints", max_to_keep=2, save_interval_steps=1, read_only=True)
  target = jax.eval_shape(train_rqvae.Stage1Trainer(config).init, jax.random.key(0))
  state, step = ckpt.restore(target)  # what a resumed run would start from
  assert step is not None and step < 6
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves((state.params, state.quantizer)))


def test_config_json_paths_are_absolute(tmp_path, monkeypatch):
  # A relative tfds data_dir in stage 1's config.json was read against the working directory of whoever read the
  # snapshot later (the digit judge, `evaluate`): made absolute as stage 2's codes_dir is; unset paths and buckets
  # stay as they are.
  monkeypatch.chdir(tmp_path)
  config = tiny_config()
  with config.unlocked():
    config.data.data_dir = "tfds_data"
    config.data.manual_dir = "gs://bucket/tars"
  out = train_rqvae.absolute_paths(config)
  assert out.data.data_dir == str(tmp_path / "tfds_data") and out.data.manual_dir == "gs://bucket/tars"
  assert out.loss.perceptual_weights_path is None and config.data.data_dir == "tfds_data"  # a copy
