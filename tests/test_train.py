"""Stage-2 trainer: validation before compiling, learning, bit-exact resume, SIGTERM in a real process, non-finite."""

import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxrq_jax import checkpoint
from ctxrq_jax import sharding
from ctxrq_jax import train
from ctxrq_jax.configlib import ConfigError
from ctxrq_jax.data import codes as codes_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  # Compiles dominate these tests on a shared CPU; the persistent cache makes reruns of a program (restarts,
  # subprocesses) cheap without changing what runs.
  d = str(tmp_path_factory.mktemp("jax_cache"))
  jax.config.update("jax_compilation_cache_dir", d)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  yield d
  jax.config.update("jax_compilation_cache_dir", None)


@pytest.fixture(scope="module")
def codes_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("codes")
  rng = np.random.default_rng(0)
  with codes_lib.CodeDatasetWriter(d, code_shape=(4, 4, 4), codebook=rng.normal(size=(64, 16)).astype(np.float32),
                                   num_classes=10, source="synthetic") as w:
    # 8 training examples = 2 batches of 4, so every run sees the same few examples again and again.
    w.write("train", rng.integers(0, 64, (8, 4, 4, 4)), rng.integers(0, 10, (8,)))
    w.write("validation", rng.integers(0, 64, (4, 4, 4, 4)), rng.integers(0, 10, (4,)))
  return str(d)


def _config(codes_dir, **train_overrides):
  config = train.reference_config()
  config.unlock()
  config.data.codes_dir = codes_dir
  config.train.num_steps = 6
  config.train.log_every = 1
  config.train.eval_every = 100
  config.train.ckpt_every = 2
  config.optim.learning_rate = 1e-2
  for k, v in train_overrides.items():
    section, key = k.split("__")
    config[section][key] = v
  config.lock()
  return config


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def _assert_bit_equal(a, b):
  la, lb = _leaves(a), _leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(x, y)


def test_bad_config_fails_before_compiling(codes_dir, tmp_path):
  config = _config(codes_dir)
  config.unlock()
  config.train.batch_sise = 4
  with pytest.raises(ConfigError, match="unknown config keys: train.batch_sise"):
    train.train_and_evaluate(config, str(tmp_path / "a"))
  with pytest.raises(ConfigError, match=r"code shape \(h, w, D\) = \(4, 4, 4\), but config.data.code_shape is "
                                        r"\(8, 8, 4\)"):
    train.train_and_evaluate(_config(codes_dir, data__code_shape=(8, 8, 4)), str(tmp_path / "b"))
  with pytest.raises(ConfigError, match="codebook size K = 64, but config.data.vocab_size is 32"):
    train.train_and_evaluate(_config(codes_dir, data__vocab_size=32), str(tmp_path / "c"))
  with pytest.raises(ConfigError, match="10 classes, but config.model.num_classes is 5"):
    train.train_and_evaluate(_config(codes_dir, model__num_classes=5), str(tmp_path / "d"))
  with pytest.raises(ConfigError, match=r"mesh data=3 x fsdp=1 x tensor=1 = 3 devices, but 1 devices"):
    train.train_and_evaluate(_config(codes_dir, mesh__data=3), str(tmp_path / "e"))
  with pytest.raises(ConfigError, match="train.nonfinite"):
    train.train_and_evaluate(_config(codes_dir, train__nonfinite="ignore"), str(tmp_path / "f"))
  with pytest.raises(ConfigError, match="config.data.codes_dir is empty"):
    train.train_and_evaluate(_config("", ), str(tmp_path / "g"))
  # Nothing was compiled or written: validation precedes the workdir.
  assert not any((tmp_path / n).exists() for n in "abcdefg")


def test_learns_and_resumes_bit_exact(codes_dir, tmp_path, cache_dir):
  del cache_dir
  config = _config(codes_dir)
  full = train.train_and_evaluate(config, str(tmp_path / "full"))
  assert full["step"] == 6 and not full["stopped"]
  losses = [l for _, l in full["history"]]
  assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.05, losses
  assert "eval/loss" in full["eval"] and np.isfinite(full["eval"]["eval/loss"])
  assert os.path.isfile(tmp_path / "full" / "config.json")

  part = train.train_and_evaluate(config, str(tmp_path / "resumed"), stop_after_steps=3)
  assert part["stopped"] and part["step"] == 3
  rest = train.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert rest["step"] == 6
  _assert_bit_equal(rest["state"].params, full["state"].params)
  _assert_bit_equal(rest["state"].opt_state, full["state"].opt_state)
  _assert_bit_equal(rest["state"].rng, full["state"].rng)
  # Same masks and data after the restart: the logged losses of steps 4..6 agree exactly.
  assert [l for s, l in rest["history"]] == losses[3:]

  # Resuming with another model shape is refused before the run's config.json is touched.
  saved = (tmp_path / "full" / "config.json").read_text()
  with pytest.raises(ConfigError, match=r"another shape \(model.width: 32 -> 48\)"):
    train.train_and_evaluate(_config(codes_dir, model__width=48), str(tmp_path / "full"))
  assert (tmp_path / "full" / "config.json").read_text() == saved
  assert '"codes_dir": "%s"' % os.path.abspath(codes_dir) in saved  # usable from any directory


