"""The stage-1 artifact (ctxrq_jax/models/artifact.py): round trip, errors naming the problem, and `CodeDecoder`."""

import json
import os

import jax
import numpy as np
import pytest

from ctxrq_jax.models import artifact
from ctxrq_jax.models import rqvae
from tests import helpers

TINY = helpers.TINY_RQVAE


@pytest.fixture()
def tiny(tiny_rqvae):
  return tiny_rqvae


def test_artifact_round_trip(tiny, tmp_path):
  model, variables, x = tiny
  artifact.save_artifact(tmp_path / "art", TINY, variables)
  loaded_model, loaded = artifact.load_artifact(tmp_path / "art")
  assert loaded_model == model.clone(precision="highest")
  helpers.assert_trees_equal(loaded, variables)
  with pytest.raises(FileExistsError, match="already exists"):
    artifact.save_artifact(tmp_path / "art", TINY, variables)
  artifact.save_artifact(tmp_path / "art", TINY, variables, overwrite=True)


def test_an_interrupted_overwrite_leaves_the_old_artifact(tiny, tmp_path, monkeypatch):
  # The stage-1 export (every training run's end) and `convert --overwrite` used to unlink the JSON and let orbax
  # delete the old variables before writing: interrupted there, no artifact was left to decode a finished stage 2.
  from ctxrq_jax.models import variables_files  # pylint: disable=g-import-not-at-top
  _, variables, _ = tiny
  art = tmp_path / "art"
  artifact.save_artifact(art, TINY, variables)
  doubled = jax.tree.map(lambda a: a * 2, variables)
  real_save = variables_files.ocp.StandardCheckpointer.save

  def interrupted(self, directory, *args, **kwargs):
    real_save(self, directory, *args, **kwargs)
    raise KeyboardInterrupt("preempted while the new variables were written")

  monkeypatch.setattr(variables_files.ocp.StandardCheckpointer, "save", interrupted)
  with pytest.raises(KeyboardInterrupt):
    artifact.save_artifact(art, TINY, doubled, overwrite=True)
  monkeypatch.undo()
  helpers.assert_trees_equal(artifact.load_artifact(art)[1], variables)
  assert sorted(os.listdir(art)) == ["model_config.json", "variables"]
  artifact.save_artifact(art, TINY, doubled, overwrite=True)  # a finished replacement: swapped in, old removed
  helpers.assert_trees_equal(artifact.load_artifact(art)[1], doubled)
  assert sorted(os.listdir(art)) == ["model_config.json", "variables"]


def test_artifact_errors_name_the_problem(tiny, tmp_path):
  _, variables, _ = tiny
  with pytest.raises(FileNotFoundError, match="does not exist"):
    artifact.load_artifact(tmp_path / "nowhere")
  with pytest.raises(ValueError, match="do not match the model config"):
    artifact.save_artifact(tmp_path / "bad", {**TINY, "codebook_size": 32}, variables)
  art = tmp_path / "art"
  artifact.save_artifact(art, TINY, variables)
  # Corrupt config.
  (art / "model_config.json").write_text("{not json")
  with pytest.raises(ValueError, match="model_config.json is unreadable"):
    artifact.load_artifact(art)
  # Config of a different model than the stored variables.
  (art / "model_config.json").write_text(json.dumps({"format": artifact.ARTIFACT_FORMAT, "model": {**TINY, "ch": 16}}))
  with pytest.raises(ValueError, match="could not be restored|do not match"):
    artifact.load_artifact(art)
  # Missing checkpoint.
  (art / "model_config.json").write_text(json.dumps({"format": artifact.ARTIFACT_FORMAT, "model": TINY}))
  for root, _, files in os.walk(art / "variables"):
    for name in files:
      os.remove(os.path.join(root, name))
  with pytest.raises(ValueError, match="could not be restored"):
    artifact.load_artifact(art)


