"""The demo pipeline's care for what a workdir already holds (ctxrq_jax/recipes/demo.py): it keeps its codes and its
tokenizer while they are current, replaces only what it wrote itself (also in a moved or copied workdir), refuses
mixed settings, and never replaces what a stage-2 run of the workdir depends on."""

import json
import os

import numpy as np
import pytest

from ctxrq_jax.core import checkpoint
from ctxrq_jax.core import paths
from ctxrq_jax.data import codes as code_data
from ctxrq_jax.data import tokenizer as tokenizer_lib
from ctxrq_jax.models import artifact
from ctxrq_jax.recipes import demo
from tests import helpers

CODEBOOK = np.ones((4, 2), np.float32)


def _codes(directory, artifact_dir, num_classes=3, codebook=CODEBOOK):
  with code_data.CodeDatasetWriter(str(directory), code_shape=(2, 2, 1), codebook=codebook,
                                   num_classes=num_classes, cond_vocab_size=None if num_classes else 8,
                                   cond_length=1, source={"stage1_artifact": paths.name(artifact_dir)}) as w:
    w.write("train", np.zeros((2, 2, 2, 1), np.int64), np.array([0, 1]) if num_classes else np.ones((2, 1)))


def test_only_the_demos_own_codes_are_replaced(tmp_path):
  artifact_dir = str(tmp_path / "stage1" / "rqvae")
  demo._check_replaceable_codes(str(tmp_path / "none"), artifact_dir, text=False)  # nothing there yet
  _codes(tmp_path / "codes", artifact_dir)
  demo._check_replaceable_codes(str(tmp_path / "codes"), artifact_dir, text=False)  # its own: re-encoded
  with pytest.raises(ValueError, match="holds codes written from the stage-1 artifact .*stage1/rqvae, not from this "
                     "workdir's .*other/rqvae"):
    demo._check_replaceable_codes(str(tmp_path / "codes"), str(tmp_path / "other" / "rqvae"), text=False)
  with pytest.raises(ValueError, match="holds class codes, which the demo did not write there"):
    demo._check_replaceable_codes(str(tmp_path / "codes"), artifact_dir, text=True)  # class codes where captions go


def test_codes_of_a_moved_workdir_are_recognised_by_their_codebook(tmp_path):
  # `mv runs/demo runs/demo2`: the codes record the old artifact path, but their codebook is this artifact's.
  _codes(tmp_path / "demo2" / "codes", tmp_path / "demo" / "stage1" / "rqvae")
  codes, moved_artifact = str(tmp_path / "demo2" / "codes"), str(tmp_path / "demo2" / "stage1" / "rqvae")
  fingerprint = code_data.codebook_fingerprint(CODEBOOK)
  demo._check_replaceable_codes(codes, moved_artifact, text=False, fingerprint=fingerprint)
  with pytest.raises(ValueError, match="nor from one with its codebook"):
    demo._check_replaceable_codes(codes, moved_artifact, text=False, fingerprint=code_data.codebook_fingerprint(
        2 * CODEBOOK))
  # Written from this very codebook, with the splits and counts the demo would encode: kept, not re-encoded.
  assert demo._codes_current(codes, fingerprint, {"train": 2}, text=False)
  assert not demo._codes_current(codes, fingerprint, {"train": 3}, text=False)  # another --max_examples
  assert not demo._codes_current(codes, fingerprint, {"train": 2, "test": 2}, text=False)
  assert not demo._codes_current(codes, fingerprint, {"train": 2}, text=True)
  assert not demo._codes_current(codes, code_data.codebook_fingerprint(2 * CODEBOOK), {"train": 2}, text=False)
  assert not demo._codes_current(str(tmp_path / "none"), fingerprint, {"train": 2}, text=False)


