"""The demo pipeline's care for what a workdir already holds (ctxrq_jax/recipes/demo.py): it re-encodes and retrains
its tokenizer every run, and replaces only what it wrote itself."""

import numpy as np
import pytest

from ctxrq_jax.core import paths
from ctxrq_jax.data import codes as code_data
from ctxrq_jax.data import tokenizer as tokenizer_lib
from ctxrq_jax.recipes import demo


def _codes(directory, artifact, num_classes=3):
  with code_data.CodeDatasetWriter(str(directory), code_shape=(2, 2, 1), codebook=np.ones((4, 2), np.float32),
                                   num_classes=num_classes, cond_vocab_size=None if num_classes else 8,
                                   cond_length=1, source={"stage1_artifact": paths.name(artifact)}) as w:
    w.write("train", np.zeros((2, 2, 2, 1), np.int64), np.array([0, 1]) if num_classes else np.ones((2, 1)))


def test_only_the_demos_own_codes_are_replaced(tmp_path):
  artifact = str(tmp_path / "stage1" / "rqvae")
  demo._check_replaceable_codes(str(tmp_path / "none"), artifact, text=False)  # nothing there yet
  _codes(tmp_path / "codes", artifact)
  demo._check_replaceable_codes(str(tmp_path / "codes"), artifact, text=False)  # its own: re-encoded
  with pytest.raises(ValueError, match="holds a code dataset the demo did not write"):
    demo._check_replaceable_codes(str(tmp_path / "codes"), str(tmp_path / "other" / "rqvae"), text=False)
  with pytest.raises(ValueError, match="holds a code dataset the demo did not write"):
    demo._check_replaceable_codes(str(tmp_path / "codes"), artifact, text=True)  # class codes where captions go


def test_only_the_demos_own_tokenizer_files_are_removed(tmp_path):
  directory = tmp_path / "tokenizer"
  tokenizer_lib.train_tokenizer(["a wide seven", "a thin one"] * 3, str(directory), vocab_size=40)
  demo._clear_demo_tokenizer(str(directory), 40)
  assert directory.is_dir() and not list(directory.iterdir())
  (directory / "NOTES.txt").write_text("mine")
  tokenizer_lib.train_tokenizer(["a wide seven", "a thin one"] * 3, str(directory), vocab_size=40)
  with pytest.raises(ValueError, match=r"holds files the demo did not write \(NOTES.txt\)"):
    demo._clear_demo_tokenizer(str(directory), 40)
  assert (directory / "NOTES.txt").read_text() == "mine" and len(list(directory.iterdir())) == 3
