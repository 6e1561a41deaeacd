"""Caption tokenizer files: train a lower-cased CharBPE offline, or show how captions tokenize.

  python -m ctxrq_jax.tokenize train --captions=captions.txt --vocab_size=16384 --out=DIR [--min_frequency=2]
  python -m ctxrq_jax.tokenize show --tokenizer=DIR --text="a red bus;a dog" [--context_length=32]

`train` writes `bpe-16k-vocab.json` + `bpe-16k-merges.txt` (the official file layout; `bpe-<N>` for other sizes)
with [PAD] = 0 and [UNK] = 1. The caption file holds one caption per line (a tab-separated line keeps its last
field, so the official `train_list.txt` works). ctxrq_jax/data/tokenizer.py has the details.
"""

from absl import app
from absl import flags

from ctxrq_jax.core import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("captions", None, "train: caption file, one caption per line.")
  flags.DEFINE_integer("vocab_size", 16384, "train: vocabulary size (the official tokenizer has 16,384).")
  flags.DEFINE_integer("min_frequency", 2, "train: a merge needs at least this many occurrences.")
  flags.DEFINE_string("out", None, "train: directory to write the vocab/merges pair into.")
  flags.DEFINE_string("tokenizer", None, "show: tokenizer directory (one vocab/merges pair).")
  flags.DEFINE_string("text", None, "show: captions separated by ';'.")
  flags.DEFINE_integer("context_length", 32, "show: tokens per caption.")


def main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in ("train", "show"):
    raise app.UsageError("usage: python -m ctxrq_jax.tokenize {train --captions=FILE --out=DIR | "
                         "show --tokenizer=DIR --text='a;b'}")
  from ctxrq_jax.data import tokenizer  # pylint: disable=g-import-not-at-top

  if argv[1] == "train":
    if not FLAGS.captions or not FLAGS.out:
      raise app.UsageError("train needs --captions and --out")
    captions = tokenizer.read_captions(FLAGS.captions)
    vocab, merges = tokenizer.train_tokenizer(captions, FLAGS.out, vocab_size=FLAGS.vocab_size,
                                              min_frequency=FLAGS.min_frequency)
    size = tokenizer.CaptionTokenizer(vocab, merges).vocab_size
    print(f"trained on {len(captions):,} captions: {size:,} tokens ([PAD]=0, [UNK]=1) -> {vocab}, {merges}")
    return
  if not FLAGS.tokenizer or FLAGS.text is None:
    raise app.UsageError("show needs --tokenizer and --text")
  tok = tokenizer.CaptionTokenizer.from_directory(FLAGS.tokenizer, context_length=FLAGS.context_length)
  captions = [t.strip() for t in FLAGS.text.split(";")]
  for caption, ids, back in zip(captions, tok.encode(captions), tok.decode(tok.encode(captions))):
    print(f"{caption!r} -> {' '.join(map(str, ids))} -> {back!r}")


if __name__ == "__main__":
  cli.run(main, define_flags)
