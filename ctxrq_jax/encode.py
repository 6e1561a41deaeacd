"""Code extraction: images -> RQ-VAE code stacks (a code dataset for stage 2), and codes -> images.

  python -m ctxrq_jax.encode encode --artifact=runs/rqvae/rqvae --config=configs/rqvae_mnist.py \
      --out=runs/codes [--splits=train,test] [--num_shards=4]
  python -m ctxrq_jax.encode decode --artifact=runs/rqvae/rqvae --codes_dir=runs/codes --split=test \
      --num=64 --out=runs/codes_test.png

Encoding is deterministic: examples are read in dataset order without augmentation (eval preprocessing), encoded
with the artifact's codebook, and written in the same order (see `data.codes` for the file format). The code
dataset carries the codebook, so stage 2 needs nothing else from stage 1 to train.
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from ctxrq_jax import grids
from ctxrq_jax import rqvae
from ctxrq_jax.data import codes as code_data
from ctxrq_jax.data import images as image_data


def encode_dataset(artifact_dir: str, data_cfg: ml_collections.ConfigDict, out_dir: str, splits: Sequence[str], *,
                   batch_size: int = 256, num_shards: int = 1, overwrite: bool = False,
                   max_examples: int | None = None) -> code_data.CodeMetadata:
  """Encodes `splits` of the dataset described by `data_cfg` with the stage-1 artifact into a code dataset.

  Args:
    artifact_dir: stage-1 artifact (`rqvae.save_artifact`).
    data_cfg: the `data` section of a stage-1 config (same preprocessing as training).
    out_dir: the code dataset directory to write.
    splits: dataset split names; each becomes a split of the code dataset with the same name.
    batch_size: images encoded per jitted call (the last batch is padded, so one compilation).
    num_shards: ArrayRecord files per split.
    overwrite: replace an existing code dataset.
    max_examples: encode at most this many examples per split (None: all).

  Returns:
    the written metadata.
  """
  model, variables = rqvae.load_artifact(artifact_dir)
  if int(data_cfg.image_size) != model.resolution or int(data_cfg.channels) != model.in_channels:
    raise ValueError(
        f"data config gives {data_cfg.image_size}x{data_cfg.image_size}x{data_cfg.channels} images but the "
        f"RQ-VAE at {artifact_dir} expects {model.resolution}x{model.resolution}x{model.in_channels}")
  codebook = np.asarray(variables["quantizer"]["codebook"])
  encode_fn = jax.jit(lambda v, x: model.apply(v, model.apply(v, x, method=rqvae.RQVAE.encode),
                                               method=rqvae.RQVAE.quantize)[1])
  source = {"dataset": str(data_cfg.name), "stage1_artifact": os.path.abspath(artifact_dir),
            "splits": list(splits)}
  with code_data.CodeDatasetWriter(out_dir, code_shape=model.code_shape, codebook=codebook,
                                   num_classes=int(data_cfg.num_classes), source=source, num_shards=num_shards,
                                   overwrite=overwrite) as writer:
    for split in splits:
      start, count = time.time(), 0
      it = image_data.make_image_iterator(data_cfg, split=split, batch_size=batch_size, seed=0, train=False,
                                          drop_remainder=False)
      for batch in it:
        x = np.asarray(batch["image"])
        n = x.shape[0]
        if max_examples is not None:
          n = min(n, max_examples - count)
        if n <= 0:
          break
        pad = batch_size - x.shape[0]
        if pad:  # one compiled shape for every batch, the padded tail is dropped below
          x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
        codes = np.asarray(encode_fn(variables, jnp.asarray(x)))[:n]
        writer.write(split, codes, np.asarray(batch["label"])[:n])
        count += n
      logging.info("Encoded %d examples of split %r in %.1fs", count, split, time.time() - start)
      if count == 0:
        raise ValueError(f"split {split!r} of {data_cfg.name} has no examples to encode")
  # Leaving the `with` block wrote metadata.json last (atomically); a failure above leaves no metadata.
  return code_data.read_metadata(out_dir)


def decode_codes(artifact_dir: str, codes: np.ndarray, batch_size: int = 256) -> np.ndarray:
  """codes int [M, h, w, D] -> images float32 [M, R, R, C] in [-1, 1] with the artifact's decoder."""
  model, variables = rqvae.load_artifact(artifact_dir)
  codes = np.asarray(codes)
  if codes.ndim != 4 or tuple(codes.shape[1:]) != model.code_shape:
    raise ValueError(f"codes must be [M, {', '.join(map(str, model.code_shape))}], got {codes.shape}")
  rqvae.check_code_range(codes, model.codebook_size)
  fn = jax.jit(lambda v, c: jnp.clip(model.apply(v, c, method=rqvae.RQVAE.decode_codes), -1.0, 1.0))
  out = [x for _, x in rqvae.decode_in_batches(fn, variables, codes, batch_size)]
  return np.concatenate(out) if out else np.zeros((0,), np.float32)


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags, defined only when run as a program (so modules import together)."""
  config_flags.DEFINE_config_file("config", None, "Stage-1 config whose `data` section describes the images.",
                                  lock_config=True)
  flags.DEFINE_string("artifact", None, "Stage-1 artifact directory (train_rqvae's workdir/rqvae, or convert's --out).")
  flags.DEFINE_string("out", None, "encode: code dataset directory; decode: PNG path.")
  flags.DEFINE_list("splits", ["train", "test"], "encode: dataset splits to encode.")
  flags.DEFINE_integer("batch_size", 256, "Images per jitted call.")
  flags.DEFINE_integer("num_shards", 1, "encode: ArrayRecord shards per split.")
  flags.DEFINE_bool("overwrite", False, "encode: replace an existing code dataset.")
  flags.DEFINE_string("codes_dir", None, "decode: code dataset to read.")
  flags.DEFINE_string("split", "test", "decode: split to read.")
  flags.DEFINE_integer("num", 64, "decode: how many stacks maps to decode into the grid.")


def main(argv: Any) -> None:
  if len(argv) != 2 or argv[1] not in ("encode", "decode"):
    raise app.UsageError("usage: python -m ctxrq_jax.encode {encode|decode} --artifact=DIR ...")
  if not FLAGS.artifact or not FLAGS.out:
    raise app.UsageError("--artifact and --out are required")
  if argv[1] == "encode":
    if FLAGS.config is None:
      raise app.UsageError("encode needs --config (a stage-1 config file, for its data section)")
    meta = encode_dataset(FLAGS.artifact, FLAGS.config.data, FLAGS.out, FLAGS.splits, batch_size=FLAGS.batch_size,
                          num_shards=FLAGS.num_shards, overwrite=FLAGS.overwrite)
    print(f"wrote code dataset {FLAGS.out}: code shape {meta.code_shape}, K={meta.codebook_size}, "
          + ", ".join(f"{s}: {meta.num_examples(s)}" for s in FLAGS.splits))
  else:
    if not FLAGS.codes_dir:
      raise app.UsageError("decode needs --codes_dir")
    codes, _ = code_data.load_codes(FLAGS.codes_dir, FLAGS.split)
    images = decode_codes(FLAGS.artifact, codes[:FLAGS.num], FLAGS.batch_size)
    print("wrote", grids.save_grid(FLAGS.out, images, ncols=int(np.ceil(np.sqrt(len(images)))), scale=2))


if __name__ == "__main__":
  define_flags()
  app.run(main)