def test_the_demo_tokenizer_is_kept_while_its_captions_are_the_same(tmp_path):
  directory = tmp_path / "tokenizer"
  stage2 = str(tmp_path / "text_stage2")
  captions = ["a wide seven", "a thin one"] * 3
  demo._demo_tokenizer(str(directory), captions, 40, stage2)
  files = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in directory.iterdir()}
  assert sorted(files) == ["bpe-40-merges.txt", "bpe-40-vocab.json", demo.TOKENIZER_STAMP]
  demo._demo_tokenizer(str(directory), captions, 40, stage2)  # a re-run: the same files, not written again
  assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in directory.iterdir()} == files
  demo._demo_tokenizer(str(directory), ["a wide nine", "a thin two"] * 3, 40, stage2)  # other captions: retrained
  assert (directory / "bpe-40-vocab.json").read_bytes() != files["bpe-40-vocab.json"][0]
  # Once a text stage-2 run recorded the tokenizer it trained on, other captions are refused before any file goes.
  (tmp_path / "text_stage2").mkdir()
  tokenizer_lib.record_trained_tokenizer(stage2, "f" * 64, str(tmp_path / "codes"))
  kept = {p.name: p.read_bytes() for p in directory.iterdir()}
  with pytest.raises(ValueError, match="text_stage2 was trained on the tokenizer in .*; run the text demo in another"):
    demo._demo_tokenizer(str(directory), captions, 40, stage2)
  assert {p.name: p.read_bytes() for p in directory.iterdir()} == kept
  (directory / "NOTES.txt").write_text("mine")
  with pytest.raises(ValueError, match=r"holds files the demo did not write \(NOTES.txt\)"):
    demo._demo_tokenizer(str(directory), captions, 40, stage2)
  assert (directory / "NOTES.txt").read_text() == "mine" and len(list(directory.iterdir())) == 4
  # A pair of an earlier version (no stamp; trained from the same captions every run) is kept and stamped.
  old = tmp_path / "old"
  tokenizer_lib.train_tokenizer(captions, str(old), vocab_size=40)
  vocab = (old / "bpe-40-vocab.json").read_bytes()
  demo._demo_tokenizer(str(old), captions, 40, stage2)
  assert (old / "bpe-40-vocab.json").read_bytes() == vocab and (old / demo.TOKENIZER_STAMP).exists()


def test_one_workdir_holds_one_kind_of_demo_run(tmp_path):
  workdir = str(tmp_path)
  record = demo._check_settings(workdir, smoke=False, max_examples=None, text=False)
  assert not (tmp_path / demo.SETTINGS_FILE).exists()  # recorded only once the run's other checks have passed
  demo._check_settings(workdir, smoke=True, max_examples=500, text=False)()
  demo._check_settings(workdir, smoke=True, text=True)()  # the text demo shares stage 1 (its smoke: as many digits)
  demo._check_settings(workdir, smoke=True, max_examples=500, text=False)()
  del record
  with pytest.raises(ValueError, match="holds a --smoke demo run .*; run the full demo in another --workdir"):
    demo._check_settings(workdir, smoke=False, text=True)
  with pytest.raises(ValueError, match="class demo encoded --max_examples=500 .*not all digits"):
    demo._check_settings(workdir, smoke=True, max_examples=None, text=False)
  assert json.loads((tmp_path / demo.SETTINGS_FILE).read_text()) == {"smoke": True, "max_examples": 500}


