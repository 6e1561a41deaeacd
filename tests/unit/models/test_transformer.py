"""Tests of the Contextual RQ-Transformer: eq. 6-9 dependency structure, dtypes, configs and parameter counts."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ctxrq_jax.core import config as configlib
from ctxrq_jax.models import common
from ctxrq_jax.models import transformer as tr
from ctxrq_jax.stage2 import masking
from tests import helpers

_ROOT = helpers.REPO
K, D, N, NZ, W, CLASSES = 16, 3, 6, 8, 32, 5


def load_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(_ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def tiny_model(**overrides) -> tr.ContextualRQTransformer:
  fields = dict(vocab_size=K, code_depth=D, num_positions=N, embed_dim=NZ, width=W, num_heads=4, spatial_layers=2,
                depth_layers=2, num_classes=CLASSES)
  fields.update(overrides)
  return tr.ContextualRQTransformer(**fields)


def random_inputs(model: tr.ContextualRQTransformer, batch: int = 2, seed: int = 0):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  codes = jax.random.randint(k1, (batch, model.num_positions, model.code_depth), 0, model.vocab_size)
  mask = jax.random.bernoulli(k2, 0.5, (batch, model.num_positions))
  cond = jax.random.randint(k3, (batch, model.cond_length), 0, model.num_classes)
  codebook = jax.random.normal(k4, (model.vocab_size, model.embed_dim))
  return codes, mask, cond, codebook


class Jitted:
  """A tiny model, its params and jitted forward / spatial / depth functions, compiled once per module."""

  def __init__(self, model: tr.ContextualRQTransformer):
    self.model = model
    self.params = jax.jit(model.init)(jax.random.key(0), *random_inputs(model))
    self.forward = jax.jit(model.apply)
    self.spatial = jax.jit(functools.partial(model.apply, method=model.spatial))
    self.depth = jax.jit(functools.partial(model.apply, method=model.depth))


@pytest.fixture(scope="module")
def tiny() -> Jitted:
  return Jitted(tiny_model())


def test_output_shape_dtype_and_param_names(tiny):
  logits = tiny.forward(tiny.params, *random_inputs(tiny.model))
  assert logits.shape == (2, N, D, K) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  # Every parameter carries logical axis names, one per dimension, so a trainer can shard all of them.
  leaves = jax.tree_util.tree_leaves(tiny.params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  assert all(len(x.names) == x.value.ndim for x in leaves)
  assert common.count_params(tiny.params) == sum(x.value.size for x in leaves)
  # The codebook is an input, not a parameter.
  assert not any(x.value.shape == (K, NZ) for x in leaves)


def test_sharding_rules_resolve_for_every_param(tiny):
  rules = [tuple(r) for r in load_config("imagenet", "tiny").sharding_rules]
  specs = nn.get_partition_spec(tiny.params)
  mesh_specs = jax.tree_util.tree_map(lambda s: nn.logical_to_mesh_axes(s, rules), specs,
                                      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert tuple(mesh_specs["params"]["spatial_0"]["fc_in"]["kernel"]) == ("fsdp", "tensor")
  assert tuple(mesh_specs["params"]["spatial_0"]["attn"]["qkv_kernel"]) == ("fsdp", None, "tensor", None)
  assert tuple(mesh_specs["params"]["head"]["kernel"]) == ("fsdp", "tensor")


def test_traces_under_a_mesh_with_logical_rules():
  """Parameter and activation annotations resolve on a (1-device) data/fsdp/tensor mesh; nothing is compiled."""
  model = tiny_model()
  inputs = random_inputs(model)
  rules = [tuple(r) for r in load_config("imagenet", "tiny").sharding_rules]
  mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = jax.eval_shape(model.init, jax.random.key(0), *inputs)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
    lowered = jax.jit(model.apply).lower(abstract, *inputs).as_text()
  assert shardings["params"]["head"]["kernel"].spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert "sharding" in lowered


def test_masked_logits_read_later_positions(tiny):
  """Bidirectional spatial attention: position 0's logits depend on the code at the last (unmasked) position."""
  codes, _, cond, codebook = random_inputs(tiny.model)
  mask = jnp.zeros((2, N), bool).at[:, 0].set(True)
  base = tiny.forward(tiny.params, codes, mask, cond, codebook)
  changed = tiny.forward(tiny.params, codes.at[:, -1, :].set((codes[:, -1, :] + 1) % K), mask, cond, codebook)
  assert np.max(np.abs(base[:, 0] - changed[:, 0])) > 1e-4


