"""Caption tokenizer: the lower-cased character-level BPE of the official text-to-image model (Hugging Face
`tokenizers`' CharBPETokenizer), captions padded with [PAD] or truncated to a fixed context length.

Facts of the official CC-3M model (kakaobrain/rq-vae-transformer, `configs/cc3m/cc3m-rqtransformer-8x8x4-650M.yaml`
and `rqvae/txtimg_datasets/`): `txt_tok_name: bpe16k_huggingface`, a CharBPETokenizer read from the pair
`bpe-16k-vocab.json` / `bpe-16k-merges.txt` with `unk_token="[UNK]"` and `lowercase=True`; 16,384 tokens with
[PAD] = 0 and [UNK] = 1; padded with [PAD] and truncated to `context_length: 32`; `bpe_dropout: 0.1` on the training
split only (the validation split is tokenized without dropout).

A tokenizer directory holds one such pair, `<prefix>-vocab.json` and `<prefix>-merges.txt` (the official files, or
those `python -m ctxrq_jax.tokenize train` writes). The empty caption tokenizes to all [PAD]: the "no caption"
condition of classifier-free guidance (`EMPTY_CAPTION_ID`).

BPE dropout is drawn by the `tokenizers` library's own (unseeded) random generator: ids with dropout are not
reproducible run to run, which is why only the training split uses them; `encode(..., train=False)` is
deterministic.

`CaptionTokenizer.fingerprint` names the tokenizer by what it does (its id of every token and its merges in order,
not the files' bytes): the caption encoder records it in the code dataset, and sampling refuses a tokenizer whose
fingerprint differs from the one the model's captions were encoded with (`data.code_captions.check_tokenizer`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from typing import Iterable, Sequence

import numpy as np

from ctxrq_jax.core import paths
from ctxrq_jax.data import fingerprints

log = logging.getLogger(__name__)

PAD = "[PAD]"
UNK = "[UNK]"
PAD_ID = 0
UNK_ID = 1
# The condition of an empty caption is all [PAD]: the null condition for classifier-free guidance.
EMPTY_CAPTION_ID = PAD_ID
# Official values (cc3m-rqtransformer-8x8x4-650M.yaml).
VOCAB_SIZE = 16384
CONTEXT_LENGTH = 32
BPE_DROPOUT = 0.1
MIN_FREQUENCY = 2
VOCAB_SUFFIX = "-vocab.json"
MERGES_SUFFIX = "-merges.txt"
END_OF_WORD = "</w>"  # CharBPE's suffix of a word's last token


def default_prefix(vocab_size: int) -> str:
  """'bpe-16k' for 16,384 tokens (the official name), else 'bpe-<vocab_size>'."""
  return f"bpe-{vocab_size // 1024}k" if vocab_size % 1024 == 0 else f"bpe-{vocab_size}"


def find_files(directory: str) -> tuple[str, str]:
  """The (vocab.json, merges.txt) pair in `directory`; ValueError unless there is exactly one pair."""
  directory = os.fspath(directory)
  if not paths.path(directory).is_dir():
    raise ValueError(f"tokenizer directory {directory} does not exist")
  vocabs = sorted(str(p) for p in paths.path(directory).iterdir() if p.name.endswith(VOCAB_SUFFIX))
  pairs = [(v, v[:-len(VOCAB_SUFFIX)] + MERGES_SUFFIX) for v in vocabs]
  pairs = [p for p in pairs if paths.path(p[1]).exists()]
  if len(pairs) != 1:
    raise ValueError(f"{directory} must hold exactly one '<prefix>{VOCAB_SUFFIX}' + '<prefix>{MERGES_SUFFIX}' pair "
                     f"(e.g. bpe-16k-vocab.json, bpe-16k-merges.txt), found {len(pairs)}")
  return pairs[0]


class CaptionTokenizer:
  """Captions -> int32 [B, L] ids; `train=True` applies BPE dropout (training split only).

  Attributes:
    context_length: L, tokens per caption (pad with [PAD] = 0, truncate longer captions).
    vocab_size: number of ids; every id lies in [0, vocab_size).
  """

  def __init__(self, vocab_file: str, merges_file: str, *, context_length: int = CONTEXT_LENGTH,
               bpe_dropout: float = BPE_DROPOUT):
    from tokenizers import CharBPETokenizer  # pylint: disable=g-import-not-at-top

    if isinstance(context_length, bool) or not isinstance(context_length, (int, np.integer)) or context_length < 1:
      raise ValueError(f"context_length must be a positive integer, got {context_length!r}")
    if not 0.0 <= float(bpe_dropout) < 1.0:
      raise ValueError(f"bpe_dropout must be in [0, 1), got {bpe_dropout}")
    for path in (vocab_file, merges_file):
      if not paths.path(path).exists():
        raise ValueError(f"tokenizer file {path} does not exist")
    self.context_length = int(context_length)
    self.bpe_dropout = float(bpe_dropout)
    self.files = (os.fspath(vocab_file), os.fspath(merges_file))
    try:
      self._eval = self._build(CharBPETokenizer, None)
      self._train = self._build(CharBPETokenizer, self.bpe_dropout or None)
    except Exception as e:  # tokenizers raises its own exception types on malformed files
      raise ValueError(f"cannot read the BPE pair {vocab_file} / {merges_file}: {e}") from e
    vocab = self._eval.get_vocab()
    if vocab.get(PAD) != PAD_ID or vocab.get(UNK) != UNK_ID:
      raise ValueError(f"{vocab_file} must map {PAD} to {PAD_ID} and {UNK} to {UNK_ID}, got "
                       f"{PAD}={vocab.get(PAD)}, {UNK}={vocab.get(UNK)}")
    self.vocab_size = self._eval.get_vocab_size()
    if sorted(vocab.values()) != list(range(self.vocab_size)):
      raise ValueError(f"{vocab_file}: ids are not the contiguous range [0, {self.vocab_size})")

  def _build(self, cls, dropout):
    # The tokenizers library reads local files: a bucket's pair is fetched once (`paths.local_copy`).
    tok = cls.from_file(paths.local_copy(self.files[0]), paths.local_copy(self.files[1]), unk_token=UNK, lowercase=True, dropout=dropout)
    tok.add_special_tokens([PAD])
    tok.enable_padding(length=self.context_length, pad_id=PAD_ID, pad_token=PAD)
    tok.enable_truncation(max_length=self.context_length)
    return tok

  @functools.cached_property
  def fingerprint(self) -> str:
    """SHA-256 (hex) of the tokenizer's behaviour: its tokens in id order and its merges in order.

    Two tokenizers with the same fingerprint give every caption the same ids; re-serialising the vocabulary JSON
    (key order, spacing) or the merges file's version header and line endings leaves it unchanged. Context length
    and BPE dropout are not part of it (the code dataset records those separately).
    """
    vocab = self._eval.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)  # ids are the contiguous range [0, vocab_size) (checked)
    # Lines end at "\n" only, as the tokenizers library reads the file (not `str.splitlines`'s other separators).
    lines = paths.path(self.files[1]).read_bytes().decode("utf-8").split("\n")
    merges = [line.strip() for line in lines if line.strip() and not line.startswith("#version")]
    content = json.dumps({"tokens": tokens, "merges": merges, "lowercase": True}, ensure_ascii=False)
    return hashlib.sha256(content.encode("utf-8")).hexdigest()

  @classmethod
  def from_directory(cls, directory: str, **kwargs) -> CaptionTokenizer:
    """Loads the vocab/merges pair of `directory` (see `find_files`)."""
    return cls(*find_files(directory), **kwargs)

  def encode(self, captions: Sequence[str], *, train: bool = False) -> np.ndarray:
    """[B] captions -> int32 [B, L] ids in [0, vocab_size); deterministic unless `train` (BPE dropout)."""
    if isinstance(captions, str):
      raise ValueError("encode takes a sequence of captions, got a single string")
    captions = list(captions)
    for i, c in enumerate(captions):
      if not isinstance(c, str):
        raise ValueError(f"caption {i} is {type(c).__name__}, not a string")
    if not captions:
      return np.zeros((0, self.context_length), np.int32)
    tok = self._train if train else self._eval
    ids = np.asarray([e.ids for e in tok.encode_batch(captions)], np.int32)
    assert ids.shape == (len(captions), self.context_length), ids.shape
    return ids

  def is_null(self, captions: Sequence[str]) -> np.ndarray:
    """bool [B]: whether each caption's ids are all [PAD], i.e. the null condition (`EMPTY_CAPTION_ID`).

    True for the empty caption, and also for one the normalizer empties although `str.strip` keeps it: only control
    or format characters (\\x00, U+200B zero-width space, U+FEFF, ...), which it deletes, or a literal '[PAD]'.
    """
    return _all_pad(self.encode(captions))

  def truncated(self, captions: Sequence[str]) -> np.ndarray:
    """bool [B]: whether each caption has more than L tokens (deterministic ids), so `encode` keeps its first L."""
    if isinstance(captions, str):
      raise ValueError("truncated takes a sequence of captions, got a single string")
    return np.asarray([bool(e.overflowing) for e in self._eval.encode_batch(list(captions))], bool)

  def encode_prompts(self, prompts: Sequence[str]) -> np.ndarray:
    """Prompts to sample from [P] -> deterministic ids int32 [P, L] (no BPE dropout).

    ValueError naming the first prompt whose ids are all [PAD] (`is_null`): its condition would be the null condition,
    an unconditional sample on which guidance has no effect. Prompts longer than L tokens are cut to their first L
    (as the official sampler does) with one warning saying how many.
    """
    prompts = list(prompts) if not isinstance(prompts, str) else prompts  # a single string: `encode` refuses it
    ids = self.encode(prompts)
    null = np.flatnonzero(_all_pad(ids))
    if null.size:
      raise ValueError(f"prompt {prompts[null[0]]!r} has no tokens (only spaces, control or zero-width characters, "
                       "or [PAD]): it would be the null condition, an unconditional sample; give it words")
    cut = int(self.truncated(prompts).sum())
    if cut:
      log.warning("%d of %d prompt(s) are longer than %d tokens and were truncated to their first %d (the model's "
                  "condition length)", cut, len(ids), self.context_length, self.context_length)
    return ids

  def decode(self, ids: np.ndarray) -> list[str]:
    """int [B, L] ids -> [B] captions (lower-cased, [PAD] dropped; BPE word boundaries restored)."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
      raise ValueError(f"ids must be [B, L], got shape {ids.shape}")
    return self._eval.decode_batch([[int(i) for i in row] for row in ids], skip_special_tokens=True)

  def empty(self, batch: int) -> np.ndarray:
    """The null condition: the ids of `batch` empty captions, int32 [batch, L] of [PAD]."""
    return np.full((batch, self.context_length), EMPTY_CAPTION_ID, np.int32)