@pytest.mark.parametrize("stage2", ["stage2", "text_stage2"])
def test_a_rerun_never_replaces_what_a_stage2_run_depends_on(tmp_path, tiny_rqvae, stage2):
  # A finished demo's workdir (stage-1 checkpoint at its last step, the artifact, a stage-2 run's codebook record),
  # run again with a stage-1 config that trains further: refused before stage 1 trains, exports or encodes anything.
  _, variables, _ = tiny_rqvae
  s1, s2 = demo.default_configs(smoke=True)
  workdir = tmp_path / "w"
  ckpt = checkpoint.Checkpointer(workdir / "stage1" / "checkpoints", max_to_keep=2, save_interval_steps=1)
  ckpt.save(int(s1.train.num_steps), {"w": np.zeros(2, np.float32)}, force=True)
  ckpt.close()
  artifact_dir = workdir / "stage1" / "rqvae"
  artifact.save_artifact(artifact_dir, helpers.TINY_RQVAE, variables)
  codebook = np.asarray(variables["quantizer"]["codebook"], np.float32)
  (workdir / stage2).mkdir()
  code_data.record_trained_codebook(str(workdir / stage2), codebook, str(workdir / "codes"))
  before = {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, fs in os.walk(workdir / "stage1") for f in fs}

  further = s1.copy_and_resolve_references()
  with further.unlocked():
    further.train.num_steps = int(s1.train.num_steps) + 8
  with pytest.raises(ValueError, match=rf"stage 1 would train from step {s1.train.num_steps} to step "
                     rf"{further.train.num_steps} .*the stage-2 run .*{stage2} was trained on"):
    demo.run(further, s2, str(workdir), 2, max_examples=demo.SMOKE_MAX_EXAMPLES, smoke=True)
  # Its stage 1 is complete, but the artifact is not the RQ-VAE the stage-2 run recorded.
  code_data.record_trained_codebook(str(workdir / stage2), 2 * codebook, str(workdir / "codes"))
  with pytest.raises(ValueError, match=rf"is not the RQ-VAE the stage-2 run .*{stage2} was trained with"):
    demo.run(s1, s2, str(workdir), 2, max_examples=demo.SMOKE_MAX_EXAMPLES, smoke=True)
  after = {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
           for d, _, fs in os.walk(workdir / "stage1") for f in fs}
  assert after == before and not (workdir / "codes").exists()
  assert ckpt.all_steps() == [int(s1.train.num_steps)]


@pytest.mark.parametrize("text", [False, True])
def test_a_bad_stage2_config_is_refused_before_stage1_trains(tmp_path, text):
  # `--stage2_config.train.log_every=0` was reported after stage 1 had trained and the digits were encoded.
  from ctxrq_jax.core.config import ConfigError  # pylint: disable=g-import-not-at-top
  stage1, stage2 = (demo.default_text_configs if text else demo.default_configs)(smoke=True)
  with stage2.unlocked():
    stage2.train.log_every = 0
  with pytest.raises(ConfigError, match="train.log_every must be >= 1, got 0"):
    if text:
      demo.run_text(stage1, stage2, str(tmp_path), 1, smoke=True)
    else:
      demo.run(stage1, stage2, str(tmp_path), 1, smoke=True)
  assert os.listdir(tmp_path) == []  # not even demo.json


def test_ensure_run_trains_the_notebooks_run_as_the_demo_command_unless_it_finished(tmp_path, monkeypatch):
  calls = []

  def fake_run(stage1, stage2, workdir, samples_per_class, *, smoke, max_examples):
    calls.append((stage1.train.num_steps, stage2.train.num_steps, workdir, samples_per_class, smoke, max_examples))
    return {"stopped_at": 3} if workdir.endswith("stopped") else {"stage1": {}}
  monkeypatch.setattr(demo, "run", fake_run)
  full1, full2 = demo.default_configs()
  smoke1, smoke2 = demo.default_configs(smoke=True)
  assert demo.ensure_run(str(tmp_path / "a"), quick=True) == {"stage1": {}}
  assert demo.ensure_run(str(tmp_path / "b"), smoke=True, quick=True, samples_per_class=2) == {"stage1": {}}
  assert demo.ensure_run(str(tmp_path / "c")) == {"stage1": {}}
  assert calls == [(*demo.QUICK_STEPS, str(tmp_path / "a"), 10, False, None),  # quick: a first look
                   # --smoke as the command: its steps and the first 500 digits (the command resumes it)
                   (smoke1.train.num_steps, smoke2.train.num_steps, str(tmp_path / "b"), 2, True,
                    demo.SMOKE_MAX_EXAMPLES),
                   (full1.train.num_steps, full2.train.num_steps, str(tmp_path / "c"), 10, False, None)]
  (tmp_path / "done" / demo.SAMPLES).mkdir(parents=True)
  (tmp_path / "done" / demo.SAMPLES / "phases.png").write_bytes(b"")
  assert demo.ensure_run(str(tmp_path / "done"), quick=True) is None and len(calls) == 3  # finished: loaded
  with pytest.raises(RuntimeError, match="training stopped at step 3; run this again to resume"):
    demo.ensure_run(str(tmp_path / "stopped"))