def test_masked_positions_ignore_their_codes(tiny):
  codes, mask, cond, codebook = random_inputs(tiny.model)
  h = tiny.spatial(tiny.params, codes, mask, cond, codebook)
  # Masked positions may even hold out-of-range placeholders (e.g. -1 from a sampler).
  other = jnp.where(mask[..., None], -1, codes)
  h2 = tiny.spatial(tiny.params, other, mask, cond, codebook)
  np.testing.assert_array_equal(h, h2)
  assert h.shape == (2, N, W)


def test_condition_changes_the_context(tiny):
  codes, mask, cond, codebook = random_inputs(tiny.model)
  h = tiny.spatial(tiny.params, codes, mask, cond, codebook)
  h_null = tiny.spatial(tiny.params, codes, mask, jnp.full_like(cond, tiny.model.null_cond_id), codebook)
  assert np.max(np.abs(h - h_null)) > 1e-4


def test_depth_is_causal(tiny):
  """Logits at depth d (0-based) depend on codes at depths < d only, and do depend on them."""
  codes, mask, cond, codebook = random_inputs(tiny.model)
  h = tiny.spatial(tiny.params, codes, mask, cond, codebook)
  base = tiny.depth(tiny.params, h, codes, codebook)
  for d in range(D):
    perturbed = codes.at[..., d:].set((codes[..., d:] + 3) % K)
    out = tiny.depth(tiny.params, h, perturbed, codebook)
    np.testing.assert_allclose(out[..., :d + 1, :], base[..., :d + 1, :], atol=1e-6)
    if d + 1 < D:
      assert np.max(np.abs(out[..., d + 1, :] - base[..., d + 1, :])) > 1e-4
    # Not-yet-sampled depths may hold placeholders (as a sampler fills a stack depth by depth).
    placeholder = tiny.depth(tiny.params, h, codes.at[..., d:].set(-1), codebook)
    np.testing.assert_allclose(placeholder[..., :d + 1, :], base[..., :d + 1, :], atol=1e-6)


def test_depth_at_one_index_equals_the_full_pass(tiny):
  """Sampling runs only the causal prefix and one head row per depth: the same logits as the full pass."""
  codes, mask, cond, codebook = random_inputs(tiny.model)
  h = tiny.spatial(tiny.params, codes, mask, cond, codebook)
  full = tiny.depth(tiny.params, h, codes, codebook)
  for d in range(D):
    one = jax.jit(functools.partial(tiny.model.apply, at=d, method=tiny.model.depth))(tiny.params, h, codes, codebook)
    assert one.shape == full.shape[:2] + full.shape[3:]
    np.testing.assert_allclose(one, full[:, :, d], atol=1e-5)
  with pytest.raises(ValueError, match=r"depth index `at` must be an int in \[0, %d\)" % D):
    tiny.model.apply(tiny.params, h, codes, codebook, at=D, method=tiny.model.depth)


def test_depth_is_position_wise(tiny):
  """Each position's depth logits read only its own context vector h_n."""
  codes, _, _, codebook = random_inputs(tiny.model)
  h = jax.random.normal(jax.random.key(5), (2, N, W))
  base = tiny.depth(tiny.params, h, codes, codebook)
  # (A constant shift would be invisible: every LayerNorm removes it. Perturb with noise.)
  noise = jax.random.normal(jax.random.key(6), (2, N - 1, W))
  out = tiny.depth(tiny.params, h.at[:, 1:].add(noise), codes, codebook)
  np.testing.assert_allclose(out[:, 0], base[:, 0], atol=1e-6)
  assert np.max(np.abs(out[:, 1:] - base[:, 1:])) > 1e-4
  # The depth stack also runs on any number M of positions (e.g. only the masked ones).
  sub = tiny.depth(tiny.params, h[:, :2], codes[:, :2], codebook)
  np.testing.assert_allclose(sub, base[:, :2], atol=1e-5)


