"""The whole pipeline on the embedded MNIST digits, end to end (the command is ctxrq_jax/demo.py).

1. stage 1: trains the tiny RQ-VAE (configs/rqvae_mnist.py)             -> WORKDIR/stage1 (artifact in stage1/rqvae)
2. encodes the train and test digits into 8x8x4 code stacks              -> WORKDIR/codes
3. stage 2: trains the tiny Contextual RQ-Transformer (configs/demo.py)  -> WORKDIR/stage2
4. Draft-and-Revise samples for every class, as PNG grids + .npz         -> WORKDIR/samples

Every step resumes: re-running after an interruption continues where it stopped. The same modules and code paths
serve the ImageNet configs; only the configs differ. `smoke_configs()` gives the few-step settings of `--smoke`.

`run_text` is the text-to-image variant (`python -m ctxrq_jax.demo --task=text`): the same stage 1, then captions
made from each digit's class and measured pixel attributes (ctxrq_jax/data/digit_captions.py), a CharBPE trained on
them offline (WORKDIR/tokenizer), caption codes (WORKDIR/text_codes), stage 2 with configs/demo_text.py
(WORKDIR/text_stage2) and a grid of prompts with each prompt under its samples (WORKDIR/text_samples).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import ml_collections
import numpy as np

from ctxrq_jax.core import config as configlib
from ctxrq_jax.core import paths as fs
from ctxrq_jax.core import reporting
from ctxrq_jax.data import captions as captions_lib
from ctxrq_jax.data import codes as code_data
from ctxrq_jax.data import digit_captions
from ctxrq_jax.data import images as image_data
from ctxrq_jax.data import mnist
from ctxrq_jax.data import tokenizer as tokenizer_lib
from ctxrq_jax.sampling import loader
from ctxrq_jax.sampling import logits
from ctxrq_jax.sampling import runner
from ctxrq_jax.stage1 import encode
from ctxrq_jax.stage1 import trainer as stage1_trainer
from ctxrq_jax.stage2 import trainer as stage2_trainer

STAGE1_CONFIG = "rqvae_mnist"  # ctxrq_jax/configs/rqvae_mnist.py
STAGE2_CONFIG = "demo"  # ctxrq_jax/configs/demo.py
# Digits the smoke run encodes per split: the whole held-out split (500, which the sample evaluation scores against
# in order) and the first 500 of the 4,500 training digits (8 smoke steps of batch 32 read 256 of them). Encoding
# all of them was 4/5 of the smoke run's encode time.
SMOKE_MAX_EXAMPLES = 500


def default_configs(smoke: bool = False) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
  """(stage-1, stage-2) configs of the demo; `smoke` gives their few-step variants (an install check)."""
  arg = "smoke" if smoke else None
  return configlib.load_config_file(STAGE1_CONFIG, arg), configlib.load_config_file(STAGE2_CONFIG, arg)


def _stage1(stage1_config: ml_collections.ConfigDict, workdir: str) -> tuple[dict[str, Any], str, float]:
  """Stage 1 in WORKDIR/stage1 (resumed if it stopped): (its results, the artifact directory, seconds)."""
  t0 = time.time()
  stage1_dir = str(fs.path(workdir) / "stage1")
  rq_results = stage1_trainer.train_and_evaluate(stage1_config, stage1_dir)
  return rq_results, str(fs.path(stage1_dir) / stage1_trainer.ARTIFACT_DIR), time.time() - t0


def _stage2(stage2_config: ml_collections.ConfigDict, stage2_dir: str, data: Any,
            **paths: str) -> tuple[dict[str, Any], str, float]:
  """Stage 2 in `stage2_dir` on the codes of stage 1 (`paths`: codes_dir, stage1_dir, ... set in config.data; the
  splits are the stage-1 data's): (the trainer's results, `stage2_dir`, seconds)."""
  t0 = time.time()
  stage2_config = stage2_config.copy_and_resolve_references()
  with stage2_config.unlocked():
    for key, value in paths.items():
      stage2_config.data[key] = value
    stage2_config.data.train_split = data.train_split
    stage2_config.data.eval_split = data.eval_split
  return stage2_trainer.train_and_evaluate(stage2_config, stage2_dir), stage2_dir, time.time() - t0


def _check_replaceable_codes(codes_dir: str, artifact_dir: str, *, text: bool) -> None:
  """The demo re-encodes its codes every run (stage 1 may have trained further); it replaces only a code dataset it
  wrote itself, from this workdir's stage-1 artifact. ValueError for anything else found there."""
  if not (fs.path(codes_dir) / code_data.METADATA_FILE).exists():
    return
  meta = code_data.read_metadata(codes_dir)
  source = meta.source if isinstance(meta.source, dict) else {}
  if source.get("stage1_artifact") != fs.name(artifact_dir) or meta.is_text != text:
    raise ValueError(f"{codes_dir} holds a code dataset the demo did not write (from "
                     f"{source.get('stage1_artifact', 'another source')}); move it or use another --workdir")


