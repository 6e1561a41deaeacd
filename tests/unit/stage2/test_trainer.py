"""Stage-2 trainer: validation before compiling, learning, bit-exact resume (production threefry PRNG, EMA on),
non-finite handling and gradient accumulation. SIGTERM in a real process: tests/integration/test_preemption.py."""

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxrq_jax.core import checkpoint
from ctxrq_jax.core import optim
from ctxrq_jax.core import sharding
from ctxrq_jax.core.config import ConfigError
from ctxrq_jax.data import codes as codes_lib
from ctxrq_jax.stage2 import masking
from ctxrq_jax.stage2 import trainer as train
from tests import helpers

# One layer per stack: nothing proven here (validation, learning, resume, non-finite handling, accumulation) depends
# on the depth of the stacks, while every layer adds to the tracing and compiling of each program. The object-store
# and preemption tests train the same model; the object-store test runs in this module's worker (one xdist group),
# where the trainer's kept programs (`train._programs`) spare it the tracing and compiling.
ONE_LAYER = dict(model__spatial_layers=1, model__depth_layers=1)
pytestmark = pytest.mark.xdist_group("stage2_one_layer")


def _config(codes_dir, **overrides):
  config = helpers.tiny_stage2_config(codes_dir, **{**ONE_LAYER, **overrides})
  config.lock()
  return config


def _count_traces(monkeypatch) -> list[int]:
  """A list that grows by one whenever a train or eval step is traced (each draws its masks once per trace)."""
  traced = []
  real = masking.sample_mask

  def spy(*args, **kwargs):
    traced.append(1)
    return real(*args, **kwargs)

  monkeypatch.setattr(masking, "sample_mask", spy)
  return traced


def test_bad_config_fails_before_compiling(stage2_codes_dir, tmp_path):
  codes_dir = stage2_codes_dir
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
  # A misspelt RQ-VAE path used to surface only when the finished run was sampled.
  with pytest.raises(ConfigError, match=r"config.data.stage1_dir .*rqvea does not exist"):
    train.train_and_evaluate(_config(codes_dir, data__stage1_dir=str(tmp_path / "rqvea")), str(tmp_path / "h"))
  # Nothing was compiled or written: validation precedes the workdir.
  assert not any((tmp_path / n).exists() for n in "abcdefgh")


def test_programs_are_kept_per_config_and_prng(stage2_codes_dir):
  """What `train_and_evaluate` reuses within a process: the same functions (so JAX's caches serve their traces and
  executables) for configs differing in loop-only keys, new ones when anything a program reads changes."""
  config = _config(stage2_codes_dir)
  kept = train._programs(config)  # pylint: disable=protected-access
  assert train._programs(_config(stage2_codes_dir)) is kept  # pylint: disable=protected-access
  loop_only = _config(os.path.join(stage2_codes_dir, "elsewhere"), train__log_every=3, train__eval_every=5,
                      train__ckpt_every=7, train__keep_checkpoints=9, train__nonfinite="skip", data__stage1_dir="x",
                      train__steps_per_call=3)
  assert train._programs(loop_only) is kept  # pylint: disable=protected-access
  seeded = _config(stage2_codes_dir)
  with seeded.unlocked():
    seeded.seed = 1
  for other in (_config(stage2_codes_dir, train__num_steps=7), _config(stage2_codes_dir, optim__learning_rate=0.5),
                _config(stage2_codes_dir, train__grad_accum_steps=2), _config(stage2_codes_dir, model__depth_layers=2),
                seeded):
    assert train._programs(config) is kept  # pylint: disable=protected-access  (and the most recently used)
    assert train._programs(other) is not kept  # pylint: disable=protected-access
  # The PRNG implementation is part of the key: the init and the step draw keys with it, and JAX's trace cache
  # would hand an 'rbg' trace to a threefry run.
  before = jax.config.jax_default_prng_impl
  jax.config.update("jax_default_prng_impl", "threefry2x32" if before == "rbg" else "rbg")
  try:
    assert train._programs(config) is not kept  # pylint: disable=protected-access
  finally:
    jax.config.update("jax_default_prng_impl", before)