def test_depth_one_is_a_bidirectional_transformer():
  """D = 1: the depth stack is a per-position MLP with LayerNorm and never reads the codes."""
  one = Jitted(tiny_model(code_depth=1))
  codes, _, cond, codebook = random_inputs(one.model)
  h = jax.random.normal(jax.random.key(2), (2, N, W))
  base = one.depth(one.params, h, codes, codebook)
  # Other positions' context vectors do not matter.
  out = one.depth(one.params, h.at[:, 1:].multiply(-2.0), codes, codebook)
  np.testing.assert_allclose(out[:, 0], base[:, 0], atol=1e-6)
  assert np.max(np.abs(out[:, 1:] - base[:, 1:])) > 1e-4
  # Codes do not matter either (no shallower depth to teacher-force).
  np.testing.assert_array_equal(one.depth(one.params, h, (codes + 1) % K, codebook), base)
  # Whole model: masked positions read the unmasked one (bidirectional), logits [B, N, 1, K].
  mask = jnp.ones((2, N), bool).at[:, -1].set(False)
  full = one.forward(one.params, codes, mask, cond, codebook)
  full2 = one.forward(one.params, codes.at[:, -1].set((codes[:, -1] + 1) % K), mask, cond, codebook)
  assert full.shape == (2, N, 1, K)
  assert np.max(np.abs(full[:, 0] - full2[:, 0])) > 1e-4


def test_loss_ignores_unmasked_targets_and_gradients(tiny):
  model, params = tiny.model, tiny.params
  codes, mask, cond, codebook = random_inputs(model)

  def loss_fn(p, targets, cb, remat=False):
    m = dataclasses.replace(model, remat=remat)
    return masking.masked_nll(m.apply(p, codes, mask, cond, cb), targets, mask)[0]

  loss_and_grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 2)), static_argnames="remat")
  loss, (grads, codebook_grad) = loss_and_grads(params, codes, codebook)
  other_targets = jnp.where(mask[..., None], codes, (codes + 7) % K)
  np.testing.assert_array_equal(loss, loss_and_grads(params, other_targets, codebook)[0])
  norms = [float(jnp.linalg.norm(g)) for g in jax.tree_util.tree_leaves(nn.meta.unbox(grads))]
  assert np.all(np.isfinite(norms)) and sum(norms) > 0
  # The codebook is a frozen input: no gradient reaches it.
  assert np.all(codebook_grad == 0)
  # Rematerialisation changes memory, not values.
  remat_loss, (remat_grads, _) = loss_and_grads(params, codes, codebook, remat=True)
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, remat_grads)


def test_bf16_compute_keeps_fp32_params(tiny):
  model = dataclasses.replace(tiny.model, dtype=jnp.bfloat16)
  inputs = random_inputs(model)
  abstract = jax.eval_shape(model.init, jax.random.key(0), *inputs)
  assert {x.dtype for x in jax.tree_util.tree_leaves(nn.meta.unbox(abstract))} == {jnp.dtype(jnp.float32)}
  logits = jax.jit(model.apply)(tiny.params, *inputs)
  assert logits.dtype == jnp.float32
  ref = tiny.forward(tiny.params, *inputs)
  assert np.max(np.abs(logits - ref)) < 0.1 * np.max(np.abs(ref)) + 0.05


def test_dropout_only_in_training(tiny):
  inputs = random_inputs(tiny.model)
  dropped = dataclasses.replace(tiny.model, dropout=0.5)
  eval_out = tiny.forward(tiny.params, *inputs)
  train_apply = jax.jit(functools.partial(dropped.apply, train=True))
  out1 = train_apply(tiny.params, *inputs, rngs={"dropout": jax.random.key(3)})
  out2 = train_apply(tiny.params, *inputs, rngs={"dropout": jax.random.key(4)})
  assert np.max(np.abs(out1 - eval_out)) > 1e-3 and np.max(np.abs(out1 - out2)) > 1e-3
  with pytest.raises(Exception, match="dropout"):  # training without a dropout rng is an error, not a silent no-op
    train_apply(tiny.params, *inputs)


def test_static_shape_errors(tiny):
  model, params = tiny.model, tiny.params
  codes, mask, cond, codebook = random_inputs(model)
  with pytest.raises(AssertionError):
    model.apply(params, codes[..., :2], mask, cond, codebook)
  with pytest.raises(ValueError, match="codebook"):
    model.apply(params, codes, mask, cond, codebook[:, :4])
  with pytest.raises(ValueError, match="divisible"):
    tiny_model(num_heads=5).init(jax.random.key(0), codes, mask, cond, codebook)