def _all_pad(ids: np.ndarray) -> np.ndarray:
  """bool [B] of ids [B, L]: whether a row is all [PAD], the null condition."""
  return (np.asarray(ids) == PAD_ID).all(axis=1)


def read_captions(path: str) -> list[str]:
  """One caption per line (UTF-8); blank lines are skipped. A tab-separated line keeps its last field, so the
  official `<split>_list.txt` layout (image path, tab, caption) reads as captions too.

  Lines end at "\\n" (a "\\r" before it is dropped), not at the other separators of `str.splitlines` (\\x85,
  U+2028, \\x1c-\\x1e, \\v, \\f), which raw captions may hold; whitespace inside a caption becomes single spaces.
  """
  if not paths.path(path).exists():
    raise ValueError(f"caption file {path} does not exist")
  out = []
  for line in paths.path(path).read_bytes().decode("utf-8").split("\n"):
    line = " ".join(line.split("\t")[-1].split())
    if line:
      out.append(line)
  if not out:
    raise ValueError(f"caption file {path} holds no captions")
  return out


def train_tokenizer(captions: Iterable[str], out_dir: str, *, vocab_size: int = VOCAB_SIZE,
                    min_frequency: int = MIN_FREQUENCY, prefix: str | None = None) -> tuple[str, str]:
  """Trains a lower-cased CharBPE on `captions` with [PAD] = 0, [UNK] = 1; writes the pair into `out_dir`.

  Returns (vocab file, merges file), named `<prefix>-vocab.json`, `<prefix>-merges.txt` (prefix default
  `default_prefix(vocab_size)`, 'bpe-16k' for 16,384). The vocabulary can come out smaller than `vocab_size` when
  the captions hold fewer merges of at least `min_frequency` occurrences; the trained size is what the files hold.
  The files are a function of the captions and the settings: the same captions give byte-identical files in any
  process (`_train_bpe`; the tokenizers library's own trainer numbers some tokens, and breaks ties, in hash-map order).
  One difference from the library's trainer: every character of the captions enters the alphabet (the library keeps
  the 1,000 most frequent and drops the rest); captions in a few scripts never reach that limit.
  """
  if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 3:
    raise ValueError(f"vocab_size must be an integer >= 3, got {vocab_size!r}")
  if isinstance(min_frequency, bool) or not isinstance(min_frequency, (int, np.integer)) or min_frequency < 1:
    raise ValueError(f"min_frequency must be a positive integer, got {min_frequency!r}")
  captions = [c for c in captions if c.strip()]
  if not captions:
    raise ValueError("no captions to train a tokenizer on")
  prefix = prefix or default_prefix(int(vocab_size))
  out = paths.path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  existing = sorted(p.name for p in out.iterdir() if p.name.endswith(VOCAB_SUFFIX))
  if existing:
    raise ValueError(f"{out_dir} already holds a tokenizer ({existing[0]}); choose another --out")
  tokens, merges = _train_bpe(_word_counts(captions), vocab_size=int(vocab_size), min_frequency=int(min_frequency))
  vocab_json = json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False, separators=(",", ":"))
  merges_text = "".join(f"{a} {b}\n" for a, b in merges)
  # Merges first, the vocabulary last: `find_files` sees the pair only once both are in place.
  merges_file = str(paths.write_bytes(out / (prefix + MERGES_SUFFIX),
                                     f"#version: 0.2\n{merges_text}".encode("utf-8")))
  vocab_file = str(paths.write_bytes(out / (prefix + VOCAB_SUFFIX), vocab_json.encode("utf-8")))
  return vocab_file, merges_file