@pytest.mark.slow
def test_learns_and_resumes_bit_exact(stage2_codes_dir, tmp_path, monkeypatch, threefry):
  """Learns; stopped and resumed, finishes bit-identical to an uninterrupted run. Under the production PRNG (JAX's
  default threefry; the suite runs on 'rbg') and with EMA, so the whole state (params, opt_state, ema_params, rng)
  is resumed; a run's checkpoint refuses configs that make another state."""
  assert jax.config.jax_default_prng_impl == threefry == "threefry2x32"
  codes_dir = stage2_codes_dir
  config = _config(codes_dir, train__ema_decay=0.5)
  # Augmented records: each example's view is drawn per epoch, so the resume below also restores those draws.
  assert config.data.random_view and codes_lib.read_metadata(codes_dir).views == ("center", "flip")
  full = train.train_and_evaluate(config, str(tmp_path / "full"))
  assert full["step"] == 6 and not full["stopped"]
  # The run's base key is threefry key data (uint32 [2]; an 'rbg' key holds 4 words).
  assert full["state"].rng.shape == (2,) and full["state"].rng.dtype == jnp.uint32
  assert full["state"].ema_params is not None
  losses = [l for _, l in full["history"]]
  assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.05, losses
  assert "eval/loss" in full["eval"] and np.isfinite(full["eval"]["eval/loss"])  # the last step evaluates
  assert os.path.isfile(tmp_path / "full" / "config.json")

  traced = _count_traces(monkeypatch)
  part = train.train_and_evaluate(config, str(tmp_path / "resumed"), stop_after_steps=3)
  assert part["stopped"] and part["step"] == 3
  rest = train.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert rest["step"] == 6 and not rest["stopped"]
  # The process kept the programs of the uninterrupted run: the stopped and the resumed run traced no step.
  assert not traced
  helpers.assert_trees_equal(rest["state"], full["state"])  # step, params, opt_state, ema_params, rng
  # Same masks and data after the restart: the logged losses of steps 4..6 agree exactly, and so does the final
  # evaluation (of the EMA parameters).
  assert [l for s, l in rest["history"]] == losses[3:]
  assert rest["eval"] == full["eval"]

  # Resuming with another model shape is refused before the run's config.json is touched.
  saved = (tmp_path / "full" / "config.json").read_text()
  with pytest.raises(ConfigError, match=r"another shape \(model.width: 32 -> 48\)"):
    train.train_and_evaluate(_config(codes_dir, train__ema_decay=0.5, model__width=48), str(tmp_path / "full"))
  assert (tmp_path / "full" / "config.json").read_text() == saved
  # So is another state structure or dtype: EMA turned off (the checkpoint has EMA parameters the config would
  # drop), gradient clipping turned off (the optimizer state the config makes has leaves the checkpoint lacks), or
  # float32 parameters resumed as bfloat16 (which the restore would have cast silently).
  with pytest.raises(ConfigError, match=r"another state than this config makes \(ema_params\.\S+ is in the "
                                        r"checkpoint only; .* more\)"):
    train.train_and_evaluate(_config(codes_dir), str(tmp_path / "full"))
  with pytest.raises(ConfigError, match=r"another state than this config makes \(opt_state\.\S+ is not in the "
                                        r"checkpoint; .* more\)"):
    train.train_and_evaluate(_config(codes_dir, train__ema_decay=0.5, optim__grad_clip=0.0),
                             str(tmp_path / "full"))
  with pytest.raises(ConfigError, match=r"ema_params\.\S+: saved \[[\d, ]*\] float32, now \[[\d, ]*\] bfloat16"):
    train.train_and_evaluate(_config(codes_dir, train__ema_decay=0.5, model__param_dtype="bfloat16"),
                             str(tmp_path / "full"))
  assert (tmp_path / "full" / "config.json").read_text() == saved
  # So are codes re-encoded with another stage-1 model (same shape and K, another codebook), and the sampler
  # refuses them too.
  other = tmp_path / "reencoded"
  shutil.copytree(codes_dir, other)
  codebook = codes_lib.load_codebook(str(other))
  np.save(other / codes_lib.CODEBOOK_FILE, codebook + np.float32(0.5))
  with pytest.raises(ValueError, match=r"the codebook of .*reencoded is not the one the stage-2 model in .*full was "
                                       r"trained on"):
    train.train_and_evaluate(_config(str(other), train__ema_decay=0.5), str(tmp_path / "full"))
  assert (tmp_path / "full" / "config.json").read_text() == saved
  assert json.loads((tmp_path / "full" / codes_lib.TRAINED_CODEBOOK_FILE).read_text())["sha256"] == (
      codes_lib.codebook_fingerprint(codebook))
  assert '"codes_dir": "%s"' % os.path.abspath(codes_dir) in saved  # usable from any directory


