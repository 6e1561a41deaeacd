"""Stage-1 codes: encode a dataset into a code dataset for stage 2, or decode stored codes into a PNG grid.

  python -m ctxrq_jax.encode encode --artifact=runs/rqvae/rqvae --config=configs/rqvae_mnist.py \
      --out=runs/codes [--splits=train,test] [--num_shards=4] [--views=center,flip,crop]
  python -m ctxrq_jax.encode decode --artifact=runs/rqvae/rqvae --codes_dir=runs/codes --split=test \
      --num=64 --out=runs/codes_test.png

Encoding is deterministic: examples are read in dataset order with eval preprocessing, encoded with the artifact's
codebook and written in the same order (ctxrq_jax/data/codes.py describes the files). The code dataset carries the
codebook, so stage 2 needs nothing else from stage 1 to train. `--views` stores the codes of more views of each
image (stage-2 augmentation: `--config.data.random_view=True` when training stage 2 draws one per example).
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from ctxrq_jax.core import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "encode: stage-1 config whose `data` section describes the images.",
                                  lock_config=True)
  flags.DEFINE_string("artifact", None, "Stage-1 artifact directory (train_rqvae's WORKDIR/rqvae, or convert's --out).")
  flags.DEFINE_string("out", None, "encode: code dataset directory; decode: PNG path.")
  flags.DEFINE_list("splits", ["train", "test"], "encode: dataset splits to encode.")
  flags.DEFINE_integer("batch_size", 256, "Images per jitted call.")
  flags.DEFINE_integer("num_shards", 1, "encode: ArrayRecord shards per split.")
  flags.DEFINE_list("views", ["center"], "encode: views stored per image, 'center' first: center, flip, crop "
                    "(a random crop, as stage-1 training draws it), crop_flip; e.g. center,flip.")
  flags.DEFINE_integer("view_seed", 0, "encode: seed of the random crops.")
  flags.DEFINE_bool("overwrite", False, "encode: replace an existing code dataset.")
  flags.DEFINE_string("codes_dir", None, "decode: code dataset to read.")
  flags.DEFINE_string("split", "test", "decode: split to read.")
  flags.DEFINE_integer("num", 64, "decode: how many code maps to decode into the grid.")


def main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in ("encode", "decode"):
    raise app.UsageError("usage: python -m ctxrq_jax.encode {encode|decode} --artifact=DIR --out=PATH ...")
  if not FLAGS.artifact or not FLAGS.out:
    raise app.UsageError("--artifact and --out are required")
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.core import grids  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.data import codes as code_data  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.models import artifact  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.stage1 import encode  # pylint: disable=g-import-not-at-top

  if argv[1] == "encode":
    if FLAGS.config is None:
      raise app.UsageError("encode needs --config (a stage-1 config file, for its data section)")
    meta = encode.encode_dataset(FLAGS.artifact, FLAGS.config.data, FLAGS.out, FLAGS.splits,
                                 batch_size=FLAGS.batch_size, num_shards=FLAGS.num_shards, overwrite=FLAGS.overwrite,
                                 views=FLAGS.views, view_seed=FLAGS.view_seed)
    print(f"wrote code dataset {FLAGS.out}: code shape {meta.code_shape}, K={meta.codebook_size}, "
          + ", ".join(f"{s}: {meta.num_examples(s)}" for s in FLAGS.splits)
          + (f"; views {', '.join(meta.views)}" if meta.num_views > 1 else ""))
    return
  if not FLAGS.codes_dir:
    raise app.UsageError("decode needs --codes_dir")
  codes, _ = code_data.load_codes(FLAGS.codes_dir, FLAGS.split)
  images = artifact.CodeDecoder(FLAGS.artifact, batch_size=FLAGS.batch_size).images(codes[:FLAGS.num])
  print("wrote", grids.save_grid(FLAGS.out, images, ncols=int(np.ceil(np.sqrt(len(images)))), scale=2))


if __name__ == "__main__":
  cli.run(main, define_flags)