def test_check_inputs():
  model = tiny_model()
  codes, mask, cond, codebook = (np.asarray(x) for x in random_inputs(model))
  tr.check_inputs(model, codes=codes, mask=mask, cond=cond, codebook=codebook)
  tr.check_inputs(model, cond=np.full((2, 1), model.null_cond_id))  # the null id is a valid condition
  with pytest.raises(ValueError, match=r"condition ids must lie in \[0, 6\).*\[7\]"):
    tr.check_inputs(model, cond=np.array([[1], [7]]))
  with pytest.raises(ValueError, match="condition ids"):
    tr.check_inputs(model, cond=np.array([[-1], [0]]))
  with pytest.raises(ValueError, match=r"codes must lie in \[0, 16\)"):
    tr.check_inputs(model, codes=codes.copy().clip(max=K - 1) + (np.arange(D) == 0) * K)
  with pytest.raises(ValueError, match="codes must be"):
    tr.check_inputs(model, codes=codes[:, :, :2])
  with pytest.raises(ValueError, match="mask must be boolean"):
    tr.check_inputs(model, mask=mask.astype(np.int32))
  with pytest.raises(ValueError, match="cond must be"):
    tr.check_inputs(model, cond=np.zeros((2, 3), np.int32))
  with pytest.raises(ValueError, match="inconsistent batch"):
    tr.check_inputs(model, codes=codes, cond=cond[:1])
  with pytest.raises(ValueError, match="codebook"):
    tr.check_inputs(model, codebook=codebook.T)


def test_text_like_condition_sequence():
  model = tiny_model(cond_length=3, cond_vocab_size=50)
  codes, mask, _, codebook = random_inputs(model)
  cond = jnp.array([[1, 2, 49], [5, 5, 5]], jnp.int32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), codes, mask, cond, codebook)
  assert abstract["params"]["cond_embed"]["embedding"].value.shape == (50, W)
  assert abstract["params"]["cond_pos"].value.shape == (3, W)
  logits = jax.eval_shape(model.apply, abstract, codes, mask, cond, codebook)
  assert logits.shape == (2, N, D, K)
  with pytest.raises(ValueError, match=r"\[0, 50\)"):
    tr.check_inputs(model, cond=np.array([[1, 2, 50], [0, 0, 0]]))


@pytest.mark.parametrize("size,target,tol", [("333m", 333e6, 0.02), ("821m", 821e6, 0.01), ("1.4b", 1.4e9, 0.01)])
def test_param_counts(size, target, tol):
  cfg = load_config("imagenet", size)
  h, w, d = cfg.data.code_shape
  model = tr.model_from_config(cfg.model, vocab_size=cfg.data.vocab_size, code_depth=d, num_positions=h * w,
                               embed_dim=cfg.data.embed_dim)
  count = common.count_params(tr.abstract_variables(model)["params"])  # eval_shape: nothing is allocated
  print(f"{size}: {count:,} parameters ({count / target - 1:+.2%} vs paper {target:,.0f})")
  assert abs(count / target - 1) < tol
  assert model.dtype == jnp.bfloat16 and model.param_dtype == jnp.float32


@pytest.mark.parametrize("name,arg", [("imagenet", "tiny"), ("imagenet", None), ("demo", None)])
def test_configs_build_models(name, arg):
  cfg = load_config(name, arg)
  assert cfg.is_locked
  configlib.check_keys(cfg, load_config("imagenet", "tiny"))  # every config has the same keys
  h, w, d = cfg.data.code_shape
  model = tr.model_from_config(cfg.model, vocab_size=cfg.data.vocab_size, code_depth=d, num_positions=h * w,
                               embed_dim=cfg.data.embed_dim)
  assert model.cond_vocab == cfg.model.num_classes + 1
  assert cfg.train.nonfinite in ("stop", "skip")
  if name == "demo":  # must match the MNIST RQ-VAE the codes come from
    stage1 = load_config("rqvae_mnist")
    assert cfg.data.embed_dim == stage1.model.embed_dim
    assert cfg.data.vocab_size == stage1.model.codebook_size and d == stage1.model.code_depth


def test_rounded_matmuls_keep_the_parameters_and_stay_close_to_float32(tiny):
  # The same variables (matmul_dtype adds no parameter) through the model with bfloat16 matmul operands: logits close
  # to float32's, and not equal (the rounding is applied); gradients flow to every parameter.
  rounded = tiny.model.clone(matmul_dtype=jnp.bfloat16)
  inputs = random_inputs(tiny.model)
  ref = tiny.forward(tiny.params, *inputs)
  out = jax.jit(rounded.apply)(tiny.params, *inputs)
  assert out.dtype == jnp.float32 and not np.array_equal(out, ref)
  np.testing.assert_allclose(out, ref, atol=0.05 * float(np.abs(ref).max()))
  grads = jax.jit(jax.grad(lambda p: rounded.apply(p, *inputs).sum()))(tiny.params)  # one program, not op by op
  assert all(bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads))
  # A run's config.json saved before the key existed reads as 'compute'.
  model_cfg = load_config("imagenet", "tiny").model.to_dict()
  del model_cfg["matmul_dtype"]
  assert tr.model_from_config(model_cfg, vocab_size=K, code_depth=D, num_positions=N,
                              embed_dim=NZ).matmul_dtype is None


