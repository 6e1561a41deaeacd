"""Caption tokenizer: CharBPE trained offline on captions the test writes, the official file layout, padding,
truncation, lower-casing, [PAD] / [UNK] ids, deterministic eval ids and BPE dropout on training ids only."""

import json
import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from ctxrq_jax.data import tokenizer

COLOURS = ["red", "blue", "green", "yellow", "black", "white"]
THINGS = ["bus", "dog", "cat", "house", "bicycle", "mountain", "street", "painting"]
PLACES = ["on a city street", "in the desert", "on the seashore", "under a cloudy sky", "near a river"]


def _captions():
  return [f"A {c} {t} {p}." for c in COLOURS for t in THINGS for p in PLACES]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("bpe")
  tokenizer.train_tokenizer(_captions(), str(out), vocab_size=120)
  return str(out)


def test_trained_files_follow_the_official_layout(tok_dir):
  assert sorted(os.listdir(tok_dir)) == ["bpe-120-merges.txt", "bpe-120-vocab.json"]
  with open(os.path.join(tok_dir, "bpe-120-vocab.json")) as f:
    vocab = json.load(f)
  assert vocab["[PAD]"] == 0 and vocab["[UNK]"] == 1
  assert 40 < len(vocab) <= 120
  assert sorted(vocab.values()) == list(range(len(vocab)))
  with open(os.path.join(tok_dir, "bpe-120-merges.txt")) as f:
    header, first = f.readline(), f.readline()
  assert header.startswith("#version") and len(first.split()) == 2
  assert tokenizer.default_prefix(16384) == "bpe-16k"


def test_ids_pad_truncate_lowercase_and_unknown(tok_dir):
  tok = tokenizer.CaptionTokenizer.from_directory(tok_dir, context_length=8)
  ids = tok.encode(["A Red Bus", "a red bus", "", "a red bus on a city street in the desert near a river", "a жbus"])
  assert ids.shape == (5, 8) and ids.dtype == np.int32
  assert (ids >= 0).all() and (ids < tok.vocab_size).all()
  np.testing.assert_array_equal(ids[0], ids[1])  # lower-cased
  n = int((ids[1] != tokenizer.PAD_ID).sum())
  assert 0 < n < 8 and (ids[1, n:] == tokenizer.PAD_ID).all()  # padded with [PAD] = 0 after the caption
  np.testing.assert_array_equal(ids[2], tok.empty(1)[0])  # the empty caption is all [PAD]: the null condition
  assert (ids[3] != tokenizer.PAD_ID).all()  # truncated to 8 real tokens
  assert tokenizer.UNK_ID in ids[4]  # a character never seen in training
  assert tok.decode(ids[:2]) == ["a red bus", "a red bus"]


def test_eval_ids_are_deterministic_and_dropout_only_in_training(tok_dir):
  tok = tokenizer.CaptionTokenizer.from_directory(tok_dir, context_length=32, bpe_dropout=0.1)
  caption = ["a yellow bicycle under a cloudy sky near a river on the seashore"]
  eval_ids = tok.encode(caption)
  for _ in range(20):
    np.testing.assert_array_equal(tok.encode(caption), eval_ids)
  train_ids = tok.encode(caption * 50, train=True)
  assert (train_ids < tok.vocab_size).all()
  differs = (train_ids != eval_ids).any(axis=1)
  assert differs.any(), "BPE dropout 0.1 never changed the segmentation of a 13-word caption in 50 draws"
  # Dropout only splits merges: more (or as many) real tokens, never fewer, and the same text comes back.
  assert ((train_ids != 0).sum(1) >= (eval_ids != 0).sum()).all()
  assert set(tok.decode(train_ids)) == set(tok.decode(eval_ids))
  no_dropout = tokenizer.CaptionTokenizer.from_directory(tok_dir, bpe_dropout=0.0)
  np.testing.assert_array_equal(no_dropout.encode(caption * 5, train=True), np.repeat(eval_ids, 5, 0))


def _write_pair(directory, vocab, merges_text, prefix="x"):
  directory.mkdir()
  (directory / f"{prefix}-vocab.json").write_text(vocab if isinstance(vocab, str) else json.dumps(vocab))
  (directory / f"{prefix}-merges.txt").write_bytes(merges_text.encode("utf-8"))
  return tokenizer.CaptionTokenizer.from_directory(str(directory), context_length=8)


