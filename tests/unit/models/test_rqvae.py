"""Tests for the stage-1 RQ-VAE (ctxrq_jax/models/rqvae.py) and the stage-1 configs (the artifact:
test_artifact.py; the PatchGAN: test_patchgan.py; the stage-1 losses: tests/unit/stage1/test_losses.py)."""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxrq_jax.core import config as configlib
from ctxrq_jax.models import common
from ctxrq_jax.models import rq
from ctxrq_jax.models import rqvae
from tests import helpers

ROOT = pathlib.Path(helpers.REPO)
REFERENCE_TSV = ROOT / "tests" / "data" / "rqvae-imagenet256-8x8x4-state-dict.tsv"
TINY = helpers.TINY_RQVAE
_key = helpers.rbg_key


def _load_config(name: str):
  """The checkout's user-facing configs/NAME.py (it loads the package's defaults)."""
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.fixture()
def tiny(tiny_rqvae):
  return tiny_rqvae


def test_imagenet_param_count_matches_reference():
  cfg = _load_config("rqvae_imagenet")
  model = rqvae.RQVAE.from_config(cfg.model)
  shapes = jax.eval_shape(lambda: rqvae.init_variables(model, jax.random.key(0)))
  k, n_z = cfg.model.codebook_size, cfg.model.embed_dim
  # The reference counts its shared codebook once, with one extra padding row.
  assert common.count_params(shapes["params"]) == 104_402_051 - k * n_z - n_z
  assert shapes["quantizer"]["codebook"].shape == (k, n_z)
  assert model.code_shape == (8, 8, 4)


def test_imagenet_names_and_shapes_map_mechanically_to_reference_keys():
  model = rqvae.RQVAE.from_config(_load_config("rqvae_imagenet").model)
  shapes = jax.eval_shape(lambda: rqvae.init_variables(model, jax.random.key(0)))["params"]
  ours = {"/".join(p.key for p in path): tuple(v.shape) for path, v in jax.tree_util.tree_leaves_with_path(shapes)}
  mapped = {}
  for line in REFERENCE_TSV.read_text().splitlines():
    if line.startswith("#") or line.startswith("quantizer."):
      continue
    key, shape = line.split("\t")[:2]
    shape = tuple(json.loads(shape.replace("(", "[").replace(")", "]").replace(",]", "]")))
    parts, out = key.split("."), []
    while parts:
      head = parts.pop(0)
      if head in ("down", "up", "block", "attn") and parts and parts[0].isdigit():
        out.append(f"{head}_{parts.pop(0)}")
      else:
        out.append(head)
    if out[-1] == "weight":
      out[-1] = "kernel" if len(shape) == 4 else "scale"
      shape = (shape[2], shape[3], shape[1], shape[0]) if len(shape) == 4 else shape  # OIHW -> HWIO
    mapped["/".join(out)] = shape
  assert ours == mapped


def test_tiny_forward_shapes_and_consistency(tiny):
  model, variables, x = tiny
  assert sorted(variables) == ["params", "quantizer"]
  assert sorted(variables["quantizer"]) == ["cluster_size_ema", "codebook", "embed_ema"]

  @jax.jit
  def run(variables, x):
    out = model.apply(variables, x)
    # Decoding the codes reproduces the reconstruction (z_q's value is the last partial sum).
    recon = model.apply(variables, out["codes"], method=rqvae.RQVAE.decode_codes)
    z = model.apply(variables, x, method=rqvae.RQVAE.encode)
    _, codes, _, _ = model.apply(variables, out["z"], method=rqvae.RQVAE.quantize)
    return out, recon, z, codes

  out, recon, z, codes = run(variables, x)
  assert out["recon"].shape == (2, 16, 16, 1) and out["recon"].dtype == jnp.float32
  assert out["codes"].shape == (2, 8, 8, 3) and out["codes"].dtype == jnp.int32
  assert out["z"].shape == (2, 8, 8, 4)
  assert out["residuals"].shape == (2, 8, 8, 3, 4)
  assert out["commitment_loss"].shape == () and out["mse"].shape == ()
  np.testing.assert_allclose(np.asarray(recon), np.asarray(out["recon"]), atol=1e-5)
  np.testing.assert_allclose(np.asarray(z), np.asarray(out["z"]), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(codes), np.asarray(out["codes"]))


def test_gradients_reach_encoder_and_ema_step_runs(tiny):
  model, variables, x = tiny

  def loss_fn(params, quantizer):
    out = model.apply({"params": params, "quantizer": quantizer}, x)
    return out["mse"] + 0.25 * out["commitment_loss"], out

  @jax.jit
  def step(variables):
    grads, out = jax.grad(loss_fn, has_aux=True)(variables["params"], variables["quantizer"])
    vecs = out["residuals"].reshape(-1, model.embed_dim)
    new = rq.ema_update(rqvae.codebook_state(variables), vecs, out["codes"].reshape(-1), 0.99, 1e-5)
    new = rq.restart_dead_codes(new, vecs, _key(1))
    return grads, rqvae.with_codebook_state(variables, new)

  grads, updated = step(variables)
  assert float(jnp.abs(grads["encoder"]["conv_in"]["kernel"]).sum()) > 0
  assert updated["quantizer"]["codebook"].shape == (16, 4)
  assert not np.allclose(np.asarray(updated["quantizer"]["codebook"]), np.asarray(variables["quantizer"]["codebook"]))


def test_wrong_image_size_or_channels_raise(tiny):
  model, variables, _ = tiny
  with pytest.raises(ValueError, match=r"resolution 16"):
    model.apply(variables, jnp.zeros((1, 32, 32, 1)))
  with pytest.raises(ValueError, match=r"in_channels 1"):
    model.apply(variables, jnp.zeros((1, 16, 16, 3)))
  with pytest.raises(ValueError, match="decode_codes expects codes"):
    model.apply(variables, jnp.zeros((1, 8, 8, 2), jnp.int32), method=rqvae.RQVAE.decode_codes)


def test_bad_model_config_raises_config_error():
  with pytest.raises(configlib.ConfigError, match="norm_groups"):
    rqvae.RQVAE.from_config({**TINY, "norm_groups": 3})
  with pytest.raises(configlib.ConfigError, match="resolution"):
    rqvae.RQVAE.from_config({**TINY, "resolution": 15})
  with pytest.raises(configlib.ConfigError, match="missing key"):
    rqvae.RQVAE.from_config({k: v for k, v in TINY.items() if k != "ch"})
  with pytest.raises(configlib.ConfigError, match="dtype"):
    rqvae.RQVAE.from_config({**TINY, "dtype": "int8"})


@pytest.mark.parametrize("name", ["rqvae_imagenet", "rqvae_mnist"])
def test_configs_are_locked_and_build(name):
  cfg = _load_config(name)
  with pytest.raises(AttributeError):
    cfg.train.batch_sise = 8
  model = rqvae.RQVAE.from_config(cfg.model)
  assert model.resolution == cfg.data.image_size and model.in_channels == cfg.data.channels
  assert cfg.loss.recon in ("mse", "l1")
  if name == "rqvae_mnist":
    assert model.code_shape == (8, 8, 4)
  # The checkout's file is the package's config, value for value.
  assert cfg.to_dict() == configlib.load_config_file(name).to_dict()