TRAINED_TOKENIZER_FILE = "tokenizer.json"  # in a stage-2 workdir: which tokenizer its captions were encoded with


def record_trained_tokenizer(workdir: str, fingerprint: str, codes_dir: str) -> None:
  """Writes WORKDIR/tokenizer.json: the `CaptionTokenizer.fingerprint` of the tokenizer whose ids a stage-2 run
  trains on (as the code dataset `codes_dir` records it); `check_trained_tokenizer` compares it."""
  fingerprints.record(workdir, TRAINED_TOKENIZER_FILE, fingerprint, codes_dir)


def check_trained_tokenizer(workdir: str, fingerprint: str, codes_dir: str) -> bool:
  """ValueError unless `fingerprint` (the tokenizer of `codes_dir`'s captions) is the one the stage-2 model in
  `workdir` was trained on; False when the run records none, True when it matches.

  Caption codes re-encoded with another tokenizer keep their shapes, so nothing else notices: the model would go on
  training on ids that now mean other tokens, and its prompts would be tokenized with the new ids.
  """
  return fingerprints.check(workdir, TRAINED_TOKENIZER_FILE, fingerprint, lambda saved: (
      f"the captions of {codes_dir} were tokenized with another tokenizer (fingerprint {str(fingerprint)[:12]}) than "
      f"the one the stage-2 model in {workdir} was trained on ({str(saved.get('sha256'))[:12]}, of "
      f"{saved.get('codes_dir')}): train stage 2 anew in another workdir, or point data.codes_dir at the caption "
      "codes it was trained on"))