def test_fingerprint_names_the_behaviour_not_the_bytes(tmp_path, tok_dir):
  tok = tokenizer.CaptionTokenizer.from_directory(tok_dir, context_length=8)
  assert len(tok.fingerprint) == 64 and int(tok.fingerprint, 16) >= 0
  assert tokenizer.CaptionTokenizer.from_directory(tok_dir, context_length=32, bpe_dropout=0.0).fingerprint == (
      tok.fingerprint)  # context length and dropout are recorded apart
  with open(os.path.join(tok_dir, "bpe-120-vocab.json")) as f:
    vocab = json.load(f)
  with open(os.path.join(tok_dir, "bpe-120-merges.txt")) as f:
    merges_text = f.read()
  lines = merges_text.splitlines()
  # Re-serialised: keys in reverse order with indentation, merges with CRLF, no version header, another prefix.
  same = _write_pair(tmp_path / "same", json.dumps(dict(reversed(list(vocab.items()))), indent=2),
                     "\r\n".join(lines[1:]) + "\r\n", prefix="bpe-16k")
  assert same.fingerprint == tok.fingerprint
  # Two tokens' ids swapped, or two merges in the other order: other ids for some caption, another fingerprint.
  swapped = dict(vocab)
  a, b = [t for t in sorted(vocab, key=vocab.get) if t.endswith("</w>") and len(t) > 6][:2]  # two whole words
  swapped[a], swapped[b] = vocab[b], vocab[a]
  other_ids = _write_pair(tmp_path / "ids", swapped, merges_text)
  reordered = _write_pair(tmp_path / "merges", vocab, "\n".join([lines[0], lines[2], lines[1], *lines[3:]]) + "\n")
  trained = tmp_path / "trained"
  tokenizer.train_tokenizer([c.replace("a ", "the ") for c in _captions()], str(trained), vocab_size=120)
  others = [other_ids, reordered, tokenizer.CaptionTokenizer.from_directory(str(trained), context_length=8)]
  assert len({tok.fingerprint, *(t.fingerprint for t in others)}) == 4
  caption = [f"{a[:-4]} {b[:-4]}"]
  assert (other_ids.encode(caption) != tok.encode(caption)).any()


def test_captions_without_tokens_and_truncated_prompts(tok_dir, caplog):
  tok = tokenizer.CaptionTokenizer.from_directory(tok_dir, context_length=8)
  # The normalizer deletes control and format characters, which `str.strip` keeps: such captions are all [PAD], the
  # null condition, as is a literal '[PAD]' (a special token).
  captions = ["", "\u200b", "\x00\x01", "\ufeff ", "[PAD]", "a red bus", "a \u200bred bus"]
  assert tok.is_null(captions).tolist() == [True] * 5 + [False] * 2
  exact, longer = "a red bus on a city street in", "a red bus on a city street in the desert"  # 8 tokens, 10
  assert tok.truncated(["a red bus", exact, longer, ""]).tolist() == [False, False, True, False]
  with caplog.at_level(logging.WARNING, logger=tokenizer.__name__):
    ids = tok.encode_prompts(["a red bus", longer, exact, longer + " near a river"])
  np.testing.assert_array_equal(ids, tok.encode(["a red bus", longer, exact, longer + " near a river"]))
  assert "2 of 4 prompt(s) are longer than 8 tokens and were truncated to their first 8" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger=tokenizer.__name__):
    tok.encode_prompts(["a red bus", exact])
  assert not caplog.text
  for bad in ("\u200b", "\x00", " \ufeff", "[PAD]"):
    with pytest.raises(ValueError, match=re.escape(repr(bad)) + " has no tokens"):
      tok.encode_prompts(["a red bus", bad])


def test_read_captions_splits_lines_at_newlines_only(tmp_path):
  path = tmp_path / "captions.txt"
  # NEL (\x85, a mis-decoded cp1252 '...'), U+2028, \v and \x1c end lines for `str.splitlines`, not in a file.
  path.write_bytes("img0.jpg\ta dog\x85on  grass\r\n\u2028\nthird\x0bline\x1cends\n\n".encode("utf-8"))
  assert tokenizer.read_captions(str(path)) == ["a dog on grass", "third line ends"]