def test_nonfinite_stop_and_skip(stage2_codes_dir, tmp_path):
  codes_dir = stage2_codes_dir
  # A huge learning rate blows the parameters up after the first update: the loss of step 2 is not finite.
  with pytest.raises(FloatingPointError, match=r"non-finite loss or gradient at step \d"):
    train.train_and_evaluate(_config(codes_dir, optim__learning_rate=1e30, optim__warmup_steps=0,
                                     train__num_steps=4, train__nonfinite="stop"), str(tmp_path / "stop"))
  # 'stop' never checkpoints a non-finite state: whatever is on disk is finite.
  ckpt_dir = tmp_path / "stop" / "checkpoints"
  with checkpoint.Checkpointer(ckpt_dir, max_to_keep=3, save_interval_steps=2) as c:
    assert c.latest_step() in (None, 2)

  config_skip = _config(codes_dir, optim__learning_rate=1e30, optim__warmup_steps=0, train__num_steps=4,
                        train__nonfinite="skip")
  result = train.train_and_evaluate(config_skip, str(tmp_path / "skip"))
  assert result["step"] == 4 and result["skipped_steps"] >= 1
  assert all(np.all(np.isfinite(x)) for x in helpers.leaves(result["state"].params))
  # Skipped steps leave the optimizer state alone: its schedule has counted the applied updates only.
  applied = int(optim.applied_updates(result["state"].opt_state))
  assert applied == 4 - result["skipped_steps"]
  # The logged rate is the one the last step's update used (or would have used, had it been finite).
  schedule = optim.learning_rate_schedule(config_skip.optim, 4)
  used = applied - int(result["train"]["train/finite"])
  np.testing.assert_allclose(result["train"]["train/learning_rate"], float(schedule(used)), rtol=1e-6)