def test_code_decoder_chunks_equal_one_call(tiny, tmp_path):
  model, variables, _ = tiny
  artifact.save_artifact(tmp_path / "art", TINY, variables)
  h, w, d = model.code_shape
  codes = np.random.default_rng(0).integers(0, model.codebook_size, (5, h, w, d))
  decode = jax.jit(lambda v, c: model.apply(v, c, method=rqvae.RQVAE.decode_codes))  # one program, not op by op
  direct = np.clip(np.asarray(decode(variables, codes)), -1, 1)
  whole = artifact.CodeDecoder(tmp_path / "art", batch_size=8)  # from the directory: one padded chunk
  chunked = artifact.CodeDecoder((model, variables), batch_size=2)  # from a loaded pair: chunks of 2, 2, 1
  assert whole.code_shape == model.code_shape
  np.testing.assert_allclose(whole.images(codes), direct, atol=1e-5)
  np.testing.assert_allclose(chunked.images(codes.reshape(5, h * w, d)), direct, atol=1e-5)  # [M, N, D] too
  assert [(i, len(x)) for i, x in chunked.batches(codes)] == [(0, 2), (2, 2), (4, 1)]
  as_uint8 = chunked.images(codes, uint8=True)
  assert as_uint8.dtype == np.uint8 and as_uint8.shape == (5, 16, 16, 1)
  out = np.zeros((5, 16, 16, 3), np.uint8)  # grey images repeated to RGB, written in place
  assert chunked.images(codes, out=out) is out
  np.testing.assert_array_equal(out, np.repeat(as_uint8, 3, axis=-1))
  with pytest.raises(ValueError, match=r"codes must be \[M, 8, 8, 3\] or \[M, 64, 3\]"):
    chunked.images(codes[..., :2])
  with pytest.raises(ValueError, match="codes must be integers"):
    chunked.images(codes.astype(np.float32))
  with pytest.raises(ValueError, match=r"codes must lie in \[0, 16\)"):
    chunked.images(codes - 1 - codes.max())
  with pytest.raises(ValueError, match="batch_size must be >= 1"):
    artifact.CodeDecoder((model, variables), batch_size=0)


def test_check_code_range():
  artifact.check_code_range(np.array([[0, 15]]), 16)
  artifact.check_code_range(np.zeros((0, 2), np.int32), 16)  # nothing to check
  with pytest.raises(ValueError, match=r"codes must lie in \[0, 16\) .*got range \[-1, 3\]"):
    artifact.check_code_range(np.array([-1, 3]), 16)
  with pytest.raises(ValueError, match=r"got range \[0, 16\]"):
    artifact.check_code_range(np.array([0, 16]), 16)


def _matmul_precisions(fn, *args) -> list:
  """The `precision` of every convolution and dot in the jaxpr of fn(*args), sub-jaxprs included."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
        found.append(eqn.params["precision"])
      for sub in jax.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def test_a_loaded_artifact_encodes_and_decodes_at_float32_precision(tiny, tmp_path):
  # On TPU the default is one bf16 pass per matmul: the latents, and so the codes, would drift from the released
  # float32 model's. Every convolution and dot of the loaded model's encode and decode names HIGHEST; the trainer's
  # model keeps the backend default.
  model, variables, x = tiny
  artifact.save_artifact(tmp_path / "art", TINY, variables)
  loaded_model, loaded = artifact.load_artifact(tmp_path / "art")
  highest = jax.lax.Precision.HIGHEST
  codes = jax.jit(loaded_model.apply)(loaded, x)["codes"]  # one program, not op by op
  for fn, arg in [(lambda v, a: loaded_model.apply(v, a, method=rqvae.RQVAE.encode), x),
                  (lambda v, a: loaded_model.apply(v, a, method=rqvae.RQVAE.decode_codes), codes)]:
    precisions = _matmul_precisions(fn, loaded, arg)
    assert len(precisions) > 10 and all(p in (highest, (highest, highest)) for p in precisions), precisions
  trained = _matmul_precisions(lambda v, a: model.apply(v, a, method=rqvae.RQVAE.encode), variables, x)
  assert None in trained  # the convolutions: the backend default, as the reference trains
