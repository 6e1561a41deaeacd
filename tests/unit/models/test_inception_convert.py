"""pytorch-fid state dict -> Flax variables -> orbax artifact, and the converter's errors."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxrq_jax.models import inception
from ctxrq_jax.models import inception_convert as conv
from tests import pytorch_fid_reference as ref

# One worker runs every test of pytorch-fid's torch Inception (here and in the other module), so each module builds
# it once.
pytestmark = pytest.mark.xdist_group("inception_torch")


@pytest.fixture(scope="module")
def random_arrays():
  """A state dict of the right keys and shapes drawn from the converter's own key list (no torch needed), drawn once
  for the file (23M numbers); tests take a shallow copy and replace entries, never edit them in place."""
  rng = np.random.default_rng(0)
  return {k: rng.normal(size=s).astype(np.float32) for k, s in conv.reference_state_dict_shapes().items()}


@pytest.fixture(scope="module")
def torch_model():
  """pytorch-fid's network with random weights, built once for the file."""
  pytest.importorskip("torch")
  return ref.build_fid_inception(seed=3)


def test_key_list_is_pytorch_fids(torch_model):
  torch = pytest.importorskip("torch")
  model = torch_model
  theirs = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
  assert conv.reference_state_dict_shapes() == theirs
  assert len(theirs) == 94 * 5 + 2  # 94 conv+BN units (weight, bn weight/bias/mean/var) and fc weight/bias
  assert isinstance(model.fc, torch.nn.Linear) and model.fc.out_features == 1008


@pytest.mark.slow
def test_round_trip_through_the_pth_file_and_the_artifact(tmp_path, torch_model):
  torch = pytest.importorskip("torch")
  model = torch_model
  path = tmp_path / conv.WEIGHTS_FILENAME
  torch.save(model.state_dict(), path)
  with pytest.raises(conv.InceptionConversionError, match="SHA-256"):  # not the released file
    conv.load_torch_state_dict(path)
  direct = conv.convert_state_dict(model.state_dict())
  written = conv.convert_file(path, tmp_path / "art", check_hash=False)
  loaded = conv.load_artifact(tmp_path / "art")
  for a, b, c in zip(jax.tree.leaves(direct), jax.tree.leaves(written), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, np.asarray(c))
  assert jax.tree.structure(direct) == jax.tree.structure(jax.tree.map(np.asarray, loaded))
  # The same outputs as the torch network it came from.
  # (The jitted program of tests/unit/models/test_inception.py at 2 x 75 x 75: one compilation for the suite.)
  x = np.random.default_rng(0).uniform(-1, 1, size=(2, 75, 75, 3)).astype(np.float32)
  flax_model = inception.FIDInceptionV3()
  out = jax.jit(lambda v, x: flax_model.apply(v, x, spatial=True))(loaded, jnp.asarray(x))
  with torch.no_grad():
    logits = model(ref.nchw(x)).numpy()
  np.testing.assert_allclose(np.asarray(out["logits"]), logits, rtol=1e-5, atol=1e-5 * np.abs(logits).max())
  # load_variables takes the artifact directory, the file, or the directory holding the file.
  for source in (tmp_path / "art", path, tmp_path):
    got = conv.load_variables(source, check_hash=False)
    np.testing.assert_array_equal(np.asarray(got["params"]["fc"]["kernel"]), direct["params"]["fc"]["kernel"])
  with pytest.raises(FileExistsError):
    conv.save_artifact(tmp_path / "art", direct)


def test_layouts_and_optional_keys(random_arrays):
  sd = dict(random_arrays)
  v = conv.convert_state_dict(sd)
  w = sd["Mixed_6b.branch7x7_2.conv.weight"]  # [O, I, 1, 7]
  k = v["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"]  # [1, 7, I, O]
  np.testing.assert_array_equal(k, np.transpose(w, (2, 3, 1, 0)))
  np.testing.assert_array_equal(v["params"]["fc"]["kernel"], sd["fc.weight"].T)
  np.testing.assert_array_equal(v["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]["var"],
                                sd["Mixed_7c.branch_pool.bn.running_var"])
  np.testing.assert_array_equal(v["params"]["Conv2d_1a_3x3"]["bn"]["scale"], sd["Conv2d_1a_3x3.bn.weight"])
  # num_batches_tracked and a DataParallel 'module.' prefix are accepted.
  extra = {f"module.{k}": a for k, a in sd.items()}
  extra["module.Conv2d_1a_3x3.bn.num_batches_tracked"] = np.array(0, np.int64)
  v2 = conv.convert_state_dict(extra)
  np.testing.assert_array_equal(v2["params"]["fc"]["bias"], v["params"]["fc"]["bias"])


def test_errors_name_missing_unexpected_and_misshaped_keys(random_arrays):
  sd = dict(random_arrays)
  del sd["Mixed_5b.branch_pool.bn.running_mean"]
  sd["AuxLogits.fc.weight"] = np.zeros((1008, 768), np.float32)
  sd["Mixed_7a.branch3x3_2.conv.weight"] = sd["Mixed_7a.branch3x3_2.conv.weight"].transpose(1, 0, 2, 3)
  with pytest.raises(conv.InceptionConversionError) as e:
    conv.convert_state_dict(sd)
  msg = str(e.value)
  assert "missing keys: Mixed_5b.branch_pool.bn.running_mean" in msg
  assert "unexpected keys: AuxLogits.fc.weight" in msg
  assert "Mixed_7a.branch3x3_2.conv.weight: (192, 320, 3, 3) (expected (320, 192, 3, 3))" in msg
  bad = dict(random_arrays)
  bad["fc.bias"] = bad["fc.bias"].astype(np.int32)
  with pytest.raises(conv.InceptionConversionError, match="non-float keys: fc.bias"):
    conv.convert_state_dict(bad)


def test_missing_weights_file_names_it_and_its_source(tmp_path):
  for call in (lambda p: conv.require_weights_file(p), lambda p: conv.load_variables(p),
               lambda p: conv.convert_file(p, tmp_path / "out")):
    with pytest.raises(FileNotFoundError) as e:
      call(tmp_path / "nowhere" / conv.WEIGHTS_FILENAME)
    assert conv.WEIGHTS_FILENAME in str(e.value)
    assert "github.com/mseitzer/pytorch-fid/releases" in str(e.value)
  with pytest.raises(FileNotFoundError, match=conv.WEIGHTS_FILENAME):  # an empty directory
    conv.load_variables(tmp_path)


def test_unreadable_files(tmp_path):
  pytest.importorskip("torch")
  path = tmp_path / conv.WEIGHTS_FILENAME
  path.write_bytes(b"not a checkpoint")
  with pytest.raises(conv.InceptionConversionError, match="could not be read"):
    conv.load_torch_state_dict(path, check_hash=False)
  os.makedirs(tmp_path / "art")
  (tmp_path / "art" / "inception.json").write_text('{"format": "something else"}')
  with pytest.raises(ValueError, match="is not a ctxrq_jax.fid_inception/1 file"):
    conv.load_artifact(tmp_path / "art")