def test_bad_files_and_inputs_are_named(tmp_path, tok_dir):
  with pytest.raises(ValueError, match="exactly one"):
    tokenizer.find_files(str(tmp_path))
  with pytest.raises(ValueError, match="does not exist"):
    tokenizer.find_files(str(tmp_path / "missing"))
  with open(os.path.join(tok_dir, "bpe-120-vocab.json")) as f:
    vocab = json.load(f)
  vocab["[PAD]"], vocab["[UNK]"] = 1, 0
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "x-vocab.json").write_text(json.dumps(vocab))
  (bad / "x-merges.txt").write_text(open(os.path.join(tok_dir, "bpe-120-merges.txt")).read())
  with pytest.raises(ValueError, match=r"\[PAD\] to 0"):
    tokenizer.CaptionTokenizer.from_directory(str(bad))
  tok = tokenizer.CaptionTokenizer.from_directory(tok_dir)
  with pytest.raises(ValueError, match="single string"):
    tok.encode("a dog")
  with pytest.raises(ValueError, match="caption 1"):
    tok.encode(["a dog", 3])
  with pytest.raises(ValueError, match="already holds"):
    tokenizer.train_tokenizer(["a b"], tok_dir, vocab_size=50)


def test_train_command(tmp_path):
  captions = tmp_path / "captions.txt"
  captions.write_text("\n".join(f"img{i}.jpg\t{c}" for i, c in enumerate(_captions())) + "\n\n")
  out = tmp_path / "tok"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = subprocess.run([sys.executable, "-m", "ctxrq_jax.tokenize", "train", f"--captions={captions}",
                        "--vocab_size=100", f"--out={out}"], capture_output=True, text=True, env=env, check=False)
  assert run.returncode == 0, run.stderr
  assert "trained on 240 captions" in run.stdout
  assert sorted(os.listdir(out)) == ["bpe-100-merges.txt", "bpe-100-vocab.json"]
  run = subprocess.run([sys.executable, "-m", "ctxrq_jax.tokenize", "train", f"--captions={tmp_path / 'nope.txt'}",
                        f"--out={out}"], capture_output=True, text=True, env=env, check=False)
  assert run.returncode == 2 and run.stderr.strip().startswith("error:") and "nope.txt" in run.stderr


def test_training_is_a_function_of_the_captions(tmp_path):
  # The tokenizers library numbered the end-of-word characters (`t</w>`, ...) and broke ties between equally frequent
  # pairs in the order of a hash map seeded per process: two trainings on the same captions gave permuted ids (and
  # with many ties other merges). Two processes must write the same bytes.
  captions = ["a wide seven", "a thin one", "the wide tan ox", "a red dog", "two ten toe", "ant net nod"] * 3
  (tmp_path / "captions.txt").write_text("\n".join(captions) + "\n")
  files, env = [], dict(os.environ, JAX_PLATFORMS="cpu")
  for name in ("a", "b"):
    run = subprocess.run([sys.executable, "-m", "ctxrq_jax.tokenize", "train", f"--captions={tmp_path / 'captions.txt'}",
                          "--vocab_size=60", f"--out={tmp_path / name}"], capture_output=True, text=True, env=env,
                         timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    files.append({f: (tmp_path / name / f).read_bytes() for f in ("bpe-60-vocab.json", "bpe-60-merges.txt")})
  assert files[0] == files[1]
  vocab = json.loads(files[0]["bpe-60-vocab.json"])
  assert vocab["[PAD]"] == tokenizer.EMPTY_CAPTION_ID == 0 and vocab["[UNK]"] == 1
  # Characters sorted, then the end-of-word ones, then the merges' tokens in merge order.
  tokens = sorted(vocab, key=vocab.__getitem__)
  chars = [t for t in tokens if len(t) == 1]
  finals = [t for t in tokens if len(t) == len("x</w>") and t.endswith("</w>")]
  assert tokens[2:2 + len(chars) + len(finals)] == sorted(chars) + sorted(finals)
  tok = tokenizer.CaptionTokenizer.from_directory(str(tmp_path / "a"), context_length=8)
  assert tok.decode(tok.encode(["a wide tan dog"])) == ["a wide tan dog"]


def test_stage2_run_records_its_tokenizer(tmp_path):
  assert not tokenizer.check_trained_tokenizer(str(tmp_path), "f" * 64, "codes")  # nothing recorded yet
  tokenizer.record_trained_tokenizer(str(tmp_path), "f" * 64, str(tmp_path / "codes"))
  assert tokenizer.check_trained_tokenizer(str(tmp_path), "f" * 64, "codes")
  with pytest.raises(ValueError, match=r"tokenized with another tokenizer \(fingerprint eeeeeeeeeeee\) than the one "
                     r"the stage-2 model .* was trained on \(ffffffffffff"):
    tokenizer.check_trained_tokenizer(str(tmp_path), "e" * 64, "codes")