def test_grad_accumulation_matches_full_batch(stage2_codes_dir):
  codes_dir = stage2_codes_dir
  # Independent masks (the tiny config's mask_group 1): with groups, the rows of a group depend on how the batch is
  # split, so the two runs would draw different masks (test_mask_groups_... checks the split layout).
  config = _config(codes_dir)
  config_accum = _config(codes_dir, train__grad_accum_steps=2)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config)
  # The functions train_and_evaluate jits, jitted as it jits them, under its logical axis rules: where this process
  # has trained the config already (the one-step run of the steps-per-call test, the object-store test), nothing is
  # traced or compiled again.
  programs = train._programs(config)  # pylint: disable=protected-access
  state, shardings = train._create_state(  # pylint: disable=protected-access
      programs.init, programs.init_unboxed, mesh, rules)
  host_state = jax.device_get(state)  # each step below gets its own copy (the state is donated)
  batch = next(iter(codes_lib.make_code_iterator(codes_dir, split="train", batch_size=4, seed=0, train=False)))
  batch = sharding.host_local_batch_to_global(batch, mesh)
  rep = sharding.replicated(mesh)
  codebook = jax.device_put(codes_lib.load_codebook(codes_dir).astype(np.float32), rep)

  def step(c):
    fn = jax.jit(train._programs(c).train_step, donate_argnums=(0,),  # pylint: disable=protected-access
                 in_shardings=(shardings, sharding.batch_sharding(mesh), rep), out_shardings=(shardings, rep))
    with nn.logical_axis_rules(rules):
      return fn(jax.device_put(host_state, shardings), batch, codebook)

  s1, m1 = step(config)
  s2, m2 = step(config_accum)
  np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
  # The accumulated gradient itself: the update of step 1 is scaled by the warmup's learning rate of 0, so the
  # parameters compared below would agree whatever the gradients were.
  np.testing.assert_allclose(float(m1["grad_norm"]), float(m2["grad_norm"]), rtol=1e-5)
  assert float(m1["grad_norm"]) > 0
  for a, b in zip(helpers.leaves(s1.params), helpers.leaves(s2.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_the_step_drops_the_condition_at_its_rate():
  """Condition dropout inside the train step (classifier-free guidance): at rate 1 the step is the rate-0 step on the
  null condition (the same masks: they are drawn from their own key), at rate 0 it reads the labels."""
  def config(rate):
    c = helpers.tiny_stage2_config("unused", **ONE_LAYER, train__cond_drop_rate=rate)
    c.lock()
    return c

  model, tx = train.build_model(config(0.0)), train.make_optimizer(config(0.0))
  mesh = sharding.make_mesh(config(0.0).mesh, jax.devices()[:1])
  state, _ = train.create_train_state(model, tx, config(0.0), mesh, sharding.logical_rules(config(0.0)))
  h, w, d = config(0.0).data.code_shape
  rng = np.random.default_rng(0)
  codes = rng.integers(0, config(0.0).data.vocab_size, (8, h, w, d)).astype(np.int32)
  labels = rng.integers(0, 10, (8,)).astype(np.int32)
  codebook = jnp.asarray(rng.normal(size=(config(0.0).data.vocab_size, config(0.0).data.embed_dim)), jnp.float32)

  steps = {rate: jax.jit(train.make_train_step(model, tx, config(rate))) for rate in (0.0, 1.0)}  # traced once each

  def metrics(rate, label):
    _, m = steps[rate](state, {"codes": codes, "label": label}, codebook)
    return float(m["loss"]), float(m["grad_norm"])

  null = np.full_like(labels, model.null_cond_id)
  assert model.null_cond_id == 10
  dropped = metrics(1.0, labels)
  assert dropped == metrics(0.0, null)
  assert dropped != metrics(0.0, labels)
  assert metrics(0.0, labels) != metrics(0.0, (labels + 1) % 10)  # the labels reach the loss


def test_mask_groups_change_the_cost_not_the_loss():
  """The packed path (depth transformer, head and loss on each group's masked-first slots) gives the loss and
  gradients of the plain one on the same masks; the step's layout keeps each micro-batch's groups within capacity."""
  config = helpers.tiny_stage2_config("unused", **ONE_LAYER)
  model = train.build_model(config)
  h, w, d = config.data.code_shape
  n, b, group = h * w, 8, 4
  key = jax.random.key(3)
  codes = jax.random.randint(key, (b, n, d), 0, config.data.vocab_size)
  cond = jax.random.randint(jax.random.fold_in(key, 1), (b, 1), 0, 10)
  codebook = jax.random.normal(jax.random.fold_in(key, 2), (config.data.vocab_size, config.data.embed_dim))
  params = jax.jit(model.init)(jax.random.fold_in(key, 3), codes, jnp.zeros((b, n), bool), cond, codebook)["params"]
  mask = jax.jit(lambda k: masking.sample_mask(k, b, n, group=group))(jax.random.fold_in(key, 4))
  capacity = masking.group_capacity(group, n)
  assert capacity < group * n

  def loss(p, g):  # label smoothing 0.1: the smoothed term reads every logit of a slot
    return train._weighted_loss(  # pylint: disable=protected-access
        model, p, codes, mask, cond, codebook, 0.1, None, False, g)
  grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (plain, m_plain), g_plain = grad(params, 1)
  (packed, m_packed), g_packed = grad(params, group)
  np.testing.assert_allclose(float(packed), float(plain), rtol=1e-6)
  assert float(m_packed["num_masked_codes"]) == float(m_plain["num_masked_codes"]) == float(mask.sum()) * d
  for k in ("nll", "accuracy", "nll_depth1"):
    np.testing.assert_allclose(float(m_packed[k]), float(m_plain[k]), rtol=1e-6)
  for a, c in zip(helpers.leaves(g_packed), helpers.leaves(g_plain)):  # float32 sums in another order
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6 * np.abs(c).max())

  for accum in (1, 2):
    step_mask = np.asarray(train.draw_mask(key, b, n, group, accum))
    drawn = np.asarray(masking.sample_mask(key, b, n, group=group))
    for a in range(accum):
      micro = step_mask[a::accum]  # the step's micro-batch a
      np.testing.assert_array_equal(micro, drawn[a * (b // accum):(a + 1) * (b // accum)])
      assert micro.reshape(-1, group * n).sum(-1).max() <= capacity


@pytest.mark.slow  # ~10 CPU-s: three 6-step runs (one of them stopped and resumed)
def test_steps_per_call_trains_the_same_steps_and_resumes_bit_exact(stage2_codes_dir, tmp_path):
  """Three steps per call (one compiled lax.scan over stacked batches) run the one-step runs' steps: the same
  batches, masks and updates (float32 round-off apart: another program), and a run stopped inside a call stops at
  its end and resumes bit for bit."""
  cadence = dict(train__num_steps=6, train__log_every=3, train__ckpt_every=3)
  single = train.train_and_evaluate(_config(stage2_codes_dir, **cadence), str(tmp_path / "single"))
  config = _config(stage2_codes_dir, train__steps_per_call=3, **cadence)
  full = train.train_and_evaluate(config, str(tmp_path / "full"))
  assert full["step"] == 6 and [s for s, _ in full["history"]] == [3, 6]
  np.testing.assert_allclose([l for _, l in full["history"]], [l for _, l in single["history"]], rtol=1e-5)
  for a, b in zip(helpers.leaves(full["state"].params), helpers.leaves(single["state"].params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  part = train.train_and_evaluate(config, str(tmp_path / "resumed"), stop_after_steps=2)
  assert part["stopped"] and part["step"] == 3
  rest = train.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert rest["step"] == 6
  helpers.assert_trees_equal(rest["state"], full["state"])
  assert rest["history"] == full["history"][1:]
  with pytest.raises(ConfigError, match="train.steps_per_call must be >= 1, got 0"):
    train.train_and_evaluate(_config(stage2_codes_dir, train__steps_per_call=0), str(tmp_path / "bad"))


def _write_caption_codes(out_dir, *, cond_length=8, vocab=64, variants=3):
  """A caption code dataset for configs/cc3m.py:tiny: 4x4x4 codes, K 64, n_z 16, captions of 8 tokens ([PAD] = 0);
  each training record holds `variants` tokenizations (as BPE dropout draws them), the validation records one."""
  rng = np.random.default_rng(1)
  lengths = {"train": rng.integers(1, cond_length + 1, 8), "validation": rng.integers(1, cond_length + 1, 4)}
  with codes_lib.CodeDatasetWriter(out_dir, code_shape=(4, 4, 4), codebook=rng.normal(size=(64, 16)).astype(np.float32),
                                   num_classes=0, cond_length=cond_length, cond_vocab_size=vocab,
                                   source="synthetic captions") as w:
    for split, n in lengths.items():
      valid = np.arange(cond_length) < n[:, None]  # [M, L]
      if split == "train":
        tokens = rng.integers(2, vocab, (len(n), variants, cond_length)) * valid[:, None]
      else:
        tokens = rng.integers(2, vocab, (len(n), cond_length)) * valid
      w.write(split, rng.integers(0, 64, (len(n), 4, 4, 4)), tokens)
  return str(out_dir)


def test_config_json_paths_are_absolute(tmp_path, monkeypatch):
  """config.json names the codes, the RQ-VAE artifact and the BPE files by absolute paths, so the run samples from
  any working directory (the sampler reads them as recorded). Stops right after config.json is written."""
  from ctxrq_jax.core import config as configlib  # pylint: disable=g-import-not-at-top
  _write_caption_codes(tmp_path / "codes")
  (tmp_path / "rqvae").mkdir()
  monkeypatch.chdir(tmp_path)
  config = configlib.load_config_file("cc3m", "tiny")
  with config.unlocked():
    config.model.spatial_layers = config.model.depth_layers = 1  # as ONE_LAYER
    config.data.update(codes_dir="codes", stage1_dir="rqvae", tokenizer_dir="bpe16k")

  class Written(Exception):
    pass

  real = configlib.save_snapshot

  def save_then_stop(*args, **kwargs):
    real(*args, **kwargs)
    raise Written

  monkeypatch.setattr(configlib, "save_snapshot", save_then_stop)
  with pytest.raises(Written):
    train.train_and_evaluate(config, "run")
  saved = configlib.load_snapshot(str(tmp_path / "run")).data
  assert (saved.codes_dir, saved.stage1_dir, saved.tokenizer_dir) == tuple(
      os.path.join(os.getcwd(), name) for name in ("codes", "rqvae", "bpe16k"))


@pytest.mark.slow  # ~8 CPU-s (a 4-step run with eval and a checkpoint, and its resumed twin)
def test_trains_on_caption_codes(tmp_path):
  from ctxrq_jax.core import config as configlib  # pylint: disable=g-import-not-at-top
  codes_dir = _write_caption_codes(tmp_path / "codes")
  config = configlib.load_config_file("cc3m", "tiny")
  with config.unlocked():
    config.model.spatial_layers = config.model.depth_layers = 1  # as ONE_LAYER
    config.data.codes_dir = codes_dir
    config.train.num_steps = 4
    config.train.eval_every = 4
    config.train.ckpt_every = 4
    config.optim.learning_rate = 1e-2
  # A caption dataset is refused by a class config and vice versa, before anything compiles.
  with pytest.raises(ConfigError, match="conditioned on captions, but the config .* on class labels"):
    train.train_and_evaluate(_config(codes_dir), str(tmp_path / "wrong"))
  with pytest.raises(ConfigError, match="captions of 8 tokens, but config.model.cond_length is 6"):
    bad = config.copy_and_resolve_references()
    with bad.unlocked():
      bad.model.cond_length = 6
    train.train_and_evaluate(bad, str(tmp_path / "wrong"))
  # Each training caption's tokenization is drawn per example and epoch from its 3 stored ones (BPE dropout).
  assert config.data.random_caption and codes_lib.read_metadata(codes_dir).num_cond_variants("train") == 3
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert result["step"] == 4 and np.isfinite(result["eval"]["eval/loss"])
  losses = [l for _, l in result["history"]]
  assert losses[-1] < losses[0]
  assert result["state"].params["cond_pos"].shape == (8, 32)
  # Stopped in the second epoch (2 steps each) and resumed: the same draws, bit for bit.
  part = train.train_and_evaluate(config, str(tmp_path / "resumed"), stop_after_steps=3)
  assert part["stopped"] and part["step"] == 3
  rest = train.train_and_evaluate(config, str(tmp_path / "resumed"))
  helpers.assert_trees_equal(rest["state"].params, result["state"].params)
  assert [l for _, l in rest["history"]] == losses[3:]
