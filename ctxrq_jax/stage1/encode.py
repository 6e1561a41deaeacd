"""Code extraction: images -> RQ-VAE code stacks, written as a code dataset for stage 2.

The commands are `python -m ctxrq_jax.encode encode --artifact=DIR --config=STAGE1_CONFIG --out=CODES` (class
labels) and `python -m ctxrq_jax.encode captions --artifact=DIR --tokenizer=BPE_DIR --webdataset=... --out=CODES`
(image/caption pairs: the condition of each record is the caption's L BPE tokens).

Encoding is deterministic: examples are read in dataset order without augmentation (eval preprocessing), encoded
with the artifact's codebook, and written in the same order (see `data.codes` for the file format). The code
dataset carries the codebook, so stage 2 needs nothing else from stage 1 to train.

Multi-host: in a job of P processes (`jax.process_count()`) each process encodes its share and writes its own part of
the code dataset (`data.codes`, version 4). `encode_dataset` gives process p a contiguous block of each split
(`core.host.host_range`), so the data set reads back in the same order with the same codes as a one-process encode.
`encode_captions` encodes what each process's sources yield (the command gives process p every P-th input shard file);
its captions file is written per part. Process 0 commits the metadata once every part is written.

Stage-2 augmentation: with `views=('center', 'flip', ...)` every record also holds the codes of the listed views of
its image (`data.images.VIEWS`: the horizontal flip, random crops as the training transform draws them, seeded by
`view_seed`), and stage 2 with `data.random_view` trains on one view per example drawn each epoch. The cost is V
times the encoding time and V times the code bytes per record (plus the 4-byte label).
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ctxrq_jax.core import host
from ctxrq_jax.core import paths
from ctxrq_jax.core import reporting
from ctxrq_jax.data import captions as captions_lib
from ctxrq_jax.data import code_captions
from ctxrq_jax.data import codes as code_data
from ctxrq_jax.data import images as image_data
from ctxrq_jax.data import tokenizer as tokenizer_lib
from ctxrq_jax.models import artifact
from ctxrq_jax.models import rqvae


def _check_counts(**counts: Any) -> None:
  """ValueError naming the first count that is not a positive integer (None allowed): checked before the writer
  replaces an existing data set, so a mistyped flag never costs the old one."""
  for name, value in counts.items():
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
      raise ValueError(f"{name} must be a positive integer, got {value!r}")


def encode_dataset(artifact_dir: str, data_cfg: ml_collections.ConfigDict, out_dir: str, splits: Sequence[str], *,
                   batch_size: int = 256, num_shards: int = 1, overwrite: bool = False,
                   max_examples: int | None = None, views: Sequence[str] = ("center",),
                   view_seed: int = 0) -> code_data.CodeMetadata:
  """Encodes `splits` of the dataset described by `data_cfg` with the stage-1 artifact into a code dataset.

  Args:
    artifact_dir: stage-1 artifact (`artifact.save_artifact`).
    data_cfg: the `data` section of a stage-1 config (same preprocessing as training).
    out_dir: the code dataset directory to write.
    splits: dataset split names; each becomes a split of the code dataset with the same name.
    batch_size: images encoded per jitted call (the last batch is padded, so one compilation).
    num_shards: ArrayRecord files per split.
    overwrite: replace an existing code dataset.
    max_examples: encode at most this many examples per split (None: all).
    views: the views stored per image, 'center' first (`data.images.VIEWS`).
    view_seed: seed of the random crops of 'crop' / 'crop_flip' views.

  Returns:
    the written metadata.
  """
  _check_counts(batch_size=batch_size, num_shards=num_shards, max_examples=max_examples)
  if len(set(splits)) != len(splits):
    raise ValueError(f"splits must be distinct, got {list(splits)}")
  process_index, process_count = jax.process_index(), jax.process_count()
  model, variables = artifact.load_artifact(artifact_dir)
  if int(data_cfg.image_size) != model.resolution or int(data_cfg.channels) != model.in_channels:
    raise ValueError(
        f"data config gives {data_cfg.image_size}x{data_cfg.image_size}x{data_cfg.channels} images but the "
        f"RQ-VAE at {artifact_dir} expects {model.resolution}x{model.resolution}x{model.in_channels}")
  views = code_data.check_views(list(views))
  codebook = np.asarray(variables["quantizer"]["codebook"])
  encode_fn = jax.jit(lambda v, x: model.apply(v, model.apply(v, x, method=rqvae.RQVAE.encode),
                                               method=rqvae.RQVAE.quantize)[1])
  source = {"dataset": str(data_cfg.name), "stage1_artifact": paths.name(artifact_dir),
            "splits": list(splits)}
  if len(views) > 1:
    source.update(views=list(views), view_seed=int(view_seed))
  totals = {}
  for split in splits:
    totals[split] = image_data.dataset_info(data_cfg, split)[0]
    if max_examples is not None:
      totals[split] = min(totals[split], max_examples)
    if totals[split] <= 0:
      raise ValueError(f"split {split!r} of {data_cfg.name} has no examples to encode")
  with code_data.CodeDatasetWriter(out_dir, code_shape=model.code_shape, codebook=codebook,
                                   num_classes=int(data_cfg.num_classes), source=source, num_shards=num_shards,
                                   overwrite=overwrite, views=views, process_index=process_index,
                                   process_count=process_count) as writer:
    for split in splits:
      writer.open_split(split)
      start, stop = host.host_range(totals[split], process_index, process_count)
      count = 0
      progress = reporting.Progress(f"encode {split}", stop - start, unit="images")
      if stop > start:
        it = image_data.make_image_iterator(data_cfg, split=split, batch_size=batch_size, seed=int(view_seed),
                                            train=False, drop_remainder=False, views=views,
                                            example_range=(start, stop))
        for batch in it:
          x = np.asarray(batch["image"])  # [B, V, S, S, C]
          n = x.shape[0]
          if n < batch_size:  # one compiled shape for every batch, the padded tail is dropped below
            x = np.concatenate([x, np.zeros((batch_size - n, *x.shape[1:]), x.dtype)])
          b, v = x.shape[:2]
          codes = np.asarray(encode_fn(variables, jnp.asarray(x.reshape(b * v, *x.shape[2:]))))
          codes = codes.reshape(b, v, *codes.shape[1:])[:n]
          writer.write(split, codes, np.asarray(batch["label"]))
          count += n
          progress.update(count)
      progress.close()
  # Leaving the `with` block wrote metadata.json last (atomically); a failure above leaves no metadata.
  return code_data.read_metadata(out_dir)


# Tokenizations of each training caption stored per record (BPE dropout per epoch, approximated by T stored draws).
CAPTION_VARIANTS = 8


def encode_captions(artifact_dir: str, sources: Mapping[str, Callable[[captions_lib.CaptionStats],
                                                                        Iterable[captions_lib.CaptionExample]]],
                    out_dir: str, tokenizer: tokenizer_lib.CaptionTokenizer, *,
                    train_splits: Sequence[str] = ("train",), batch_size: int = 256, num_shards: int = 1,
                    overwrite: bool = False, max_examples: int | None = None,
                    source_description: Any = None, resize: str = "crop",
                    totals: Mapping[str, int] | None = None, caption_variants: int = CAPTION_VARIANTS,
                    views: Sequence[str] = ("center",), view_seed: int = 0,
                    ) -> tuple[code_data.CodeMetadata, dict[str, captions_lib.CaptionStats]]:
  """Encodes image/caption pairs into a code dataset whose condition is the caption's L tokens (streaming).

  Each image is encoded once; an image with several captions becomes one record per caption (same codes). Each
  caption of `train_splits` is tokenized `caption_variants` times with the tokenizer's BPE dropout (T independent
  draws stored in its record, from which training with `data.random_caption` picks one per epoch; T = 1 when the
  tokenizer has no dropout), the others once, deterministically. Beside the shards,
  `captions-<split>.txt` holds each record's caption (one line per record, in record order; `data.code_captions`)
  for CLIP score and prompts, and the metadata records the tokenizer's fingerprint (checked when sampling) and the
  resize mode. Undecodable images and examples without an image or caption are counted, skipped and reported in the
  returned stats (`CaptionStats.summary()`); a caption whose tokens are all [PAD] (e.g. only a zero-width space:
  the null condition) counts as no caption (`captions.drop_null_captions`).

  Args:
    artifact_dir: stage-1 artifact.
    sources: split name -> a function of the split's stats returning its examples (`data.captions.iter_*`).
    out_dir: the code dataset directory to write.
    tokenizer: the caption tokenizer (its context length is L).
    train_splits: splits tokenized with BPE dropout.
    batch_size: images per jitted encode call (the last batch is padded, so one compilation).
    num_shards: ArrayRecord files per split.
    overwrite: replace an existing code dataset.
    max_examples: at most this many images per split and process (None: all): each process reads its own shards,
      so a job of P processes encodes up to P x max_examples.
    source_description: JSON-serialisable description stored in metadata.json.
    totals: images per split when known (progress lines only; streaming sources may not know).
    resize: how an image becomes the 'center' view: 'crop' (photos: shorter side to the RQ-VAE's resolution, centre
      crop), 'pad' (small square images) or 'squash' (the whole image resized to R x R, the official text-to-image
      evaluation's transform: for the splits not in `train_splits`; those keep 'crop', as the official training never
      squashes); 'dalle' views are the official training crop whatever it is. The metadata records each split's.
    caption_variants: T, BPE-dropout tokenizations stored per training caption.
    views: the views stored per image, 'center' first (`data.images.VIEWS`; 'dalle' is the official text-to-image
      training crop), in every split's records (evaluation reads view 0).
    view_seed: seed of the random views (with each example's key: `captions.image_batches`).

  Returns:
    (the written metadata, {split: stats}).
  """
  process_index, process_count = jax.process_index(), jax.process_count()
  if isinstance(caption_variants, bool) or not isinstance(caption_variants, (int, np.integer)) or caption_variants < 1:
    raise ValueError(f"caption_variants must be a positive integer, got {caption_variants!r}")
  _check_counts(batch_size=batch_size, num_shards=num_shards, max_examples=max_examples)
  unknown = sorted(set(train_splits) - set(sources))
  if unknown:
    raise ValueError(f"train_splits {unknown} are not among the splits encoded ({sorted(sources)}): their captions "
                     "would get no BPE dropout")
  variants = int(caption_variants) if tokenizer.bpe_dropout > 0 else 1  # without dropout every draw is the same
  resizes = {split: "crop" if resize == "squash" and split in train_splits else resize for split in sources}
  views = code_data.check_views(list(views))
  model, variables = artifact.load_artifact(artifact_dir)
  codebook = np.asarray(variables["quantizer"]["codebook"])
  encode_fn = jax.jit(lambda v, x: model.apply(v, model.apply(v, x, method=rqvae.RQVAE.encode),
                                               method=rqvae.RQVAE.quantize)[1])
  description = {"captions": source_description, "stage1_artifact": paths.name(artifact_dir),
                 "splits": list(sources), "tokenizer": [paths.name(f) for f in tokenizer.files],
                 code_captions.FINGERPRINT_KEY: tokenizer.fingerprint,
                 "context_length": tokenizer.context_length, "bpe_dropout_splits": list(train_splits),
                 "bpe_dropout": tokenizer.bpe_dropout, "caption_variants": variants, "resize": resizes}
  if len(views) > 1:
    description.update(views=list(views), view_seed=int(view_seed))
  all_stats: dict[str, captions_lib.CaptionStats] = {}
  with code_data.CodeDatasetWriter(out_dir, code_shape=model.code_shape, codebook=codebook, num_classes=0,
                                   cond_length=tokenizer.context_length, cond_vocab_size=tokenizer.vocab_size,
                                   source=description, num_shards=num_shards, overwrite=overwrite, views=views,
                                   process_index=process_index, process_count=process_count) as writer:
    for split, make_examples in sources.items():
      writer.open_split(split)
      stats = all_stats[split] = captions_lib.CaptionStats()
      # Captions that tokenize to all [PAD] (no words) are counted and skipped as missing, before any image is decoded.
      examples = captions_lib.drop_null_captions(make_examples(stats), stats, tokenizer.is_null)
      if max_examples is not None:
        examples = itertools.islice(examples, max_examples)
      total = (totals or {}).get(split) or max_examples or 0
      progress = reporting.Progress(f"encode {split}", min(total, max_examples or total), unit="images")
      batches = captions_lib.image_batches(examples, stats, image_size=model.resolution,
                                           channels=model.in_channels, batch_size=batch_size, resize=resizes[split],
                                           views=views if len(views) > 1 else None, view_seed=view_seed)
      caption_path = writer.side_file(code_captions.captions_file(split, process_index, process_count))
      with paths.local_file(caption_path) as caption_tmp, open(caption_tmp, "w", encoding="utf-8") as caption_file:
        for x, captions, _ in batches:
          n = x.shape[0]
          if n < batch_size:  # one compiled shape for every batch, the padded tail is dropped below
            x = np.concatenate([x, np.zeros((batch_size - n, *x.shape[1:]), x.dtype)])
          if len(views) > 1:  # [B, V, S, S, C] -> codes [B, V, h, w, D]
            codes = np.asarray(encode_fn(variables, jnp.asarray(x.reshape(-1, *x.shape[2:]))))
            codes = codes.reshape(batch_size, len(views), *codes.shape[1:])[:n]
          else:
            codes = np.asarray(encode_fn(variables, jnp.asarray(x)))[:n]
          repeats = np.array([len(c) for c in captions])
          flat = [" ".join(c.split()) for cs in captions for c in cs]
          if split in train_splits and variants > 1:  # [B, T, L]: T independent draws of BPE dropout per caption
            tokens = np.stack([tokenizer.encode(flat, train=True) for _ in range(variants)], axis=1)
          else:
            tokens = tokenizer.encode(flat, train=split in train_splits)
          writer.write(split, np.repeat(codes, repeats, axis=0), tokens)
          caption_file.write("".join(f"{c}\n" for c in flat))
          progress.update(stats.decoded)
      progress.close()
      if stats.decoded == 0 and process_count == 1:  # several processes: the writer checks the split as a whole
        raise ValueError(f"split {split!r} has no decodable image/caption pairs ({stats.summary()})")
  return code_data.read_metadata(out_dir), all_stats
