"""Stage-1 training loop, code extraction and decoding, end to end on tiny configs."""

import os

import jax
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from ctxrq_jax import configlib
from ctxrq_jax import encode
from ctxrq_jax import rqvae
from ctxrq_jax import train_rqvae
from ctxrq_jax.data import codes as code_data


def tiny_config(**train_overrides):
  """configs/rqvae_mnist.py shrunk to seconds per step: 16x16x1 digits (resized by crop), 4x4x2 codes."""
  c = configlib.load_config_file("rqvae_mnist")
  with c.unlocked():
    c.data.image_size = 16
    c.data.resize = "crop"
    c.data.eval_examples = 8
    c.model.resolution = 16
    c.model.ch = 8
    c.model.ch_mult = (1, 2, 2)
    c.model.norm_groups = 4
    c.model.z_channels = 8
    c.model.embed_dim = 8
    c.model.codebook_size = 16
    c.model.code_depth = 2
    c.train.batch_size = 4
    c.train.num_steps = 2
    c.train.log_every = 1
    c.train.image_every = 2
    c.train.ckpt_every = 1
    for k, v in train_overrides.items():
      c.train[k] = v
  return c


def _leaves(state):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(state))]


def test_one_step_on_mock_tfds_writes_artifact_and_images(tmp_path):
  config = tiny_config(num_steps=1)
  with config.unlocked():
    config.data.name = "mnist"
    config.data.split_train = "train"
    config.data.split_eval = "test"
  with tfds.testing.mock_data(num_examples=8, data_dir=str(tmp_path / "tfds")):
    results = train_rqvae.train_and_evaluate(config, str(tmp_path / "wd"))
  assert np.isfinite(results["psnr"])
  assert 0.0 < results["usage_d1"] <= 1.0
  model, variables = rqvae.load_artifact(str(tmp_path / "wd" / train_rqvae.ARTIFACT_DIR))
  assert model.code_shape == (4, 4, 2)
  assert os.path.isfile(tmp_path / "wd" / "images" / "recon_0000001.png")
  assert os.path.isfile(tmp_path / "wd" / "config.json")


def test_training_updates_codebook_and_resume_is_bit_exact(tmp_path):
  config = tiny_config(num_steps=2)
  trainer = train_rqvae.Stage1Trainer(config)
  state0 = trainer.init(jax.random.key(0))
  batch = {"image": jax.random.uniform(jax.random.key(1), (4, 16, 16, 1), minval=-1, maxval=1)}
  state1, metrics = jax.jit(trainer.train_step)(state0, batch)
  assert int(state1.step) == 1
  assert np.all(np.isfinite(np.asarray(metrics["loss"])))
  # The EMA moved the codebook; counts of used codes grew relative to unused ones.
  assert not np.allclose(np.asarray(state1.quantizer.codebook), np.asarray(state0.quantizer.codebook))

  full = train_rqvae.train_and_evaluate(config, str(tmp_path / "full"))
  assert train_rqvae.train_and_evaluate(config, str(tmp_path / "split"), stop_after_steps=1) == {"stopped_at": 1}
  resumed = train_rqvae.train_and_evaluate(config, str(tmp_path / "split"))
  assert full["psnr"] == resumed["psnr"]
  _, v_full = rqvae.load_artifact(str(tmp_path / "full" / train_rqvae.ARTIFACT_DIR))
  _, v_split = rqvae.load_artifact(str(tmp_path / "split" / train_rqvae.ARTIFACT_DIR))
  for a, b in zip(_leaves(v_full), _leaves(v_split)):
    np.testing.assert_array_equal(a, b)