def _word_counts(captions: Sequence[str]) -> dict[str, int]:
  """{word: occurrences} of the captions, split into words as CharBPETokenizer does (its own normalizer and
  pre-tokenizer: lower-cased, cleaned, split at whitespace and punctuation)."""
  from tokenizers import CharBPETokenizer  # pylint: disable=g-import-not-at-top

  backend = CharBPETokenizer(unk_token=UNK, lowercase=True)._tokenizer  # pylint: disable=protected-access
  counts: dict[str, int] = {}
  for caption in captions:
    for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(caption)):
      counts[word] = counts.get(word, 0) + 1
  return counts


def _train_bpe(word_counts: dict[str, int], *, vocab_size: int,
               min_frequency: int) -> tuple[list[str], list[tuple[str, str]]]:
  """Character-level BPE with the end-of-word suffix: (tokens in id order, merges in order).

  The algorithm of the tokenizers library's BpeTrainer (as CharBPETokenizer trains it): [PAD], [UNK], the
  characters, the words' last characters with `END_OF_WORD`, then repeatedly the most frequent adjacent pair (counted
  over every occurrence, weighted by word counts) merged into a new token, until `vocab_size` tokens or no pair
  occurs `min_frequency` times. The library numbers the end-of-word characters in the order of a hash map seeded
  anew in each process, and breaks ties between equally frequent pairs by those ids, so two trainings on the same
  captions gave permuted ids and even other merges. Here every order is fixed: the characters sorted, then the
  end-of-word ones sorted, and ties go to the pair of smaller (left, right) ids, so the result is a function of the
  captions alone.
  """
  import heapq  # pylint: disable=g-import-not-at-top

  chars = sorted({c for w in word_counts for c in w})
  finals = sorted({w[-1] + END_OF_WORD for w in word_counts if w})
  tokens = [PAD, UNK, *chars, *(t for t in finals if t not in chars)]
  ids = {t: i for i, t in enumerate(tokens)}
  words = [[*w[:-1], w[-1] + END_OF_WORD] for w in sorted(word_counts) if w]
  counts = [word_counts[w] for w in sorted(word_counts) if w]
  pair_counts: dict[tuple[str, str], int] = {}
  where: dict[tuple[str, str], set[int]] = {}
  for i, (symbols, n) in enumerate(zip(words, counts)):
    for pair in zip(symbols, symbols[1:]):
      pair_counts[pair] = pair_counts.get(pair, 0) + n
      where.setdefault(pair, set()).add(i)
  key = lambda pair: (-pair_counts[pair], ids[pair[0]], ids[pair[1]], pair)  # noqa: E731
  heap = [key(pair) for pair in pair_counts]
  heapq.heapify(heap)
  merges: list[tuple[str, str]] = []
  while len(tokens) < vocab_size and heap:
    neg, _, _, pair = heapq.heappop(heap)
    if pair_counts.get(pair, 0) != -neg:  # stale: its count changed since it was pushed
      if pair_counts.get(pair, 0) > 0:
        heapq.heappush(heap, key(pair))
      continue
    if -neg < max(min_frequency, 1):
      break
    a, b = pair
    new = a + b
    if new not in ids:
      ids[new] = len(tokens)
      tokens.append(new)
    merges.append(pair)
    changed = set()
    for i in sorted(where.pop(pair, ())):
      old, n = words[i], counts[i]
      merged, j = [], 0
      while j < len(old):  # left to right, non-overlapping, as the library merges a word
        if j + 1 < len(old) and old[j] == a and old[j + 1] == b:
          merged.append(new)
          j += 2
        else:
          merged.append(old[j])
          j += 1
      for p in zip(old, old[1:]):
        pair_counts[p] -= n
        changed.add(p)
      for p in zip(merged, merged[1:]):
        pair_counts[p] = pair_counts.get(p, 0) + n
        changed.add(p)
      for p in set(zip(old, old[1:])) - set(zip(merged, merged[1:])):
        where.get(p, set()).discard(i)
      for p in zip(merged, merged[1:]):
        where.setdefault(p, set()).add(i)
      words[i] = merged
    pair_counts.pop(pair, None)
    for p in changed:
      if p != pair and pair_counts.get(p, 0) > 0:
        heapq.heappush(heap, key(p))
      elif pair_counts.get(p, 1) <= 0:
        pair_counts.pop(p, None)
  return tokens, merges


__all__ = ["BPE_DROPOUT", "CONTEXT_LENGTH", "CaptionTokenizer", "EMPTY_CAPTION_ID", "PAD_ID", "TRAINED_TOKENIZER_FILE",
           "UNK_ID", "VOCAB_SIZE", "check_trained_tokenizer", "default_prefix", "find_files", "read_captions",
           "record_trained_tokenizer", "train_tokenizer"]
