"""A caption code dataset's captions and the tokenizer check (ctxrq_jax/data/code_captions.py): the tokenizer the
records were encoded with passes, any other (same vocabulary size included) is refused with a one-line error, by
fingerprint where the dataset records one and by re-tokenizing stored captions where it does not."""

import logging

import numpy as np
import pytest

from ctxrq_jax.data import code_captions
from ctxrq_jax.data import codes as code_data
from ctxrq_jax.data import tokenizer as tokenizer_lib

CAPTIONS = [f"a {c} {t} {p}" for c in ("red", "blue", "green", "black") for t in ("dog", "bus", "house")
            for p in ("in the park", "on a street")]
L = 8


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
  """The dataset's tokenizer and another one of the same vocabulary size trained on other captions."""
  root = tmp_path_factory.mktemp("bpe")
  right, wrong = str(root / "right"), str(root / "wrong")
  tokenizer_lib.train_tokenizer(CAPTIONS, right, vocab_size=48)
  tokenizer_lib.train_tokenizer([c.replace("a ", "one ").replace("the ", "some ") for c in CAPTIONS], wrong,
                                vocab_size=48)
  tok = tokenizer_lib.CaptionTokenizer.from_directory(right, context_length=L)
  other = tokenizer_lib.CaptionTokenizer.from_directory(wrong, context_length=L)
  assert tok.vocab_size == other.vocab_size == 48
  return tok, other


def _write(out, tok, *, fingerprint, dropout_splits=("train",), captions_files=True):
  source = {"tokenizer": [f.rsplit("/", 1)[-1] for f in tok.files], "bpe_dropout_splits": list(dropout_splits),
            "bpe_dropout": 0.1}
  if fingerprint:
    source[code_captions.FINGERPRINT_KEY] = tok.fingerprint
  splits = {"train": CAPTIONS[:16], "validation": CAPTIONS[16:]}
  rng = np.random.default_rng(0)
  with code_data.CodeDatasetWriter(str(out), code_shape=(2, 2, 1), codebook=np.ones((4, 2), np.float32),
                                   num_classes=0, cond_length=L, cond_vocab_size=tok.vocab_size, source=source) as w:
    for split, texts in splits.items():
      w.write(split, rng.integers(0, 4, (len(texts), 2, 2, 1)), tok.encode(texts, train=split in dropout_splits))
      if captions_files:
        (out / code_captions.captions_file(split)).write_text("".join(f"{t}\n" for t in texts))
  return str(out)


def test_the_encoding_tokenizer_passes_and_another_is_refused(tmp_path, tokenizers):
  tok, other = tokenizers
  codes_dir = _write(tmp_path / "codes", tok, fingerprint=True)
  assert code_captions.read_captions(codes_dir, "validation") == CAPTIONS[16:]
  assert code_captions.check_tokenizer(codes_dir, tok) == "fingerprint"
  with pytest.raises(ValueError, match=r"is not the one .* was encoded with \(fingerprint"):
    code_captions.check_tokenizer(codes_dir, other)
  # The same tokenizer with another context length cannot read the stored ids either.
  longer = tokenizer_lib.CaptionTokenizer(*tok.files, context_length=L + 1)
  with pytest.raises(ValueError, match="context length is 9"):
    code_captions.check_tokenizer(codes_dir, longer)


def test_older_datasets_are_checked_by_their_stored_ids(tmp_path, tokenizers, caplog):
  tok, other = tokenizers
  codes_dir = _write(tmp_path / "codes", tok, fingerprint=False)  # encoded before fingerprints were recorded
  assert code_captions.check_tokenizer(codes_dir, tok) == "ids"  # from the validation split (no dropout)
  with pytest.raises(ValueError, match=r"gives \d+ of 8 'validation' captions other ids"):
    code_captions.check_tokenizer(codes_dir, other)
  # Every split tokenized with dropout and no fingerprint: nothing exact to compare, so a warning, not an error.
  unchecked = _write(tmp_path / "dropout", tok, fingerprint=False, dropout_splits=("train", "validation"))
  with caplog.at_level(logging.WARNING):
    assert code_captions.check_tokenizer(unchecked, other) == "unchecked"
  assert "cannot check the tokenizer" in caplog.text
  no_files = _write(tmp_path / "nofiles", tok, fingerprint=False, captions_files=False)
  assert code_captions.check_tokenizer(no_files, other) == "unchecked"


def test_class_datasets_and_missing_captions_are_named(tmp_path, tokenizers):
  tok, _ = tokenizers
  with code_data.CodeDatasetWriter(str(tmp_path / "labels"), code_shape=(2, 2, 1), codebook=np.ones((4, 2)),
                                   num_classes=3, source="test") as w:
    w.write("train", np.zeros((2, 2, 2, 1), np.int64), np.array([0, 2]))
  with pytest.raises(ValueError, match="class labels, not captions"):
    code_captions.check_tokenizer(str(tmp_path / "labels"), tok)
  with pytest.raises(ValueError, match="not a caption code dataset, or has no split 'test'"):
    code_captions.read_captions(str(tmp_path / "labels"), "test")