def test_unknown_config_keys_raise():
  cfg = load_config("imagenet", "tiny")
  with pytest.raises(AttributeError):
    cfg.model.widht = 64  # locked: a typo cannot silently add a key
  model_cfg = cfg.model.to_dict()
  model_cfg["widht"] = 64
  with pytest.raises(configlib.ConfigError, match="unknown config.model keys: widht"):
    tr.model_from_config(model_cfg, vocab_size=K, code_depth=D, num_positions=N, embed_dim=NZ)
  del model_cfg["widht"], model_cfg["width"]
  with pytest.raises(configlib.ConfigError, match="missing config.model keys: width"):
    tr.model_from_config(model_cfg, vocab_size=K, code_depth=D, num_positions=N, embed_dim=NZ)
  bad = cfg.model.to_dict() | {"dtype": "bf16"}
  with pytest.raises(configlib.ConfigError, match=r"model.dtype must be one of \['bfloat16', 'float16', 'float32'\], "
                                                   r"got 'bf16'"):
    tr.model_from_config(bad, vocab_size=K, code_depth=D, num_positions=N, embed_dim=NZ)
  bad = cfg.model.to_dict() | {"num_heads": 5}
  with pytest.raises(configlib.ConfigError, match="divisible"):
    tr.model_from_config(bad, vocab_size=K, code_depth=D, num_positions=N, embed_dim=NZ)
  with pytest.raises(configlib.ConfigError, match="unknown model size"):
    load_config("imagenet", "2b")


@pytest.mark.parametrize("name,arg", [("imagenet", "tiny"), ("demo", None)])
def test_from_run_config_reads_the_data_section(name, arg):
  cfg = load_config(name, arg)
  model = tr.from_run_config(cfg)
  h, w, d = cfg.data.code_shape
  assert model == tr.model_from_config(cfg.model, vocab_size=cfg.data.vocab_size, code_depth=d, num_positions=h * w,
                                       embed_dim=cfg.data.embed_dim)
  assert (model.num_positions, model.code_depth, model.vocab_size) == (h * w, d, cfg.data.vocab_size)


# ------------------------------------------------------------------------------------------------ captions (L > 1)
def official_rqtransformer_params(embed_dim, n_head, body_layers, head_layers, vocab_size, vocab_size_cond,
                                  block_size_cond, block_size, input_embed_dim):
  """Parameter count of the official RQ-Transformer layout (kakaobrain/rq-vae-transformer, `input_emb_vqvae`,
  `head_emb_vqvae`, shared token / classifier embeddings) from its yaml dimensions, written out term by term."""
  del n_head  # heads split the width; they add no parameters
  w = embed_dim
  block = 2 * 2 * w + 4 * (w * w + w) + (w * 4 * w + 4 * w) + (4 * w * w + w)  # 2 LNs, q/k/v/proj, MLP 4x
  h, wd, d = block_size
  embeddings = vocab_size_cond * w + 2 * (input_embed_dim * w + w)  # cond_emb, input_mlp, head_mlp
  positions = (block_size_cond + h * wd + d) * w
  classifier = 2 * w + w * vocab_size + vocab_size  # LayerNorm + linear with bias
  cond_classifier = 2 * w + w * vocab_size_cond + vocab_size_cond if block_size_cond > 1 else 0
  return embeddings + positions + (body_layers + head_layers) * block + classifier + cond_classifier


def _cc3m_model(size):
  return tr.from_run_config(load_config("cc3m", size))