def _clear_demo_tokenizer(tokenizer_dir: str, vocab_size: int) -> None:
  """Removes the demo's own BPE pair from `tokenizer_dir` (retrained each run from the same captions: the same
  files); ValueError when the directory holds anything else."""
  directory = fs.path(tokenizer_dir)
  if not directory.is_dir():
    return
  prefix = tokenizer_lib.default_prefix(vocab_size)
  ours = {prefix + tokenizer_lib.VOCAB_SUFFIX, prefix + tokenizer_lib.MERGES_SUFFIX}
  other = sorted(p.name for p in directory.iterdir() if p.name not in ours)
  if other:
    raise ValueError(f"{tokenizer_dir} holds files the demo did not write ({', '.join(other[:3])}); move them or "
                     "use another --workdir")
  for name in ours:
    if (directory / name).exists():
      (directory / name).unlink()


def run(stage1_config: ml_collections.ConfigDict, stage2_config: ml_collections.ConfigDict, workdir: str,
        samples_per_class: int, views: tuple[str, ...] = ("center",),
        max_examples: int | None = None) -> dict[str, Any]:
  """Runs the four steps in `workdir`; returns {'stage1', 'stage2', 'timings', 'outputs'} (or {'stopped_at'}).

  `views`: the image views encoded per example (stage-2 augmentation with `data.random_view`; the demo's digits use
  the centre view only). `max_examples`: encode only the first this many digits of each split (None: all), so stage 2
  trains on them; the smoke run encodes SMOKE_MAX_EXAMPLES.
  """
  # Absolute paths: the stage-2 config records codes_dir / stage1_dir for sampling from any working directory.
  workdir = fs.name(workdir)  # local paths absolute, buckets as they are
  timings = {}
  rq_results, artifact_dir, timings["stage 1"] = _stage1(stage1_config, workdir)
  if "stopped_at" in rq_results:
    return rq_results

  t0 = time.time()
  codes_dir = str(fs.path(workdir) / "codes")
  d = stage1_config.data
  _check_replaceable_codes(codes_dir, artifact_dir, text=False)
  encode.encode_dataset(artifact_dir, d, codes_dir, [d.train_split, d.eval_split], overwrite=True, views=views,
                        max_examples=max_examples)
  timings["encode"] = time.time() - t0

  tr_results, stage2_dir, timings["stage 2"] = _stage2(stage2_config, str(fs.path(workdir) / "stage2"), d,
                                                        codes_dir=codes_dir, stage1_dir=artifact_dir)
  if tr_results["stopped"]:
    return {"stopped_at": tr_results["step"]}

  t0 = time.time()
  outputs = runner.sample_all_classes(stage2_dir, str(fs.path(workdir) / "samples"),
                                      samples_per_class=samples_per_class)
  timings["sample"] = time.time() - t0
  return {"stage1": rq_results, "stage2": tr_results["eval"], "timings": timings, "outputs": outputs}


def format_summary(summary: dict[str, Any]) -> str:
  """The demo's results table: held-out stage-1 and stage-2 figures, time per step, and the files written."""
  s1, s2 = summary["stage1"], summary["stage2"]
  depths = sorted(int(k[len("usage_d"):]) for k in s1 if k.startswith("usage_d"))
  rows = [["stage 1", "held-out PSNR", f"{s1['psnr']:.2f} dB"],
          ["stage 1", "codes used per depth", " / ".join(f"{100 * s1[f'usage_d{d}']:.1f}%" for d in depths)]]
  if "eval/loss" in s2:
    rows.append(["stage 2", "held-out masked-code NLL", f"{s2['eval/loss']:.3f} nats/code"])
  rows += [["time", name, f"{seconds:.0f} s"] for name, seconds in summary["timings"].items()]
  rows += [["output", name, path] for name, path in summary["outputs"].items()]
  return reporting.table(rows, ["", "ctxrq_jax demo", ""])


# ------------------------------------------------------------------------------------------------ the text demo
STAGE2_TEXT_CONFIG = "demo_text"  # ctxrq_jax/configs/demo_text.py
TEXT_CODES, TEXT_STAGE2, TOKENIZER, TEXT_SAMPLES = "text_codes", "text_stage2", "tokenizer", "text_samples"


