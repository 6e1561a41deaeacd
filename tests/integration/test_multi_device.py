"""On 8 fake CPU devices (in a subprocess, so XLA_FLAGS takes effect before jax starts): one train step (dropout on)
under fsdp=8 and data=2 x fsdp=2 x tensor=2 (every mesh axis; the batch split over data and fsdp) equals the
single-device step, fsdp=8 leaves at most 2% of the parameters replicated, two steps in one call (batches stacked,
split over the mesh) equal two single-device steps, the sampler with its batch sharded equals the unsharded sampler,
and a sample set drawn with the configs' batch 100 (rounded up to 104 on 8 devices) equals the one of batch 2 on one
device; the stage-1 codebook updated depth by depth on latents split over 8 devices equals the single-device
update."""

import os
import subprocess
import sys
import textwrap

import pytest

from tests import helpers

pytestmark = pytest.mark.slow

_MULTI_DEVICE = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from ctxrq_jax.core import sharding
    from ctxrq_jax.core.config import ConfigError
    from ctxrq_jax.stage2 import trainer as train
    assert jax.device_count() == 8, jax.devices()

    def config(data, fsdp, tensor):
      c = train.reference_config()
      c.unlock()
      c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
      c.model.spatial_layers = c.model.depth_layers = 1  # every kind of parameter, half the programs to compile
      c.train.batch_size = 8
      c.train.mask_group = 4  # the depth pass on masked positions only, groups split across devices
      c.optim.warmup_steps = 0  # the tiny config's 1-step warmup makes the first update lr 0: parameters unchanged
      c.model.dropout = 0.1  # as the paper-size configs train: every device draws the same masks as one device would
      c.lock()
      return c

    base = config(1, 1, 1)
    model, tx = train.build_model(base), train.make_optimizer(base)
    rng = np.random.default_rng(0)
    batch = {"codes": rng.integers(0, 64, (8, 4, 4, 4)).astype(np.int32),
             "label": rng.integers(0, 10, (8,)).astype(np.int32)}
    codebook = jnp.asarray(rng.normal(size=(64, 16)).astype(np.float32))

    mesh1 = sharding.make_mesh(base.mesh, jax.devices()[:1])
    state1, _ = train.create_train_state(model, tx, base, mesh1, sharding.logical_rules(base))
    host_state = jax.device_get(state1)
    ref_step = jax.jit(train.make_train_step(model, tx, base))
    ref_state, ref_metrics = ref_step(state1, batch, codebook)
    ref = jax.device_get(ref_state.params)
    moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(host_state.params))]
    assert min(moved) > 1e-6, min(moved)  # every parameter took the step, so the comparisons below check gradients

    for dims in [(1, 8, 1), (2, 2, 2)]:
      c = config(*dims)
      mesh, rules = sharding.make_mesh(c.mesh), sharding.logical_rules(c)
      _, shardings = train.abstract_train_state(model, tx, c, mesh, rules)
      frac = sharding.fraction_replicated(shardings.params, host_state.params)
      if dims == (1, 8, 1):
        assert frac <= 0.02, f"fsdp=8 leaves {frac:.2%} of parameters replicated"
      state = jax.device_put(host_state, shardings)
      gbatch = sharding.host_local_batch_to_global(batch, mesh)
      rep = sharding.replicated(mesh)
      step = jax.jit(train.make_train_step(model, tx, c), donate_argnums=(0,),
                     in_shardings=(shardings, sharding.batch_sharding(mesh), rep), out_shardings=(shardings, rep))
      import flax.linen as nn
      with nn.logical_axis_rules(rules):
        new, metrics = step(state, gbatch, jax.device_put(codebook, rep))
      if dims == (1, 8, 1):
        kernel = new.params["spatial_0"]["fc_in"]["kernel"]
        assert not kernel.sharding.is_fully_replicated, kernel.sharding
      for name in ("loss", "grad_norm"):
        np.testing.assert_allclose(float(metrics[name]), float(ref_metrics[name]), rtol=1e-5, err_msg=name)
      for a, b in zip(jax.tree.leaves(jax.device_get(new.params)), jax.tree.leaves(ref)):
        # Adam's first step is lr * g / (|g| + eps): a gradient near eps turns round-off into up to ~2e-6, under 1% of
        # a step of lr 5e-4 (the loss and gradient norm above agree to 1e-5 relative).
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=5e-6)
      print("ok", dims, f"replicated={frac:.4f}")

    # Two steps in one call (train.steps_per_call): stacked batches [2, B] split over data x fsdp, the steps axis
    # replicated, equal two single-device steps.
    from ctxrq_jax.core import loop
    c = config(2, 2, 2)
    mesh, rules = sharding.make_mesh(c.mesh), sharding.logical_rules(c)
    _, shardings = train.abstract_train_state(model, tx, c, mesh, rules)
    rep = sharding.replicated(mesh)
    stacked = sharding.host_local_batch_to_global(jax.tree.map(lambda x: np.stack([x, x]), batch), mesh, stacked=True)
    assert stacked["codes"].sharding == sharding.stacked_batch_sharding(mesh)
    steps = jax.jit(loop.scan_steps(train.make_train_step(model, tx, c)), donate_argnums=(0,),
                    in_shardings=(shardings, sharding.stacked_batch_sharding(mesh), rep), out_shardings=(shardings, rep))
    with nn.logical_axis_rules(rules):
      new, metrics = steps(jax.device_put(host_state, shardings), stacked, jax.device_put(codebook, rep))
    ref2, ref2_metrics = ref_step(ref_state, batch, codebook)
    np.testing.assert_allclose(np.asarray(metrics["loss"]), [float(ref_metrics["loss"]), float(ref2_metrics["loss"])],
                               rtol=1e-5)
    for a, b in zip(jax.tree.leaves(jax.device_get(new.params)), jax.tree.leaves(jax.device_get(ref2.params))):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=5e-6)  # two Adam updates: round-off near zero grows
    print("ok two steps per call")

    try:
      sharding.check_batch_size(12, sharding.make_mesh(config(1, 8, 1).mesh))
    except ConfigError as e:
      assert "data x fsdp = 1 x 8 = 8" in str(e), e
    else:
      raise AssertionError("batch 12 on fsdp=8 must fail")

    # The sampler with the batch split over 8 devices equals the single-device sampler.
    from ctxrq_jax.sampling import decoder as decode
    from ctxrq_jax.sampling.logits import PhaseSettings
    mesh8 = sharding.make_mesh(config(8, 1, 1).mesh)
    cond = (np.arange(8, dtype=np.int32) % 10)[:, None]
    kw = dict(t_draft=4, t_revise=2, num_revisions=1, draft=PhaseSettings(),
              revise=PhaseSettings(temperature=0.8, guidance_scale=1.0))
    dev0 = jax.devices()[0]
    single = decode.draft_and_revise(model, jax.device_put(host_state.params, dev0), jax.device_put(codebook, dev0),
                                     jax.device_put(cond, dev0), jax.random.key(0), **kw)
    rep8 = sharding.replicated(mesh8)
    sharded = decode.draft_and_revise(model, jax.device_put(host_state.params, rep8), jax.device_put(codebook, rep8),
                                      jax.device_put(cond, sharding.batch_sharding(mesh8)), jax.random.key(0), **kw)
    assert len(sharded.sharding.device_set) == 8, sharded.sharding
    np.testing.assert_array_equal(np.asarray(single), np.asarray(sharded))
    print("ok sampler sharded")

    # The sample set (runner.sample_codes) with the configs' batch 100, which 8 devices do not divide: each call is
    # rounded up to 104 rows (logged), and the 10 samples equal those of batch 2 on one device.
    import logging, types
    from ctxrq_jax.sampling import runner
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("ctxrq_jax.sampling.runner").addHandler(handler)
    logging.getLogger("ctxrq_jax.sampling.runner").setLevel(logging.INFO)
    stub = lambda mesh, place: types.SimpleNamespace(  # noqa: E731
        model=model, params=jax.device_put(host_state.params, place), codebook=jax.device_put(codebook, place),
        mesh=mesh, code_shape=(4, 4, 4))
    labels = np.arange(10, dtype=np.int32) % 10
    one = runner.sample_codes(stub(mesh1, dev0), labels, jax.random.key(3), batch_size=2, **kw)
    eight = runner.sample_codes(stub(mesh8, rep8), labels, jax.random.key(3), batch_size=100, **kw)
    assert eight.shape == (2, 10, 16, 4), eight.shape
    np.testing.assert_array_equal(one, eight)
    np.testing.assert_array_equal(runner.sample_codes(stub(mesh8, rep8), labels[7:], jax.random.key(3), batch_size=100,
                                                      indices=[7, 8, 9], **kw), one[:, 7:])  # a host's block
    msgs = [r.getMessage() for r in records]
    assert len(msgs) == 1, msgs  # once, though both calls rounded it
    assert "batch_size 100 is not a multiple of the 8 local devices: each call draws 104 rows" in msgs[0], msgs
    print("ok sample set batch 100 on 8 devices")

    # Stage 1's codebook updated depth by depth (`quantizer.codebook_update='per_depth'`, inside the training forward
    # pass) on latents whose batch is split over the 8 devices: the EMA's segment sums over a sharded batch, and zero
    # initial counts so that every code restarts, drawing its vector from the sharded batch. Equals one device.
    from ctxrq_jax.models import rq
    z = jnp.asarray(rng.normal(size=(8, 4, 4, 16)).astype(np.float32))
    q0 = rq.CodebookState.create(codebook, cluster_size=0.0)
    update = jax.jit(rq.rq_quantize_updating, static_argnums=(2, 3, 4))
    one = update(z, q0, 4, 0.99, 1e-5, jax.random.key(4))
    z8 = jax.device_put(z, sharding.batch_sharding(mesh8))  # the sampler check's data=8 mesh
    eight = update(z8, q0, 4, 0.99, 1e-5, jax.random.key(4))
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    print("ok stage 1 per_depth")
    print("ALL OK")
""")


def test_multi_device_step_matches_single_device():
  # The child keeps JAX's default PRNG (threefry), the production one.
  env = dict(os.environ, XLA_FLAGS=helpers.xla_flags("--xla_force_host_platform_device_count=8"), JAX_PLATFORMS="cpu",
             PYTHONPATH=helpers.REPO)
  env.pop("JAX_DEFAULT_PRNG_IMPL", None)
  proc = subprocess.run([sys.executable, "-c", _MULTI_DEVICE], cwd=helpers.REPO, env=env, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0 and "ALL OK" in proc.stdout, (proc.stdout[-3000:], proc.stderr[-5000:])
  assert proc.stdout.count("ok (") == 2 and "ok two steps per call" in proc.stdout
  assert "ok sample set batch 100 on 8 devices" in proc.stdout
  assert "ok stage 1 per_depth" in proc.stdout