@pytest.mark.parametrize("size", ["333m", "654m"])
def test_cc3m_param_counts(size):
  from ctxrq_jax.configs import cc3m  # pylint: disable=g-import-not-at-top
  model = _cc3m_model(size)
  assert model.is_text and model.cond_length == 32 and model.cond_vocab == 16384 and model.null_cond_id == 0
  count = common.count_params(tr.abstract_variables(model)["params"])
  target = cc3m.PAPER_PARAMS[size]
  print(f"cc3m {size}: {count:,} parameters ({count / target - 1:+.2%} vs paper {target:,.0f})")
  assert abs(count / target - 1) < 0.02
  if size == "654m":
    official = official_rqtransformer_params(**cc3m.OFFICIAL_650M)
    assert official == 654_061_568  # the paper's 654M: the layout reads right
    print(f"cc3m 654m vs the official 650M layout: {count / official - 1:+.2%}")
    assert abs(count / official - 1) < 0.01


def test_cc3m_config_keys_and_text_fields():
  cfg = load_config("cc3m", "tiny")
  assert cfg.is_locked and cfg.model.num_classes == 0
  reference = load_config("imagenet", "tiny")
  with pytest.raises(configlib.ConfigError, match="unknown config keys: data.random_caption, data.tokenizer_dir$"):
    configlib.check_keys(cfg, reference)  # the class configs' keys plus the caption settings, nothing else
  with pytest.raises(configlib.ConfigError, match="needs cond_vocab_size >= 2"):
    tr.model_from_config(cfg.model.to_dict() | {"cond_vocab_size": None}, vocab_size=K, code_depth=D,
                         num_positions=N, embed_dim=NZ)
  with pytest.raises(configlib.ConfigError, match="unknown model size"):
    load_config("cc3m", "1.4b")


def test_caption_condition_with_32_tokens():
  model = tiny_model(num_classes=0, cond_length=32, cond_vocab_size=40)
  assert model.is_text and model.null_cond_id == 0
  codes, mask, _, codebook = random_inputs(model)
  cond = jax.random.randint(jax.random.key(5), (2, 32), 1, 40).at[:, 0].set(3).at[:, 1].set(9)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), codes, mask, cond, codebook))
  assert params["params"]["cond_pos"].shape == (32, W)
  assert params["params"]["cond_embed"]["embedding"].shape == (40, W)
  spatial = jax.jit(functools.partial(model.apply, method=model.spatial))
  h = spatial(params, codes, mask, cond, codebook)
  assert h.shape == (2, N, W)
  # Every token position matters, and positions are told apart: the last token, and a swap of two tokens.
  last = cond.at[:, 31].set(jnp.where(cond[:, 31] == 7, 8, 7))
  swapped = cond.at[:, 0].set(cond[:, 1]).at[:, 1].set(cond[:, 0])
  assert not np.allclose(spatial(params, codes, mask, last, codebook), h, atol=1e-6)
  assert not np.allclose(spatial(params, codes, mask, swapped, codebook), h, atol=1e-6)
  # The empty caption (all [PAD]) is the null condition of classifier-free guidance and of condition dropout.
  dropped = masking.drop_condition(jax.random.key(1), cond, 1.0, model.null_cond_id)
  np.testing.assert_array_equal(dropped, np.zeros((2, 32), np.int32))
  with pytest.raises(ValueError, match=r"caption token ids must lie in \[0, 40\)"):
    tr.check_inputs(model, cond=np.full((2, 32), 40))
  with pytest.raises(ValueError, match=r"cond must be \[B, L=32\]"):
    tr.check_inputs(model, cond=np.zeros((2, 31), np.int32))


def test_gelu_is_the_exact_erf_gelu():
  """The MLP's activation is torch's `F.gelu` (the reference's): x * Phi(x), written with erf; its values and
  gradient agree with float64 and with jax's erfc form, and it keeps bfloat16 inputs bfloat16."""
  import math  # pylint: disable=g-import-not-at-top
  x = np.linspace(-10.0, 10.0, 20001)
  exact = 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
  got = np.asarray(jax.jit(tr.gelu)(jnp.asarray(x, jnp.float32)), np.float64)
  np.testing.assert_allclose(got, exact, rtol=0, atol=2e-6)
  slope = 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0))) + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
  grad = np.asarray(jax.jit(jax.vmap(jax.grad(tr.gelu)))(jnp.asarray(x, jnp.float32)), np.float64)
  np.testing.assert_allclose(grad, slope, rtol=0, atol=2e-6)
  xs = jnp.asarray(x, jnp.float32)
  np.testing.assert_allclose(tr.gelu(xs), nn.gelu(xs, approximate=False), rtol=0, atol=2e-6)
  assert tr.gelu(jnp.ones(3, jnp.bfloat16)).dtype == jnp.bfloat16
