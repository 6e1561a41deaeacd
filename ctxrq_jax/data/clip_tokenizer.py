"""CLIP's text tokenizer (OpenAI's `SimpleTokenizer`): byte-level BPE over lower-cased, cleaned text, ids framed by
<|startoftext|> ... <|endoftext|> and 0-padded or truncated to the context length (77), the last id kept EOT.

What it does, as OpenAI's tokenizer does (open_clip's is the test oracle, `tests/unit/data/test_clip_tokenizer.py`):
  1. clean: ftfy.fix_text, HTML entities unescaped twice, surrounding whitespace stripped; runs of whitespace become
     one space; lower case.
  2. split into words by OpenAI's pattern  's|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+  (letters
     runs, single digits, punctuation runs; whitespace dropped); <|startoftext|> and <|endoftext|> in the text are
     their own tokens.
  3. each word's UTF-8 bytes as GPT-2's printable byte alphabet, `</w>` on its last symbol, merged by the ranks of
     the vocabulary file's merge list.
  4. [49406 (<|startoftext|>)] + ids + [49407 (<|endoftext|>)], then truncated to the context length with the last
     id set to EOT, or padded with 0.
Steps 2-3 run in the Hugging Face `tokenizers` library (a Split pre-tokenizer with the pattern, the byte-level
alphabet, a BPE model with the `</w>` suffix); step 1 in Python, since `tokenizers` has no ftfy.

The vocabulary file is OpenAI's `bpe_simple_vocab_16e6.txt.gz` (a header line, then one merge "a b" per line; the
first 48,894 merges are used). It does not ship with this project; it ships inside the `open_clip` package
(PyPI open-clip-torch: open_clip/bpe_simple_vocab_16e6.txt.gz) and OpenAI's `clip` package
(clip/bpe_simple_vocab_16e6.txt.gz). The ids: the 256 byte symbols (GPT-2's byte order), the same with `</w>`, one
per merge in rank order, then <|startoftext|> and <|endoftext|>; 49,408 in all.
"""

from __future__ import annotations

import gzip
import html
import os
from typing import Sequence

import ftfy
import numpy as np

from ctxrq_jax.core import paths

VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
CONTEXT_LENGTH = 77
NUM_MERGES = 49152 - 256 - 2  # OpenAI's: a 49,408-id vocabulary
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
END_OF_WORD = "</w>"
PAD_ID = 0
WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def vocab_missing_message(path: str | os.PathLike) -> str:
  return (f"CLIP BPE vocabulary not found at {os.fspath(path)}: pass OpenAI's {VOCAB_FILENAME} (--clip_vocab=PATH); "
          f"it ships inside the open_clip package (pip install open-clip-torch: open_clip/{VOCAB_FILENAME}) and "
          f"OpenAI's clip package (clip/{VOCAB_FILENAME})")


def require_vocab_file(path: str | os.PathLike | None) -> str:
  """`path` (or `path/bpe_simple_vocab_16e6.txt.gz` for a directory); FileNotFoundError naming the file otherwise."""
  if path is None:
    raise FileNotFoundError(vocab_missing_message("(not given)"))
  return paths.require_file(path, VOCAB_FILENAME, vocab_missing_message)


def _byte_order() -> list[int]:
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  return printable + [b for b in range(256) if b not in set(printable)]


def byte_symbols() -> dict[int, str]:
  """GPT-2's byte alphabet: the printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves, every
  other byte, in increasing order, for chr(256), chr(257), ... Ordered as the vocabulary's first 256 ids are: the
  printable bytes first, then the others."""
  order = _byte_order()
  return {b: chr(b) if i < 188 else chr(256 + i - 188) for i, b in enumerate(order)}


def clean(text: str) -> str:
  """OpenAI's text cleaning: ftfy.fix_text, HTML unescaped twice, whitespace runs to one space, stripped, lower."""
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return " ".join(text.split()).lower()