def test_gan_step_runs_and_updates_discriminator():
  config = tiny_config()
  with config.unlocked():
    config.loss.gan = True
    config.loss.disc_start = 0
    config.loss.disc_ndf = 8
    config.loss.disc_layers = 1
  trainer = train_rqvae.Stage1Trainer(config)
  state0 = trainer.init(jax.random.key(0))
  batch = {"image": jax.random.uniform(jax.random.key(1), (4, 16, 16, 1), minval=-1, maxval=1)}
  step = jax.jit(trainer.train_step)
  state1, metrics = step(state0, batch)
  state1, metrics = step(state1, batch)  # the warmup gives learning rate 0 at the first step
  assert float(metrics["gan_weight"]) > 0.0
  assert np.isfinite(float(metrics["d_loss"]))
  before = jax.tree_util.tree_leaves(state0.disc_params)
  after = jax.tree_util.tree_leaves(state1.disc_params)
  assert any(not np.allclose(a, b) for a, b in zip(before, after))


def test_wrong_image_size_is_a_clear_error(tmp_path):
  config = tiny_config()
  with config.unlocked():
    config.data.image_size = 32
  with pytest.raises(configlib.ConfigError, match="image_size 32 != model.resolution 16"):
    train_rqvae.train_and_evaluate(config, str(tmp_path))
  model = rqvae.RQVAE.from_config(config.model)
  variables = rqvae.init_variables(model, jax.random.key(0))
  with pytest.raises(ValueError, match="expects images"):
    model.apply(variables, np.zeros((1, 32, 32, 1), np.float32))


def test_encode_then_decode_round_trip(tmp_path):
  config = tiny_config()
  model = rqvae.RQVAE.from_config(config.model)
  variables = rqvae.init_variables(model, jax.random.key(3))
  artifact = str(tmp_path / "artifact")
  rqvae.save_artifact(artifact, config.model, variables)
  meta = encode.encode_dataset(artifact, config.data, str(tmp_path / "codes"), ["test"], batch_size=32,
                               max_examples=40)
  assert meta.code_shape == (4, 4, 2) and meta.num_examples("test") == 40
  codes, labels = code_data.load_codes(str(tmp_path / "codes"), "test")
  np.testing.assert_array_equal(code_data.load_codebook(str(tmp_path / "codes")),
                                np.asarray(variables["quantizer"]["codebook"]))
  # The stored codes are exactly what the model computes on the same (eval-preprocessed) images.
  from ctxrq_jax.data import images as image_data
  batch = next(iter(image_data.make_image_iterator(config.data, split="test", batch_size=40, seed=0, train=False)))
  np.testing.assert_array_equal(codes, np.asarray(model.apply(variables, batch["image"])["codes"]))
  np.testing.assert_array_equal(labels, batch["label"])
  images = encode.decode_codes(artifact, codes[:5], batch_size=4)
  direct = np.clip(np.asarray(model.apply(variables, codes[:5], method=rqvae.RQVAE.decode_codes)), -1, 1)
  np.testing.assert_allclose(images, direct, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="codes must lie in"):
    encode.decode_codes(artifact, np.full((1, 4, 4, 2), 99))


@pytest.mark.parametrize("which", ["tx", "disc_tx"])
def test_imagenet_optimizers_move_weights_with_clip_norm_zero(which):
  """configs/rqvae_imagenet.py sets clip_norm 0 ("no clipping"); clip_by_global_norm(0) zeroed every update."""
  config = configlib.load_config_file("rqvae_imagenet")
  assert float(config.optim.clip_norm) == 0.0 and config.loss.gan
  tx = getattr(train_rqvae.Stage1Trainer(config), which)  # the real schedule, lr and disc_lr
  params = {"w": jax.numpy.zeros((3,))}
  state = tx.init(params)
  grads = {"w": jax.numpy.ones((3,))}
  updates, state = tx.update(grads, state, params)  # step 0: the warmup starts at lr 0
  params1 = optax.apply_updates(params, updates)
  updates, state = tx.update(grads, state, params1)
  params2 = optax.apply_updates(params1, updates)
  assert np.all(np.asarray(params2["w"]) < 0)


def test_negative_clip_norm_is_a_config_error(tmp_path):
  config = tiny_config()
  config.optim.clip_norm = -1.0
  with pytest.raises(configlib.ConfigError, match="optim.clip_norm must be >= 0"):
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