def test_weight_decay_only_on_kernels(codes_dir):
  config = _config(codes_dir)
  model = train.build_model(config)
  params = train.nn.meta.unbox(
      jax.eval_shape(lambda: model.init(jax.random.key(0), *train.transformer.init_inputs(model)))["params"])
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): decays
          for path, decays in jax.tree_util.tree_leaves_with_path(train._decay_mask(params))}
  decayed = {k for k, v in flat.items() if v}
  assert decayed and all(k.endswith("kernel") for k in decayed), sorted(decayed)
  assert any(k.endswith("qkv_bias") for k in flat) and not any(k.endswith("_bias") for k in decayed)
  assert any(k.endswith("fc_in/kernel") for k in decayed) and any(k.endswith("qkv_kernel") for k in decayed)


def test_sigterm_saves_and_exits_zero_then_resume_matches(codes_dir, tmp_path, cache_dir):
  num_steps = 150
  config = _config(codes_dir, train__num_steps=num_steps, train__ckpt_every=5, train__log_every=50,
                   train__eval_every=1000)
  reference = train.train_and_evaluate(config, str(tmp_path / "reference"))
  workdir = str(tmp_path / "preempted")
  cmd = [sys.executable, "-m", "ctxrq_jax.train", f"--config={REPO}/configs/imagenet.py:tiny",
         f"--workdir={workdir}", f"--config.data.codes_dir={codes_dir}", f"--config.train.num_steps={num_steps}",
         "--config.train.ckpt_every=5", "--config.train.log_every=50", "--config.train.eval_every=1000",
         "--config.optim.learning_rate=0.01"]
  # The subprocess must use the PRNG implementation tests/conftest.py selects in this process.
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_DEFAULT_PRNG_IMPL=jax.config.jax_default_prng_impl,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONPATH=REPO)
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  first_ckpt = os.path.join(workdir, "checkpoints", "5")
  deadline = time.time() + 300
  while not os.path.isdir(first_ckpt) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert proc.poll() is None, proc.communicate()[0].decode()[-3000:]
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=300)[0].decode()
  assert proc.returncode == 0, out[-3000:]
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=3, save_interval_steps=5) as c:
    stopped_at = c.latest_step()
  assert 5 <= stopped_at < num_steps, out[-3000:]

  proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
  assert proc.returncode == 0, proc.stdout.decode()[-3000:]
  model, tx = train.build_model(config), train.make_optimizer(config)
  mesh = sharding.make_mesh(config.mesh)
  abstract, _ = train.abstract_train_state(model, tx, config, mesh, sharding.logical_rules(config))
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=3, save_interval_steps=5) as c:
    final, step = c.restore(abstract)
  assert step == num_steps
  _assert_bit_equal(final.params, reference["state"].params)
  _assert_bit_equal(final.opt_state, reference["state"].opt_state)


def test_nonfinite_stop_and_skip(codes_dir, tmp_path, cache_dir):
  del cache_dir
  # A huge learning rate blows the parameters up after the first update: the loss of step 2 is not finite.
  with pytest.raises(FloatingPointError, match=r"non-finite loss or gradient at step \d"):
    train.train_and_evaluate(_config(codes_dir, optim__learning_rate=1e30, optim__warmup_steps=0,
                                     train__num_steps=4, train__nonfinite="stop"), str(tmp_path / "stop"))
  # 'stop' never checkpoints a non-finite state: whatever is on disk is finite.
  ckpt_dir = tmp_path / "stop" / "checkpoints"
  with checkpoint.Checkpointer(ckpt_dir, max_to_keep=3, save_interval_steps=2) as c:
    assert c.latest_step() in (None, 2)

  result = train.train_and_evaluate(_config(codes_dir, optim__learning_rate=1e30, optim__warmup_steps=0,
                                            train__num_steps=4, train__nonfinite="skip"), str(tmp_path / "skip"))
  assert result["step"] == 4 and result["skipped_steps"] >= 1
  assert all(np.all(np.isfinite(x)) for x in _leaves(result["state"].params))


def test_grad_accumulation_matches_full_batch(codes_dir):
  config = _config(codes_dir)
  config_accum = _config(codes_dir, train__grad_accum_steps=2)
  model, tx = train.build_model(config), train.make_optimizer(config)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config)
  state, _ = train.create_train_state(model, tx, config, mesh, rules)
  batch = next(iter(codes_lib.make_code_iterator(codes_dir, split="train", batch_size=4, seed=0, train=False)))
  codebook = jnp.asarray(codes_lib.load_codebook(codes_dir))
  s1, m1 = jax.jit(train.make_train_step(model, tx, config))(state, batch, codebook)
  s2, m2 = jax.jit(train.make_train_step(model, tx, config_accum))(state, batch, codebook)
  np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
  for a, b in zip(_leaves(s1.params), _leaves(s2.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
