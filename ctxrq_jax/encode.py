"""Stage-1 codes: encode a dataset into a code dataset for stage 2, or decode stored codes into a PNG grid.

  python -m ctxrq_jax.encode encode --artifact=runs/rqvae/rqvae --config=configs/rqvae_mnist.py \
      --out=runs/codes [--splits=train,test] [--num_shards=4] [--views=center,flip,crop]
  python -m ctxrq_jax.encode captions --artifact=runs/rqvae/rqvae --tokenizer=BPE_DIR --out=runs/cc3m_codes \
      --webdataset="train=/data/cc3m/train/*.tar;validation=/data/cc3m/val/*.tar" [--num_shards=64]
  python -m ctxrq_jax.encode captions --artifact=... --tokenizer=... --out=... --tfds=coco_captions \
      --splits=train,val [--text_key=captions/text --image_key=image --data_dir=DIR]
  python -m ctxrq_jax.encode decode --artifact=runs/rqvae/rqvae --codes_dir=runs/codes --split=test \
      --num=64 --out=runs/codes_test.png

Encoding is deterministic: examples are read in dataset order with eval preprocessing, encoded with the artifact's
codebook and written in the same order (ctxrq_jax/data/codes.py describes the files). The code dataset carries the
codebook, so stage 2 needs nothing else from stage 1 to train.

`--views` stores the codes of more views of each image (stage-2 augmentation: `--config.data.random_view=True` when
training stage 2 draws one per example).

`captions` streams image/caption pairs (img2dataset webdataset or parquet shards, or a tfds set with an image and a text
feature, ctxrq_jax/data/captions.py) and stores each record's condition as its caption's BPE tokens; the splits in
--train_splits get BPE dropout, `--caption_variants` draws of it per caption (stage 2 with `data.random_caption`
trains on one per epoch). Undecodable images are counted, skipped and reported per split.

A flag the chosen subcommand does not read (`COMMAND_FLAGS`: `encode encode --resize=squash`, whose resizing is the
config's data.resize; `captions --config=...`, ...) is an error naming it rather than silently ignored.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from ctxrq_jax.core import cli

FLAGS = flags.FLAGS
SUBCOMMANDS = ("encode", "captions", "decode")
_WRITE = ("encode", "captions")  # the subcommands that write a code dataset
# The subcommands that read each flag (--artifact, --out, --batch_size and --overwrite: all three).
COMMAND_FLAGS = {
    "config": ("encode",), "splits": _WRITE, "num_shards": _WRITE, "views": _WRITE, "view_seed": _WRITE,
    "max_examples": _WRITE, "resize": ("captions",), "codes_dir": ("decode",), "split": ("decode",),
    "num": ("decode",),
    **{name: ("captions",) for name in ("tokenizer", "webdataset", "parquet", "tfds", "image_key", "text_key",
                                        "data_dir", "train_splits", "context_length", "bpe_dropout",
                                        "caption_variants")}}


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "encode: stage-1 config whose `data` section describes the images.",
                                  lock_config=True)
  flags.DEFINE_string("artifact", None, "Stage-1 artifact directory (train_rqvae's WORKDIR/rqvae, or convert's --out).")
  flags.DEFINE_string("out", None, "encode: code dataset directory; decode: PNG path.")
  flags.DEFINE_list("splits", ["train", "test"], "encode: dataset splits to encode.")
  flags.DEFINE_integer("batch_size", 256, "Images per jitted call.")
  flags.DEFINE_integer("num_shards", 1, "encode: ArrayRecord shards per split.")
  flags.DEFINE_list("views", ["center"], "encode, captions: views stored per image, 'center' first: center, flip, "
                    "crop (a random crop, as stage-1 training draws it), crop_flip, dalle (the official "
                    "text-to-image training crop); e.g. center,flip or center,dalle,dalle,dalle.")
  flags.DEFINE_integer("view_seed", 0, "encode, captions: seed of the random views.")
  flags.DEFINE_enum("resize", "crop", ["crop", "squash"], "captions: how an image becomes the 'center' view: crop "
                    "(shorter side to the RQ-VAE's resolution, centre crop) or squash (the whole image resized to "
                    "R x R, the official CC-3M evaluation's transform; the --train_splits keep crop); 'dalle' views "
                    "are the official training crop either way.")
  flags.DEFINE_bool("overwrite", False, "encode, captions: replace an existing code dataset; decode: an existing PNG.")
  flags.DEFINE_string("codes_dir", None, "decode: code dataset to read.")
  flags.DEFINE_string("split", "test", "decode: split to read.")
  flags.DEFINE_integer("num", 64, "decode: how many code maps to decode into the grid.", lower_bound=1)
  flags.DEFINE_string("tokenizer", None, "captions: tokenizer directory (a bpe-16k-vocab.json/merges.txt pair).")
  flags.DEFINE_string("webdataset", None, "captions: 'split=GLOB[,GLOB];split=GLOB' tar shards from img2dataset.")
  flags.DEFINE_string("parquet", None, "captions: 'split=GLOB;split=GLOB' parquet shards from img2dataset "
                      "(--output_format parquet).")
  flags.DEFINE_string("tfds", None, "captions: a tfds data set with an image and a text feature (--splits).")
  flags.DEFINE_string("image_key", "image", "captions --tfds: the image feature.")
  flags.DEFINE_string("text_key", "captions/text", "captions --tfds: the text feature ('/' for nested).")
  flags.DEFINE_string("data_dir", None, "captions --tfds: tfds data directory.")
  flags.DEFINE_list("train_splits", ["train"], "captions: splits tokenized with BPE dropout.")
  flags.DEFINE_integer("context_length", 32, "captions: tokens per caption (the official 32).")
  flags.DEFINE_float("bpe_dropout", 0.1, "captions: BPE dropout of the --train_splits (the official 0.1).")
  flags.DEFINE_integer("caption_variants", 8, "captions: BPE-dropout tokenizations stored per training caption; "
                       "training with data.random_caption draws one per example and epoch.")
  flags.DEFINE_integer("max_examples", None, "At most this many images per split (encode: the first ones; "
                       "captions: per process, each reading its own shards).")


def main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in SUBCOMMANDS:
    raise app.UsageError("usage: python -m ctxrq_jax.encode {encode|captions|decode} --artifact=DIR --out=PATH ...")
  cli.check_flags("encode", argv[1], COMMAND_FLAGS)
  if not FLAGS.artifact or not FLAGS.out:
    raise app.UsageError("--artifact and --out are required")
  from ctxrq_jax.core import host  # pylint: disable=g-import-not-at-top
  host.setup_host()
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.core import grids  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.core import paths  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.data import codes as code_data  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.models import artifact  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.stage1 import encode  # pylint: disable=g-import-not-at-top

  if argv[1] == "captions":
    _captions()
    return
  if argv[1] == "encode":
    if FLAGS.config is None:
      raise app.UsageError("encode needs --config (a stage-1 config file, for its data section)")
    from ctxrq_jax.stage1 import trainer as stage1_trainer  # pylint: disable=g-import-not-at-top
    stage1_trainer.require_stage1_config(FLAGS.config)
    meta = encode.encode_dataset(FLAGS.artifact, FLAGS.config.data, FLAGS.out, FLAGS.splits,
                                 batch_size=FLAGS.batch_size, num_shards=FLAGS.num_shards, overwrite=FLAGS.overwrite,
                                 views=FLAGS.views, view_seed=FLAGS.view_seed, max_examples=FLAGS.max_examples)
    print(f"wrote code dataset {FLAGS.out}: code shape {meta.code_shape}, K={meta.codebook_size}, "
          + ", ".join(f"{s}: {meta.num_examples(s)}" for s in FLAGS.splits)
          + (f"; views {', '.join(meta.views)}" if meta.num_views > 1 else ""))
    return
  if not FLAGS.codes_dir:
    raise app.UsageError("decode needs --codes_dir")
  if not FLAGS.out or not FLAGS.out.lower().endswith(".png"):
    raise app.UsageError(f"decode writes a PNG: --out must name a .png file, got {FLAGS.out!r}")
  if paths.path(FLAGS.out).exists() and not FLAGS.overwrite:
    raise app.UsageError(f"{FLAGS.out} exists; pass --overwrite to replace it")
  codes, _ = code_data.load_codes(FLAGS.codes_dir, FLAGS.split)
  images = artifact.CodeDecoder(FLAGS.artifact, batch_size=FLAGS.batch_size).images(codes[:FLAGS.num])
  print("wrote", grids.save_grid(FLAGS.out, images, ncols=int(np.ceil(np.sqrt(len(images)))), scale=2))


def _parse_webdataset(spec: str) -> dict[str, str]:
  out = {}
  for part in spec.split(";"):
    if not part.strip():
      continue
    split, sep, patterns = part.partition("=")
    if not sep or not split.strip() or not patterns.strip():
      raise app.UsageError(f"--webdataset / --parquet want 'split=GLOB;split=GLOB', got {part!r}")
    out[split.strip()] = patterns.strip()
  return out


def _captions() -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.data import captions  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.data import tokenizer  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.stage1 import encode  # pylint: disable=g-import-not-at-top

  if not FLAGS.tokenizer:
    raise app.UsageError("captions needs --tokenizer (train one with `python -m ctxrq_jax.tokenize train`)")
  if sum(map(bool, (FLAGS.webdataset, FLAGS.parquet, FLAGS.tfds))) != 1:
    raise app.UsageError("captions needs exactly one of --webdataset, --parquet and --tfds")
  if FLAGS["splits"].present and not FLAGS.tfds:
    raise app.UsageError("--splits is for --tfds; with --webdataset / --parquet the splits are named in that flag "
                         "('split=GLOB;split=GLOB')")
  tok = tokenizer.CaptionTokenizer.from_directory(FLAGS.tokenizer, context_length=FLAGS.context_length,
                                                  bpe_dropout=FLAGS.bpe_dropout)
  if FLAGS.webdataset or FLAGS.parquet:
    kind = "webdataset" if FLAGS.webdataset else "parquet"
    shards = _parse_webdataset(FLAGS.webdataset or FLAGS.parquet)
    # This process's files (every file on one host); a pattern matching nothing fails now, before the RQ-VAE loads.
    files = {split: captions.host_shard_paths(pattern, jax.process_index(), jax.process_count())
             for split, pattern in shards.items()}
    reader = captions.iter_webdataset if FLAGS.webdataset else captions.iter_parquet
    sources = {split: (lambda stats, f=f: reader(f, stats)) for split, f in files.items()}
    described = {kind: shards}
  else:
    sources = {split: (lambda stats, s=split: captions.iter_tfds(
        FLAGS.tfds, s, stats, image_key=FLAGS.image_key, text_key=FLAGS.text_key, data_dir=FLAGS.data_dir,
        process_index=jax.process_index(), process_count=jax.process_count()))
               for split in FLAGS.splits}
    described = {"tfds": FLAGS.tfds, "image_key": FLAGS.image_key, "text_key": FLAGS.text_key}
  meta, stats = encode.encode_captions(FLAGS.artifact, sources, FLAGS.out, tok, train_splits=FLAGS.train_splits,
                                       batch_size=FLAGS.batch_size, num_shards=FLAGS.num_shards,
                                       overwrite=FLAGS.overwrite, max_examples=FLAGS.max_examples,
                                       source_description=described, caption_variants=FLAGS.caption_variants,
                                       views=FLAGS.views, view_seed=FLAGS.view_seed, resize=FLAGS.resize)
  for split, s in stats.items():
    print(f"{split}: {s.summary()}")
  print(f"wrote caption code dataset {FLAGS.out}: code shape {meta.code_shape}, K={meta.codebook_size}, "
        f"L={meta.cond_length} tokens of {meta.cond_range:,}, "
        + ", ".join(f"{s}: {meta.num_examples(s)} records" + (f" x {meta.num_cond_variants(s)} tokenizations"
                                                              if meta.num_cond_variants(s) > 1 else "")
                    for s in stats))


if __name__ == "__main__":
  cli.run(main, define_flags)