def default_text_configs(smoke: bool = False) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
  """(stage-1, stage-2) configs of the text demo (`smoke`: their few-step variants)."""
  arg = "smoke" if smoke else None
  return configlib.load_config_file(STAGE1_CONFIG, arg), configlib.load_config_file(STAGE2_TEXT_CONFIG, arg)


def digit_images(data_cfg: ml_collections.ConfigDict, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(raw uint8 [M, 28, 28, 1], preprocessed float [M, S, S, C] as stage 1 sees them, labels [M]) of a split."""
  raw, labels = mnist.load(split)
  pre = np.stack([image_data.preprocess_image(a, image_size=int(data_cfg.image_size), channels=int(data_cfg.channels),
                                              resize=str(data_cfg.resize)) for a in raw])
  return raw, pre, labels


def digit_prompts(thresholds: digit_captions.Thresholds) -> list[str]:
  """Ten prompts for the demo grid: each digit once, with attribute combinations that cycle over the digits."""
  del thresholds  # the words only; kept in the signature so prompts follow the fitted attributes' vocabulary
  names = list(digit_captions.ATTRIBUTES)
  bins = {name: np.array([(d + i) % len(digit_captions.ATTRIBUTES[name]) for d in range(10)])
          for i, name in enumerate(names)}
  return digit_captions.captions(np.arange(10), bins)


def run_text(stage1_config: ml_collections.ConfigDict, stage2_config: ml_collections.ConfigDict, workdir: str,
             samples_per_prompt: int) -> dict[str, Any]:
  """The text demo in `workdir`: stage 1 (shared with the class demo), captions from each digit's class and
  measured attributes, a CharBPE trained on the training captions, caption codes, stage 2 on them, and a prompt grid.

  Returns {'stage1', 'stage2', 'timings', 'outputs'} (or {'stopped_at'}).
  """
  workdir = fs.name(workdir)  # local paths absolute, buckets as they are
  d = stage1_config.data
  timings = {}
  rq_results, artifact_dir, timings["stage 1"] = _stage1(stage1_config, workdir)
  if "stopped_at" in rq_results:
    return rq_results

  t0 = time.time()
  splits = {split: digit_images(d, split) for split in (d.train_split, d.eval_split)}
  thresholds = digit_captions.fit_thresholds(splits[d.train_split][1])
  texts = {split: digit_captions.captions(labels, digit_captions.attribute_bins(pre, thresholds))
           for split, (_, pre, labels) in splits.items()}
  tokenizer_dir = str(fs.path(workdir) / TOKENIZER)
  codes_dir = str(fs.path(workdir) / TEXT_CODES)
  _check_replaceable_codes(codes_dir, artifact_dir, text=True)
  _clear_demo_tokenizer(tokenizer_dir, int(stage2_config.model.cond_vocab_size))
  tokenizer_lib.train_tokenizer(texts[d.train_split], tokenizer_dir,
                                vocab_size=int(stage2_config.model.cond_vocab_size))
  tok = tokenizer_lib.CaptionTokenizer.from_directory(tokenizer_dir,
                                                      context_length=int(stage2_config.model.cond_length))

  def source(split):
    raw = splits[split][0]
    return lambda stats: (captions_lib.CaptionExample(f"{split}[{i}]", raw[i], (texts[split][i],))
                          for i in range(len(raw)))

  encode.encode_captions(artifact_dir, {s: source(s) for s in splits}, codes_dir, tok, train_splits=(d.train_split,),
                         overwrite=True, resize=str(d.resize), totals={s: len(v[0]) for s, v in splits.items()},
                         source_description={"digits": "embedded_mnist", "thresholds": thresholds.to_json()})
  timings["captions + encode"] = time.time() - t0

  tr_results, stage2_dir, timings["stage 2"] = _stage2(stage2_config, str(fs.path(workdir) / TEXT_STAGE2), d,
                                                        codes_dir=codes_dir, stage1_dir=artifact_dir,
                                                        tokenizer_dir=tokenizer_dir)
  if tr_results["stopped"]:
    return {"stopped_at": tr_results["step"]}

  t0 = time.time()
  loaded = loader.Stage2Model(stage2_dir)
  s = loaded.config.sample
  outputs = runner.sample_prompts(
      loaded, digit_prompts(thresholds), str(fs.path(workdir) / TEXT_SAMPLES), per_prompt=samples_per_prompt,
      rng=jax.random.key(0), batch_size=int(s.batch_size), t_draft=int(s.T_draft), t_revise=int(s.T_revise),
      num_revisions=int(s.M), draft=logits.PhaseSettings.from_config(s.draft),
      revise=logits.PhaseSettings.from_config(s.revise))
  timings["sample"] = time.time() - t0
  return {"stage1": rq_results, "stage2": tr_results["eval"], "timings": timings, "outputs": outputs}
