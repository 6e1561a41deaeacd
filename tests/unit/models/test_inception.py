"""The Flax FID Inception against pytorch-fid's own blocks and network, built offline with random weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxrq_jax.models import inception
from ctxrq_jax.models import inception_convert
from tests import pytorch_fid_reference as ref

# One worker runs every test of pytorch-fid's torch Inception (here and in the other module), so each module builds
# it once.
pytestmark = pytest.mark.xdist_group("inception_torch")

torch = pytest.importorskip("torch")


def _close(ours, theirs, rtol=1e-5):
  """Relative agreement: elementwise rtol plus an absolute floor of rtol x the largest reference magnitude."""
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape
  assert np.abs(theirs).max() > 1e-3, "reference output is degenerate; the comparison would prove nothing"
  np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=rtol * np.abs(theirs).max())


def _block_case(torch_block, flax_block, in_channels, hw, seed):
  ref.randomize_(torch_block, seed)
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(2, *hw, in_channels)).astype(np.float32)
  template = jax.eval_shape(lambda: flax_block.init(jax.random.key(0), jnp.zeros((1, *hw, in_channels))))
  variables = inception_convert.convert_state_dict(ref.numpy_state_dict(torch_block), template=template)
  ours = jax.jit(flax_block.apply)(variables, jnp.asarray(x))  # one program, not ~20 dispatched ops
  with torch.no_grad():
    theirs = ref.nhwc(torch_block(ref.nchw(x)))
  return ours, theirs


@pytest.mark.parametrize("hw", [(5, 5), (4, 7)])
def test_fid_inception_a_block(hw):
  pfi = ref.import_pytorch_fid()
  ours, theirs = _block_case(pfi.FIDInceptionA(32, pool_features=8), inception.FIDInceptionA(8), 32, hw, 1)
  assert ours.shape == (2, *hw, 224 + 8)
  _close(ours, theirs)


@pytest.mark.parametrize("hw", [(5, 5), (3, 8)])
def test_fid_inception_c_block(hw):
  pfi = ref.import_pytorch_fid()
  ours, theirs = _block_case(pfi.FIDInceptionC(48, channels_7x7=16), inception.FIDInceptionC(16), 48, hw, 2)
  assert ours.shape == (2, *hw, 768)
  _close(ours, theirs)


@pytest.mark.parametrize("kind", ["E_1", "E_2"])
def test_fid_inception_e_blocks(kind):
  pfi = ref.import_pytorch_fid()
  torch_block = pfi.FIDInceptionE_1(40) if kind == "E_1" else pfi.FIDInceptionE_2(40)
  flax_block = inception.FIDInceptionE("avg" if kind == "E_1" else "max")
  ours, theirs = _block_case(torch_block, flax_block, 40, (3, 4), 3)
  assert ours.shape == (2, 3, 4, 2048)
  _close(ours, theirs)


def test_e_blocks_differ_only_in_pooling():
  """E_1 and E_2 with the same weights disagree (avg vs max pool), so the test above can tell them apart."""
  pfi = ref.import_pytorch_fid()
  a, _ = _block_case(pfi.FIDInceptionE_1(8), inception.FIDInceptionE("avg"), 8, (3, 3), 4)
  b, _ = _block_case(pfi.FIDInceptionE_2(8), inception.FIDInceptionE("max"), 8, (3, 3), 4)
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(a[..., :1856], b[..., :1856])  # only the 192 pool-branch channels differ


def test_average_pool_does_not_count_padding():
  x = jnp.ones((1, 4, 5, 2), jnp.float32)
  out = np.asarray(inception.avg_pool_3x3_exclude_pad(x))
  np.testing.assert_array_equal(out, np.ones_like(out))  # exactly 1 everywhere, corners and edges included
  # The padding-counting pool torchvision's own InceptionA uses would give 4/9 at a corner and 6/9 on an edge.
  counted = torch.nn.functional.avg_pool2d(torch.ones(1, 2, 4, 5), 3, stride=1, padding=1, count_include_pad=True)
  assert counted[0, 0, 0, 0].item() == pytest.approx(4 / 9)
  excluded = torch.nn.functional.avg_pool2d(torch.ones(1, 2, 4, 5), 3, stride=1, padding=1, count_include_pad=False)
  np.testing.assert_array_equal(ref.nhwc(excluded), out)
  # Random input: same values as torch's count_include_pad=False pool.
  r = np.random.default_rng(0).normal(size=(2, 6, 5, 3)).astype(np.float32)
  theirs = torch.nn.functional.avg_pool2d(ref.nchw(r), 3, stride=1, padding=1, count_include_pad=False)
  np.testing.assert_allclose(np.asarray(inception.avg_pool_3x3_exclude_pad(jnp.asarray(r))), ref.nhwc(theirs),
                             rtol=1e-6, atol=1e-6)


def test_max_pool_padding_never_wins():
  x = -np.abs(np.random.default_rng(1).normal(size=(1, 4, 4, 2))).astype(np.float32) - 1.0  # all below -1
  out = np.asarray(inception.max_pool_3x3(jnp.asarray(x), 1))
  theirs = torch.nn.functional.max_pool2d(ref.nchw(x), 3, stride=1, padding=1)
  np.testing.assert_array_equal(out, ref.nhwc(theirs))
  assert out.max() < -1.0


@pytest.fixture(scope="module")
def torch_model():
  return ref.build_fid_inception(seed=0)


@pytest.fixture(scope="module")
def flax_variables(torch_model):
  return inception_convert.convert_state_dict(torch_model.state_dict())


@pytest.mark.slow
@pytest.mark.parametrize("size", [75, 139])
def test_full_network_matches_pytorch_fid(torch_model, flax_variables, size):
  """Every block of the full network: pool features, logits (with and without bias) and the sFID map."""
  x = np.random.default_rng(size).uniform(-1, 1, size=(2, size, size, 3)).astype(np.float32)
  model = inception.FIDInceptionV3()
  out = jax.jit(lambda v, x: model.apply(v, x, spatial=True))(flax_variables, jnp.asarray(x))
  captured = {}
  hook = torch_model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.update(spatial=o))
  with torch.no_grad():
    pool = {}
    hook2 = torch_model.avgpool.register_forward_hook(lambda m, i, o: pool.update(x=o))
    logits = torch_model(ref.nchw(x)).numpy()
  hook.remove()
  hook2.remove()
  theirs_pool = pool["x"].flatten(1).numpy()
  assert out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
  _close(out["pool"], theirs_pool)
  _close(out["logits"], logits)
  w = torch_model.fc.weight.detach().numpy()
  _close(out["logits_unbiased"], theirs_pool @ w.T)
  _close(out["spatial"], ref.nhwc(captured["spatial"]))
  assert out["spatial"].shape[-1] == 192


def test_rejects_bad_inputs():
  model = inception.FIDInceptionV3()
  with pytest.raises(ValueError, match="at least 75x75"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  with pytest.raises(AssertionError):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 75, 75, 1))))
