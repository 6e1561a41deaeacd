"""The captions of a caption code dataset, and the check that a tokenizer is the one its records were encoded with.

Beside the shards of a caption split (`data.codes`), `encode captions` writes `captions-<split>.txt`, each record's
caption on one line in record order (`captions-<split>-partPPPPPofQQQQQ.txt` per process when several wrote it), for
CLIP score and prompts. Its metadata's `source` records the tokenizer: `tokenizer_sha256`, the tokenizer's
`fingerprint` (datasets encoded since this key was added), `bpe_dropout_splits` and `bpe_dropout`.

Sampling from a text-conditioned model tokenizes prompts itself, with the BPE files named by the run's config or by
`--tokenizer_dir`. A different tokenizer of the same vocabulary size gives every prompt ids the model never learnt
for its words, and nothing downstream notices: the samples simply ignore the prompt. `check_tokenizer` compares the
tokenizer with the dataset: its fingerprint with the recorded one, or, for a dataset encoded before fingerprints were
recorded, its deterministic ids of the stored captions with the stored ids (of a split tokenized without BPE dropout).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ctxrq_jax.core import paths
from ctxrq_jax.data import codes as code_data

log = logging.getLogger(__name__)

CAPTIONS_FILE = "captions-{split}.txt"
FINGERPRINT_KEY = "tokenizer_sha256"
# Records re-tokenized by `check_tokenizer` when the dataset records no fingerprint.
CHECK_RECORDS = 64


def captions_file(split: str, process_index: int = 0, process_count: int = 1) -> str:
  """The captions file of `split`, or of process `process_index`'s part of it when `process_count` > 1."""
  if process_count == 1:
    return CAPTIONS_FILE.format(split=split)
  return f"captions-{split}-part{process_index:05d}of{process_count:05d}.txt"


def read_captions(codes_dir: str, split: str) -> list[str]:
  """The captions `encode captions` wrote for `split`, one per record in record order."""
  try:
    sizes = code_data.read_metadata(codes_dir).part_sizes(split)
  except ValueError:
    sizes = (None,)  # named below as a missing captions file
  out = []
  for part, size in enumerate(sizes):
    path = paths.path(codes_dir) / captions_file(split, part, len(sizes))
    if not path.exists():
      raise ValueError(f"{path} not found: {codes_dir} is not a caption code dataset, or has no split {split!r}")
    lines = [line.rstrip("\n") for line in path.read_bytes().decode("utf-8").splitlines()]
    if size is not None and len(lines) != size:
      where = f"part {part}" if len(sizes) > 1 else f"split {split!r}"
      raise ValueError(f"{path} holds {len(lines)} captions; the metadata gives {where} {size} records")
    out.extend(lines)
  return out


def check_tokenizer(codes_dir: str, tokenizer: Any, *, num_records: int = CHECK_RECORDS) -> str:
  """Raises ValueError unless `tokenizer` (a `data.tokenizer.CaptionTokenizer`) is the one `codes_dir` was encoded
  with; returns how it was checked: 'fingerprint', 'ids' or 'unchecked'.

  'fingerprint': the dataset records one, and it equals `tokenizer.fingerprint`. 'ids': no fingerprint recorded
  (an older dataset); the tokenizer's deterministic ids of the first `num_records` captions of a split written
  without BPE dropout equal the stored ids. 'unchecked': neither is possible (no fingerprint, and every split was
  tokenized with dropout or has no captions file); a warning is logged.
  """
  meta = code_data.read_metadata(codes_dir)
  if not meta.is_text:
    raise ValueError(f"{codes_dir} is conditioned on class labels, not captions")
  source = meta.source if isinstance(meta.source, dict) else {}
  if tokenizer.context_length != meta.cond_length:
    raise ValueError(f"the tokenizer's context length is {tokenizer.context_length}; {codes_dir} holds "
                     f"{meta.cond_length} tokens per caption")
  recorded = source.get(FINGERPRINT_KEY)
  names = str(paths.path(tokenizer.files[0]).parent)
  if recorded:
    if recorded != tokenizer.fingerprint:
      encoded_with = source.get("tokenizer") or ["?"]
      raise ValueError(f"the tokenizer in {names} is not the one {codes_dir} was encoded with (fingerprint "
                       f"{tokenizer.fingerprint[:12]}; the data set records {recorded[:12]}, of "
                       f"{paths.path(encoded_with[0]).parent}); pass --tokenizer_dir=DIR of the BPE files the model "
                       "was trained on")
    return "fingerprint"
  dropout_splits = set(source.get("bpe_dropout_splits", ())) if source.get("bpe_dropout", 0.0) else set()
  for split in meta.splits:
    if split in dropout_splits or meta.num_examples(split) == 0:
      continue
    try:
      captions = read_captions(codes_dir, split)[:num_records]
    except ValueError:
      continue
    records = code_data.CodeSource(codes_dir, split, meta)
    variants = meta.num_cond_variants(split)
    where = f" of code split {split!r} in {codes_dir}"
    stored = np.stack([code_data.decode_record_variants(records[i], i, meta, where, variants)[1][0]
                       for i in range(len(captions))])
    ids = tokenizer.encode(captions)
    wrong = np.flatnonzero(np.any(ids != stored, axis=1))
    if wrong.size:
      i = int(wrong[0])
      raise ValueError(f"the tokenizer in {names} is not the one {codes_dir} was encoded with: it gives {wrong.size} "
                       f"of {len(captions)} {split!r} captions other ids than the stored ones (record {i}: "
                       f"{captions[i]!r}); pass --tokenizer_dir=DIR of the BPE files the model was trained on")
    return "ids"
  log.warning("cannot check the tokenizer in %s against %s: the dataset records no tokenizer fingerprint and has no "
              "split tokenized without BPE dropout", names, codes_dir)
  return "unchecked"


__all__ = ["CAPTIONS_FILE", "CHECK_RECORDS", "FINGERPRINT_KEY", "captions_file", "check_tokenizer", "read_captions"]
