"""Tests of the RQ-VAE converter (ctxrq_jax/models/rqvae_convert.py and `python -m ctxrq_jax.convert`) against an
independent PyTorch implementation of the reference RQ-VAE."""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import json
import os
import subprocess
import sys

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")

from ctxrq_jax.core import config as configlib  # pylint: disable=g-import-not-at-top
from ctxrq_jax.models import artifact
from ctxrq_jax.models import rqvae_convert as convert
from tests import helpers
from tests import torch_rqvae_reference as ref

# One worker runs the module, so its converted reference model (a module fixture) is built once.
pytestmark = pytest.mark.xdist_group("rqvae_convert")

REPO = helpers.REPO
# A copy of shared/reference's key list, kept with the tests so a clean clone can run them.
TSV = os.path.join(REPO, "tests", "data", "rqvae-imagenet256-8x8x4-state-dict.tsv")

# The released ImageNet 8x8x4 config (arch section of in256-rqvae-8x8x4.yaml).
IMAGENET_ARCH = {
    "type": "rq-vae",
    "code_hier": 1,
    "hparams": {
        "bottleneck_type": "rq", "embed_dim": 256, "n_embed": 16384, "latent_shape": [8, 8, 256],
        "code_shape": [8, 8, 4], "shared_codebook": True, "decay": 0.99, "restart_unused_codes": True,
        "loss_type": "mse", "latent_loss_weight": 0.25,
    },
    "ddconfig": {
        "double_z": False, "z_channels": 256, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
        "ch_mult": [1, 1, 2, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [8], "dropout": 0.0,
    },
    "checkpointing": True,
}

# Small but complete: two levels, a nin_shortcut, attention at the 8x8 level, D = 3 codes from K = 64.
SMALL_ARCH = {
    "type": "rq-vae",
    "hparams": {
        "bottleneck_type": "rq", "embed_dim": 16, "n_embed": 64, "latent_shape": [8, 8, 16], "code_shape": [8, 8, 3],
        "shared_codebook": True, "decay": 0.99, "restart_unused_codes": True, "loss_type": "mse",
        "latent_loss_weight": 0.25,
    },
    "ddconfig": {
        "double_z": False, "z_channels": 32, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
        "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8], "dropout": 0.0,
    },
}


def _reference_config(arch):
  # Other sections of a real config.yaml, which the converter must ignore.
  return {"dataset": {"type": "imagenet"}, "arch": arch, "optimizer": {"type": "adam", "init_lr": 4e-5}}


def _read_tsv():
  rows = []
  with open(TSV) as f:
    for line in f:
      if line.startswith("#") or not line.strip():
        continue
      key, shape, dtype = line.rstrip("\n").split("\t")
      rows.append((key, tuple(ast.literal_eval(shape)), dtype))
  return rows


def _random_torch_model(seed):
  model = ref.RQVAE.from_reference_config(_reference_config(SMALL_ARCH))
  ref.randomize_(model, torch.Generator().manual_seed(seed))
  return model.eval()


def _numpy_state(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """A random torch model saved in the reference layout, converted by `convert.run`, loaded back."""
  d = tmp_path_factory.mktemp("ref_ckpt")
  model, ema = _random_torch_model(0), _random_torch_model(1)
  ckpt = os.path.join(d, "model.pt")
  torch.save({"epoch": 3, "state_dict": model.state_dict(), "state_dict_ema": ema.state_dict()}, ckpt)
  with open(os.path.join(d, "config.yaml"), "w") as f:
    yaml.safe_dump(_reference_config(SMALL_ARCH), f)
  out = os.path.join(tmp_path_factory.mktemp("artifact"), "rqvae")
  convert.run(ckpt, out)
  flax_model, variables = artifact.load_artifact(out)
  return {"dir": str(d), "ckpt": ckpt, "torch": model, "torch_ema": ema, "out": out, "model": flax_model,
          "variables": variables}


def test_torch_reference_state_dict_matches_released_keys_and_shapes():
  cfg = _reference_config(IMAGENET_ARCH)
  with torch.device("meta"):
    model = ref.RQVAE.from_reference_config(cfg)
  got = [(k, tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items()]
  want = _read_tsv()
  assert len(want) == 398
  assert got == want


def test_mapping_covers_every_reference_key():
  model_cfg = convert.model_config_from_reference(_reference_config(IMAGENET_ARCH))
  shapes = convert.reference_state_dict_shapes(model_cfg)  # eval_shape only: no 100M-parameter arrays
  assert shapes == {key: shape for key, shape, _ in _read_tsv()}


def test_imagenet_reference_config_maps_to_our_imagenet_config():
  ours = configlib.load_config_file("rqvae_imagenet").model.to_dict()
  mapped = convert.model_config_from_reference(_reference_config(IMAGENET_ARCH)).to_dict()
  assert mapped == ours


def test_converted_model_matches_torch(converted):
  model, variables, tmodel = converted["model"], converted["variables"], converted["torch"]
  x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    tz = tmodel.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    tzq, tcodes = tmodel.quantizer.quantize(torch.from_numpy(tz))
    trecon = tmodel.decode(tzq).permute(0, 2, 3, 1).numpy()
    tdec = tmodel.decode_codes(tcodes).permute(0, 2, 3, 1).numpy()
  apply = jax.jit(model.apply, static_argnames="method")  # four programs, not the model op by op
  z = np.asarray(apply(variables, jnp.asarray(x), method=model.encode))
  assert z.shape == (2, 8, 8, 16)
  assert _rel_err(z, tz) < 1e-4

  # Quantize the torch latents so both sides see identical inputs; codes must agree except at exact-distance ties.
  _, codes, _, _ = apply(variables, jnp.asarray(tz), method=model.quantize)
  codes, tcodes = np.asarray(codes), tcodes.numpy()
  mismatch = codes != tcodes
  if mismatch.any():
    book = tmodel.quantizer.codebooks[0].weight[:-1].numpy().astype(np.float64)
    for b, i, j in zip(*np.nonzero(mismatch.any(-1))):
      d = int(np.argmax(mismatch[b, i, j]))
      r = tz[b, i, j].astype(np.float64) - book[tcodes[b, i, j, :d]].sum(0)
      dist = ((r[None] - book) ** 2).sum(-1)
      assert abs(dist[codes[b, i, j, d]] - dist[tcodes[b, i, j, d]]) < 1e-4 * dist.max(), (b, i, j, d)
  assert mismatch.mean() < 0.02

  recon = np.asarray(apply(variables, tzq.numpy(), method=model.decode))
  assert _rel_err(recon, trecon) < 1e-4
  dec = np.asarray(apply(variables, jnp.asarray(tcodes, jnp.int32), method=model.decode_codes))
  assert _rel_err(dec, tdec) < 1e-4


def test_quantizer_variables(converted):
  q = converted["variables"]["quantizer"]
  book = converted["torch"].quantizer.codebooks[0]
  np.testing.assert_array_equal(np.asarray(q["codebook"]), book.weight[:-1].numpy())
  np.testing.assert_array_equal(np.asarray(q["cluster_size_ema"]), book.cluster_size_ema.numpy())
  np.testing.assert_array_equal(np.asarray(q["embed_ema"]), book.embed_ema.numpy())
  with open(os.path.join(converted["out"], convert.CONVERSION_FILE)) as f:
    record = json.load(f)
  assert record["state_dict"] == "state_dict"
  assert record["reference_training_hparams"]["decay"] == 0.99


def test_module_prefix_is_stripped(converted):
  state = _numpy_state(converted["torch"])
  model_cfg = convert.model_config_from_reference(_reference_config(SMALL_ARCH))
  prefixed = convert.convert_state_dict({"module." + k: v for k, v in state.items()}, model_cfg)
  kernel = prefixed["params"]["encoder"]["down_1"]["block_0"]["nin_shortcut"]["kernel"]
  np.testing.assert_array_equal(kernel, np.transpose(state["encoder.down.1.block.0.nin_shortcut.weight"], (2, 3, 1, 0)))
  scale = prefixed["params"]["decoder"]["up_1"]["attn_1"]["norm"]["scale"]
  np.testing.assert_array_equal(scale, state["decoder.up.1.attn.1.norm.weight"])


def test_cli_converts_ema_weights(converted, tmp_path, subprocess_env):
  out = tmp_path / "ema_artifact"
  env = subprocess_env
  proc = subprocess.run(
      [sys.executable, "-m", "ctxrq_jax.convert", "rqvae", f"--checkpoint={converted['ckpt']}", f"--out={out}",
       "--use_ema"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  _, variables = artifact.load_artifact(out)
  ema = _numpy_state(converted["torch_ema"])
  np.testing.assert_array_equal(
      np.asarray(variables["params"]["decoder"]["conv_out"]["kernel"]),
      np.transpose(ema["decoder.conv_out.weight"], (2, 3, 1, 0)))
  np.testing.assert_array_equal(
      np.asarray(variables["quantizer"]["codebook"]), ema["quantizer.codebooks.2.weight"][:-1])
  with open(out / convert.CONVERSION_FILE) as f:
    assert json.load(f)["state_dict"] == "state_dict_ema"


def test_cli_reports_corrupt_checkpoint(tmp_path, subprocess_env):
  bad = tmp_path / "model.pt"
  bad.write_bytes(b"this is not a torch checkpoint")
  (tmp_path / "config.yaml").write_text(yaml.safe_dump(_reference_config(SMALL_ARCH)))
  env = subprocess_env
  proc = subprocess.run(
      [sys.executable, "-m", "ctxrq_jax.convert", "rqvae", f"--checkpoint={bad}", f"--out={tmp_path / 'out'}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
  # A user's mistake: one line `error: ...` on stderr and exit status 2, no traceback.
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert f"checkpoint {bad} could not be read" in proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and f"checkpoint {bad} could not be read" in errors[0], proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr


def test_pickled_objects_need_allow_pickle(converted, tmp_path):
  # Training checkpoints may hold optimizer/scheduler state or argument objects the safe loader refuses.
  ckpt = tmp_path / "model.pt"
  torch.save({"state_dict": converted["torch"].state_dict(), "args": argparse.Namespace(lr=1e-4)}, ckpt)
  (tmp_path / "config.yaml").write_text(yaml.safe_dump(_reference_config(SMALL_ARCH)))
  with pytest.raises(convert.ConversionError, match="pass --allow_pickle"):
    convert.run(ckpt, tmp_path / "out")
  convert.run(ckpt, tmp_path / "out", allow_pickle=True)
  _, variables = artifact.load_artifact(tmp_path / "out")
  np.testing.assert_array_equal(
      np.asarray(variables["params"]["quant_conv"]["bias"]), converted["torch"].quant_conv.bias.detach().numpy())


_THROWAWAY_SOURCE = """
class ListConfig(list):  # like omegaconf's: pickled by reference to its class, with items and attribute state
  def __init__(self, content, flags=None):
    super().__init__(content)
    self._flags = dict(flags or {})


class Node:
  def __init__(self, value):
    self.value = value
"""


@contextlib.contextmanager
def _throwaway_module(tmp_path, name):
  """A module written to tmp_path and imported; on exit it is made unimportable again (as omegaconf is for us)."""
  source = tmp_path / f"{name}.py"
  source.write_text(_THROWAWAY_SOURCE)
  sys.path.insert(0, str(tmp_path))
  try:
    yield importlib.import_module(name)
  finally:
    sys.path.remove(str(tmp_path))
    sys.modules.pop(name, None)
    source.unlink()
  with pytest.raises(ImportError):
    importlib.import_module(name)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_trainer_checkpoint_with_objects_of_missing_modules(converted, tmp_path, zip_format):
  # The reference trainer saves {'epoch', 'state_dict', 'optimizer', 'scheduler'}; under torch 1.x the optimizer's
  # param_groups hold omegaconf ListConfigs (Adam betas from an OmegaConf config), and omegaconf is not our dependency.
  (tmp_path / "config.yaml").write_text(yaml.safe_dump(_reference_config(SMALL_ARCH)))
  ckpt, bad = tmp_path / "model.pt", tmp_path / "bad.pt"
  state = converted["torch"].state_dict()
  with _throwaway_module(tmp_path, f"throwaway_omegaconf_{'zip' if zip_format else 'legacy'}") as module:
    betas = module.ListConfig([0.5, 0.9], flags={"readonly": False})
    torch.save({"epoch": 50, "state_dict": state, "optimizer": {"param_groups": [{"betas": betas, "lr": 4e-5}]},
                "scheduler": {"node": module.Node(3)}}, ckpt, _use_new_zipfile_serialization=zip_format)
    torch.save({"state_dict": {**state, "quant_conv.extra": module.Node(4)}}, bad,
               _use_new_zipfile_serialization=zip_format)
  with pytest.raises(convert.ConversionError, match="pass --allow_pickle") as e:
    convert.run(ckpt, tmp_path / "out")
  message = str(e.value)
  assert "\n" not in message and "ListConfig" in message and "optimizer state" in message and "stand-in" in message
  convert.run(ckpt, tmp_path / "out", allow_pickle=True)
  _, variables = artifact.load_artifact(tmp_path / "out")
  flat, plain = traverse_util.flatten_dict(variables), traverse_util.flatten_dict(converted["variables"])
  assert flat.keys() == plain.keys()
  for k, v in plain.items():
    np.testing.assert_array_equal(np.asarray(flat[k]), np.asarray(v), err_msg="/".join(k))
  # A stand-in inside the state dict itself is named.
  with pytest.raises(convert.ConversionError, match=r"entry 'quant_conv\.extra' is a stand-in for throwaway_\w+\.Node, "
                                                    r"not a tensor"):
    convert.load_torch_state_dict(bad, allow_pickle=True)


@pytest.fixture()
def state_and_cfg(converted):
  return _numpy_state(converted["torch"]), convert.model_config_from_reference(_reference_config(SMALL_ARCH))


def test_missing_and_unexpected_keys_are_named(state_and_cfg):
  state, cfg = state_and_cfg
  del state["decoder.mid.attn_1.q.bias"]
  state["encoder.extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(convert.ConversionError, match=r"missing keys: decoder\.mid\.attn_1\.q\.bias") as e:
    convert.convert_state_dict(state, cfg)
  assert "unexpected keys: encoder.extra.weight" in str(e.value)


def test_missing_key_alone(state_and_cfg):
  state, cfg = state_and_cfg
  del state["quantizer.codebooks.1.embed_ema"]
  with pytest.raises(convert.ConversionError, match=r"missing keys: quantizer\.codebooks\.1\.embed_ema$"):
    convert.convert_state_dict(state, cfg)


def test_wrong_shape_names_key_and_both_shapes(state_and_cfg):
  state, cfg = state_and_cfg
  state["encoder.conv_in.weight"] = np.zeros((32, 3, 5, 5), np.float32)
  with pytest.raises(convert.ConversionError,
                     match=r"encoder\.conv_in\.weight: checkpoint shape \(32, 3, 5, 5\) != expected \(32, 3, 3, 3\)"):
    convert.convert_state_dict(state, cfg)


def test_mismatched_codebook_copies(state_and_cfg):
  state, cfg = state_and_cfg
  state["quantizer.codebooks.2.weight"] = state["quantizer.codebooks.2.weight"].copy()
  state["quantizer.codebooks.2.weight"][5, 3] += 0.5
  with pytest.raises(convert.ConversionError, match=(
      r"codebook copies differ: quantizer\.codebooks\.2\.weight != quantizer\.codebooks\.0\.weight")):
    convert.convert_state_dict(state, cfg)


def test_nonzero_padding_row(state_and_cfg):
  state, cfg = state_and_cfg
  weight = state["quantizer.codebooks.0.weight"].copy()
  weight[-1] = 1.0
  for d in range(3):
    state[f"quantizer.codebooks.{d}.weight"] = weight
  with pytest.raises(convert.ConversionError, match=r"quantizer\.codebooks\.0\.weight: the last row .* not zero"):
    convert.convert_state_dict(state, cfg)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_corrupt_and_wrong_files(tmp_path):
  (tmp_path / "config.yaml").write_text(yaml.safe_dump(_reference_config(SMALL_ARCH)))
  corrupt = tmp_path / "model.pt"
  corrupt.write_bytes(b"\x80\x04garbage")
  with pytest.raises(convert.ConversionError, match=f"checkpoint {corrupt} could not be read"):
    convert.run(corrupt, tmp_path / "out")
  not_dict = tmp_path / "list.pt"
  torch.save([torch.zeros(2)], not_dict)
  with pytest.raises(convert.ConversionError, match=f"checkpoint {not_dict} holds a list"):
    convert.run(not_dict, tmp_path / "out")
  no_ema = tmp_path / "no_ema.pt"
  torch.save({"state_dict": {}}, no_ema)
  with pytest.raises(convert.ConversionError, match=r"has no 'state_dict_ema' \(has \['state_dict'\]\)"):
    convert.run(no_ema, tmp_path / "out", use_ema=True)
  with pytest.raises(convert.ConversionError, match="does not exist"):
    convert.run(tmp_path / "absent.pt", tmp_path / "out")
  (tmp_path / "config.yaml").write_text("arch: [unclosed")
  with pytest.raises(convert.ConversionError, match=f"reference config {tmp_path / 'config.yaml'} is not readable"):
    convert.run(no_ema, tmp_path / "out")
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit, message", [
    (lambda a: a["ddconfig"].pop("double_z"), "double_z must be false"),
    (lambda a: a["hparams"].update(shared_codebook=False), "shared_codebook is false"),
    (lambda a: a["hparams"].update(code_shape=[4, 4, 3]), "spatially folded codes"),
    (lambda a: a["ddconfig"].pop("ch_mult"), r"no arch\.ddconfig\.ch_mult"),
    (lambda a: a.update(type="rq-transformer"), "only 'rq-vae'"),
    (lambda a: a["ddconfig"].update(ch=24), "unsupported model: .*norm_groups"),
])
def test_bad_reference_configs(edit, message):
  arch = json.loads(json.dumps(SMALL_ARCH))
  edit(arch)
  with pytest.raises(convert.ConversionError, match=message):
    convert.model_config_from_reference(_reference_config(arch))