def read_merges(path: str | os.PathLike, num_merges: int = NUM_MERGES) -> list[tuple[str, str]]:
  """The first `num_merges` merges of a vocabulary file (after its header line); ValueError for a malformed line."""
  path = require_vocab_file(path)
  try:
    with paths.path(path).open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
      lines = f.read().split("\n")
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not a gzipped BPE merge list ({VOCAB_FILENAME}): {e}") from e
  while lines and not lines[-1].strip():  # a final newline
    lines.pop()
  merges = []
  for i, line in enumerate(lines[1:num_merges + 1], start=2):
    parts = line.split()
    if len(parts) != 2:
      raise ValueError(f"{path}: line {i} is not a merge 'a b': {line!r}")
    merges.append((parts[0], parts[1]))
  return merges


class CLIPTokenizer:
  """OpenAI CLIP's tokenizer over a vocabulary file (module docstring).

  Args:
    vocab_path: `bpe_simple_vocab_16e6.txt.gz` (or a directory holding it).
    context_length: ids per caption (CLIP: 77).
  """

  def __init__(self, vocab_path: str | os.PathLike, *, context_length: int = CONTEXT_LENGTH):
    from tokenizers import AddedToken  # pylint: disable=g-import-not-at-top
    from tokenizers import Regex  # pylint: disable=g-import-not-at-top
    from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
    from tokenizers import models  # pylint: disable=g-import-not-at-top
    from tokenizers import pre_tokenizers  # pylint: disable=g-import-not-at-top
    if context_length < 2:
      raise ValueError(f"context_length must be >= 2 (start and end of text), got {context_length}")
    self.vocab_path = require_vocab_file(vocab_path)
    self.context_length = int(context_length)
    merges = read_merges(self.vocab_path)
    symbols = list(byte_symbols().values())
    vocab = [*symbols, *(s + END_OF_WORD for s in symbols), *(a + b for a, b in merges), START_OF_TEXT, END_OF_TEXT]
    ids = {token: i for i, token in enumerate(vocab)}
    if len(ids) != len(vocab):
      raise ValueError(f"{self.vocab_path}: the merge list repeats a token")
    self.vocab_size = len(vocab)
    self.sot_id, self.eot_id = ids[START_OF_TEXT], ids[END_OF_TEXT]
    tok = Tokenizer(models.BPE(vocab=ids, merges=merges, end_of_word_suffix=END_OF_WORD))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.add_special_tokens([AddedToken(START_OF_TEXT, special=True), AddedToken(END_OF_TEXT, special=True)])
    self._tokenizer = tok

  def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
    """The BPE ids of each cleaned text, without start/end of text and without truncation."""
    if isinstance(texts, str):
      raise TypeError("token_ids takes a sequence of strings, not one string")
    encodings = self._tokenizer.encode_batch([clean(t) for t in texts], add_special_tokens=False)
    return [e.ids for e in encodings]

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """int32 [N, context_length]: SOT, the BPE ids, EOT, then 0s; a long text keeps its first context_length - 2
    ids and ends with EOT (OpenAI's `tokenize(..., truncate=True)`)."""
    out = np.full((len(texts), self.context_length), PAD_ID, np.int32)
    for i, ids in enumerate(self.token_ids(texts)):
      row = [self.sot_id, *ids][:self.context_length - 1] + [self.eot_id]
      out[i, :len(row)] = row
    return out

  def decode(self, ids: Sequence[int]) -> str:
    """The text of one row of `encode` (what lies between SOT and the first EOT), words joined by spaces."""
    row = [int(i) for i in ids]
    if row and row[0] == self.sot_id:
      row = row[1:]
    if self.eot_id in row:
      row = row[:row.index(self.eot_id)]
    to_byte = {s: b for b, s in byte_symbols().items()}
    text = "".join(self._tokenizer.id_to_token(i) for i in row)
    words = (bytes(to_byte[c] for c in w).decode("utf-8", errors="replace") for w in text.split(END_OF_WORD))
    return " ".join(w for w in words if w)
