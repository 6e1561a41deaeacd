"""The whole pipeline on the embedded MNIST digits, end to end (the command is ctxrq_jax/demo.py).

1. stage 1: trains the tiny RQ-VAE (configs/rqvae_mnist.py)             -> WORKDIR/stage1 (artifact in stage1/rqvae)
2. encodes the train and test digits into 8x8x4 code stacks              -> WORKDIR/codes
3. stage 2: trains the tiny Contextual RQ-Transformer (configs/demo.py)  -> WORKDIR/stage2
4. Draft-and-Revise samples for every class, as PNG grids + .npz         -> WORKDIR/samples

Every step resumes: re-running after an interruption continues where it stopped, and re-running a finished demo
trains nothing, keeps the codes (re-encoded only when they are missing or were not written from this stage-1
artifact), keeps the samples drawn from the same stage-2 checkpoint with the same settings (with the results
`evaluate` wrote of them; WORKDIR/samples/samples.json records them) and prints the same results. What a stage-2 run
depends on is never replaced under it: a re-run whose stage 1 would train further (another stage-1 config) or whose
RQ-VAE is not the one a stage-2 run of the workdir was trained on is refused before anything runs; so is mixing
--smoke and the full demo, or two --max_examples, in one workdir (WORKDIR/demo.json records them). The same modules
and code paths serve the ImageNet configs; only the configs differ. `default_configs(smoke=True)` gives the few-step
settings of `--smoke`.

`run_text` is the text-to-image variant (`python -m ctxrq_jax.demo --task=text`): the same stage 1, then captions
made from each digit's class and measured pixel attributes (ctxrq_jax/data/digit_captions.py), a CharBPE trained on
them offline once (WORKDIR/tokenizer, kept while the captions are the same), caption codes (WORKDIR/text_codes),
stage 2 with configs/demo_text.py (WORKDIR/text_stage2) and a grid of prompts with each prompt under its samples
(WORKDIR/text_samples).
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Callable, Optional

import ml_collections
import numpy as np

from ctxrq_jax.core import checkpoint
from ctxrq_jax.core import config as configlib
from ctxrq_jax.core import paths as fs
from ctxrq_jax.core import reporting
from ctxrq_jax.data import captions as captions_lib
from ctxrq_jax.data import code_captions
from ctxrq_jax.data import codes as code_data
from ctxrq_jax.data import digit_captions
from ctxrq_jax.data import fingerprints
from ctxrq_jax.data import images as image_data
from ctxrq_jax.data import mnist
from ctxrq_jax.data import tokenizer as tokenizer_lib
from ctxrq_jax.models import artifact as artifact_lib
from ctxrq_jax.sampling import loader
from ctxrq_jax.sampling import runner
from ctxrq_jax.stage1 import encode
from ctxrq_jax.stage1 import trainer as stage1_trainer
from ctxrq_jax.stage2 import trainer as stage2_trainer

STAGE1_CONFIG = "rqvae_mnist"  # ctxrq_jax/configs/rqvae_mnist.py
STAGE2_CONFIG = "demo"  # ctxrq_jax/configs/demo.py
# Digits the smoke run (class and text demo) encodes per split: the whole held-out split (500, which the sample
# evaluation scores against in order) and the first 500 of the 4,500 training digits (8 smoke steps of batch 32 read
# 256 of them). Encoding all of them was 4/5 of the smoke run's encode time.
SMOKE_MAX_EXAMPLES = 500
STAGE1, CODES, STAGE2, SAMPLES = "stage1", "codes", "stage2", "samples"
SETTINGS_FILE = "demo.json"  # in the workdir: --smoke or not, and the class demo's --max_examples


def default_configs(smoke: bool = False) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
  """(stage-1, stage-2) configs of the demo; `smoke` gives their few-step variants (an install check)."""
  arg = "smoke" if smoke else None
  return configlib.load_config_file(STAGE1_CONFIG, arg), configlib.load_config_file(STAGE2_CONFIG, arg)


def _stage1(stage1_config: ml_collections.ConfigDict, workdir: str) -> tuple[dict[str, Any], str, float]:
  """Stage 1 in WORKDIR/stage1 (resumed if it stopped): (its results, the artifact directory, seconds)."""
  t0 = time.time()
  stage1_dir = str(fs.path(workdir) / STAGE1)
  rq_results = stage1_trainer.train_and_evaluate(stage1_config, stage1_dir)
  return rq_results, str(fs.path(stage1_dir) / stage1_trainer.ARTIFACT_DIR), time.time() - t0


def _stage2(stage2_config: ml_collections.ConfigDict, stage2_dir: str, data: Any,
            **paths: str) -> tuple[dict[str, Any], str, float]:
  """Stage 2 in `stage2_dir` on the codes of stage 1 (`paths`: codes_dir, stage1_dir, ... set in config.data; the
  splits are the stage-1 data's): (the trainer's results, `stage2_dir`, seconds)."""
  t0 = time.time()
  stage2_config = _with_data(stage2_config, data, **paths)
  return stage2_trainer.train_and_evaluate(stage2_config, stage2_dir), stage2_dir, time.time() - t0


def _with_data(stage2_config: ml_collections.ConfigDict, data: Any, **paths: str) -> ml_collections.ConfigDict:
  """A copy of the stage-2 config with `paths` in config.data and the stage-1 data's splits."""
  stage2_config = stage2_config.copy_and_resolve_references()
  with stage2_config.unlocked():
    for key, value in paths.items():
      stage2_config.data[key] = value
    stage2_config.data.train_split = data.train_split
    stage2_config.data.eval_split = data.eval_split
  return stage2_config


def _check_stage2_config(stage2_config: ml_collections.ConfigDict, data: Any, codes_dir: str) -> None:
  """ConfigError for what `stage2_trainer.validate_config` checks without reading a file (keys, values, batch and
  mesh arithmetic): before stage 1 trains and the digits are encoded, not after them."""
  stage2_trainer.validate_config(_with_data(stage2_config, data, codes_dir=codes_dir))


def _check_settings(workdir: str, *, smoke: bool, max_examples: Optional[int] = None,
                    text: bool) -> Callable[[], None]:
  """ValueError when `workdir` holds a demo run of other settings (WORKDIR/demo.json): the smoke run and the full
  demo share the stage-1 checkpoints' shapes, so the full one would resume the smoke run's stage 1 under its own
  schedule, and another --max_examples would re-encode the class demo's codes to another subset under a stage-2 run.
  Returns the function that records this run's settings, to call once the run's other checks have passed (the text
  demo encodes every digit: it records no --max_examples)."""
  path = fs.path(workdir) / SETTINGS_FILE
  saved = json.loads(path.read_text()) if path.exists() else {}
  mode = lambda smoke: "--smoke" if smoke else "full"  # noqa: E731
  if "smoke" in saved and bool(saved["smoke"]) != bool(smoke):
    raise ValueError(f"{workdir} holds a {mode(saved['smoke'])} demo run ({path}); run the {mode(smoke)} demo in "
                     "another --workdir")
  count = lambda n: "all digits" if n is None else f"--max_examples={n}"  # noqa: E731
  if not text and "max_examples" in saved and saved["max_examples"] != max_examples:
    raise ValueError(f"{workdir}'s class demo encoded {count(saved['max_examples'])} ({path}), not "
                     f"{count(max_examples)}: stage 2 would go on training on another subset; run it in another "
                     "--workdir")
  settings = {**saved, "smoke": bool(smoke)}
  if not text:
    settings["max_examples"] = max_examples

  def record() -> None:
    if settings != saved:
      path.parent.mkdir(parents=True, exist_ok=True)
      fs.write_json(path, settings, indent=2, sort_keys=True)
  return record


def _artifact_fingerprint(artifact_dir: str) -> Optional[str]:
  """The codebook fingerprint (`data.codes.codebook_fingerprint`) of the stage-1 artifact, None when there is none
  (or it is unfinished: no model_config.json)."""
  try:
    _, variables = artifact_lib.load_artifact(artifact_dir)
  except FileNotFoundError:
    return None
  return code_data.codebook_fingerprint(np.asarray(variables["quantizer"]["codebook"], np.float32))


def _codes_fingerprint(codes_dir: str) -> Optional[str]:
  """The codebook fingerprint of a finished code dataset, None when there is none."""
  if not (fs.path(codes_dir) / code_data.METADATA_FILE).exists():
    return None
  return code_data.codebook_fingerprint(code_data.load_codebook(codes_dir).astype(np.float32))


def _stage1_latest_step(stage1_dir: str) -> Optional[int]:
  """The newest stage-1 checkpoint's step (None: none), read without touching the directory."""
  directory = fs.path(stage1_dir) / "checkpoints"
  if not directory.is_dir():
    return None
  ckpt = checkpoint.Checkpointer(str(directory), max_to_keep=1, save_interval_steps=1, read_only=True)
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


def _check_stage2_runs_kept(workdir: str, stage1_config: ml_collections.ConfigDict) -> None:
  """ValueError, before anything runs, when this run would replace what a stage-2 run of the workdir (class or text,
  started or finished) depends on: its stage 1 would train (further: another stage-1 config, e.g. more steps), or
  the stage-1 artifact is not the RQ-VAE that run was trained with (their codebook fingerprints differ). Either
  way the demo would re-export the artifact and re-encode the codes the stage-2 model decodes and trains on."""
  runs = {str(fs.path(workdir) / name): saved for name in (STAGE2, TEXT_STAGE2)
          if (saved := fingerprints.recorded(str(fs.path(workdir) / name), code_data.TRAINED_CODEBOOK_FILE))}
  if not runs:
    return
  stage1_dir = str(fs.path(workdir) / STAGE1)
  num_steps = int(stage1_config.train.num_steps)
  latest = _stage1_latest_step(stage1_dir)
  if latest is None or latest < num_steps:
    first = next(iter(runs))
    start = "from scratch" if latest is None else f"from step {latest}"
    raise ValueError(f"stage 1 would train {start} to step {num_steps} in {stage1_dir}, replacing the RQ-VAE and the "
                     f"codes the stage-2 run {first} was trained on; train the new stage 1 in another --workdir "
                     f"(or move {first} aside)")
  fingerprint = _artifact_fingerprint(str(fs.path(stage1_dir) / stage1_trainer.ARTIFACT_DIR))
  for run, saved in runs.items():
    recorded = saved.get("sha256")
    if fingerprint is not None and recorded != fingerprint:
      raise ValueError(f"the stage-1 artifact in {stage1_dir} is not the RQ-VAE the stage-2 run {run} was trained "
                       f"with (codebook fingerprint {fingerprint[:12]}, the run records {str(recorded)[:12]}); "
                       f"use another --workdir (or move {run} aside)")


def _check_replaceable_codes(codes_dir: str, artifact_dir: str, *, text: bool,
                             fingerprint: Optional[str] = None) -> None:
  """The demo re-encodes its codes when they are missing or stale; it replaces only a code dataset it wrote itself:
  from this workdir's stage-1 artifact, or (a workdir moved or copied: the recorded path is another) from an artifact
  with this one's codebook (`fingerprint`). ValueError for anything else found there."""
  if not (fs.path(codes_dir) / code_data.METADATA_FILE).exists():
    return
  meta = code_data.read_metadata(codes_dir)
  source = meta.source if isinstance(meta.source, dict) else {}
  recorded = source.get("stage1_artifact")
  if meta.is_text != text:
    kind = "caption" if meta.is_text else "class"
    raise ValueError(f"{codes_dir} holds {kind} codes, which the demo did not write there; move them or use another "
                     "--workdir")
  if recorded == fs.name(artifact_dir) or (fingerprint is not None and _codes_fingerprint(codes_dir) == fingerprint):
    return
  raise ValueError(f"{codes_dir} holds codes written from the stage-1 artifact {recorded or '(not recorded)'}, not "
                   f"from this workdir's {artifact_dir} (nor from one with its codebook); move them or use another "
                   "--workdir")


def _codes_current(codes_dir: str, fingerprint: Optional[str], counts: dict[str, int], *, text: bool,
                   views: tuple[str, ...] = ("center",), tokenizer_fingerprint: Optional[str] = None) -> bool:
  """Whether `codes_dir` already holds what the demo would encode now: finished, written from an artifact with this
  codebook (`fingerprint`), the same splits with `counts` examples, views, and (captions) tokenizer. A re-run then
  keeps them instead of re-encoding (which, for captions, would also draw other BPE-dropout tokenizations)."""
  if fingerprint is None or _codes_fingerprint(codes_dir) != fingerprint:
    return False
  meta = code_data.read_metadata(codes_dir)
  source = meta.source if isinstance(meta.source, dict) else {}
  if meta.is_text != text or set(meta.splits) != set(counts):
    return False
  if any(meta.num_examples(split) != n for split, n in counts.items()):
    return False
  if text:
    return source.get(code_captions.FINGERPRINT_KEY) == tokenizer_fingerprint
  return tuple(meta.views) == tuple(views)


def _captions_digest(captions: list[str], vocab_size: int) -> str:
  return hashlib.sha256(json.dumps({"captions": list(captions), "vocab_size": int(vocab_size),
                                    "min_frequency": tokenizer_lib.MIN_FREQUENCY}).encode("utf-8")).hexdigest()


TOKENIZER_STAMP = "demo-captions.json"  # beside the demo's BPE pair: the digest of the captions it was trained on


def _demo_tokenizer(tokenizer_dir: str, captions: list[str], vocab_size: int, stage2_dir: str) -> None:
  """The demo's BPE pair in `tokenizer_dir`, trained on `captions` once and kept while they are the same (a stamp
  beside it holds their digest): the caption codes and a stage-2 run keep meaning the same ids. A pair without a
  stamp (a workdir of an earlier version, which trained it from these same captions every run) is kept too. Other
  captions replace the demo's own pair, unless the stage-2 run in `stage2_dir` recorded the tokenizer it trained on
  (then ValueError, before anything is removed: that run needs this pair for its prompts); ValueError when the
  directory holds anything else."""
  directory = fs.path(tokenizer_dir)
  prefix = tokenizer_lib.default_prefix(vocab_size)
  ours = {prefix + tokenizer_lib.VOCAB_SUFFIX, prefix + tokenizer_lib.MERGES_SUFFIX}
  stamp = directory / TOKENIZER_STAMP
  digest = _captions_digest(captions, vocab_size)
  if directory.is_dir():
    other = sorted(p.name for p in directory.iterdir() if p.name not in ours | {TOKENIZER_STAMP})
    if other:
      raise ValueError(f"{tokenizer_dir} holds files the demo did not write ({', '.join(other[:3])}); move them or "
                       "use another --workdir")
    present = all((directory / name).exists() for name in ours)
    recorded = json.loads(stamp.read_text()).get("sha256") if stamp.exists() else None
    if present and recorded in (None, digest):
      if recorded is None:
        fs.write_json(stamp, {"sha256": digest})
      return
    if present and (fs.path(stage2_dir) / tokenizer_lib.TRAINED_TOKENIZER_FILE).exists():
      raise ValueError(f"the text demo's captions or vocabulary size changed, and {stage2_dir} was trained on the "
                       f"tokenizer in {tokenizer_dir}, which they would replace; run the text demo in another "
                       "--workdir")
    for name in (*ours, TOKENIZER_STAMP):
      if (directory / name).exists():
        (directory / name).unlink()
  tokenizer_lib.train_tokenizer(captions, tokenizer_dir, vocab_size=vocab_size)  # (creates the directory)
  fs.write_json(stamp, {"sha256": digest})


def run(stage1_config: ml_collections.ConfigDict, stage2_config: ml_collections.ConfigDict, workdir: str,
        samples_per_class: int, views: tuple[str, ...] = ("center",),
        max_examples: int | None = None, *, smoke: bool = False) -> dict[str, Any]:
  """Runs the four steps in `workdir`; returns {'stage1', 'stage2', 'timings', 'outputs'} (or {'stopped_at'}).

  `views`: the image views encoded per example (stage-2 augmentation with `data.random_view`; the demo's digits use
  the centre view only). `max_examples`: encode only the first this many digits of each split (None: all), so stage 2
  trains on them; the smoke run encodes SMOKE_MAX_EXAMPLES. `smoke`: whether these are the smoke configs (recorded
  in the workdir, which then refuses the other kind).
  """
  # Absolute paths: the stage-2 config records codes_dir / stage1_dir for sampling from any working directory.
  workdir = fs.name(workdir)  # local paths absolute, buckets as they are
  record = _check_settings(workdir, smoke=smoke, max_examples=max_examples, text=False)
  _check_stage2_runs_kept(workdir, stage1_config)
  _check_stage2_config(stage2_config, stage1_config.data, str(fs.path(workdir) / CODES))
  record()  # only once no check refused the run
  timings = {}
  rq_results, artifact_dir, timings["stage 1"] = _stage1(stage1_config, workdir)
  if "stopped_at" in rq_results:
    return rq_results

  t0 = time.time()
  codes_dir = str(fs.path(workdir) / CODES)
  d = stage1_config.data
  fingerprint = _artifact_fingerprint(artifact_dir)
  counts = {split: image_data.dataset_info(d, split)[0] for split in (d.train_split, d.eval_split)}
  counts = {split: n if max_examples is None else min(n, max_examples) for split, n in counts.items()}
  if not _codes_current(codes_dir, fingerprint, counts, text=False, views=tuple(views)):
    _check_replaceable_codes(codes_dir, artifact_dir, text=False, fingerprint=fingerprint)
    encode.encode_dataset(artifact_dir, d, codes_dir, [d.train_split, d.eval_split], overwrite=True, views=views,
                          max_examples=max_examples)
  timings["encode"] = time.time() - t0

  tr_results, stage2_dir, timings["stage 2"] = _stage2(stage2_config, str(fs.path(workdir) / STAGE2), d,
                                                        codes_dir=codes_dir, stage1_dir=artifact_dir)
  if tr_results["stopped"]:
    return {"stopped_at": tr_results["step"]}

  t0 = time.time()
  outputs = runner.sample_all_classes(stage2_dir, str(fs.path(workdir) / SAMPLES),
                                      samples_per_class=samples_per_class)
  timings["sample"] = time.time() - t0
  return {"stage1": rq_results, "stage2": tr_results["eval"], "timings": timings, "outputs": outputs}


# Stage-1 and stage-2 steps of a notebook's first look (`ensure_run(quick=True)`): ~4 minutes on a CPU runtime.
QUICK_STEPS = (200, 300)


def ensure_run(workdir: str, *, smoke: bool = False, quick: bool = False,
               samples_per_class: int = 10) -> Optional[dict[str, Any]]:
  """The demo run the notebooks read, trained in `workdir` unless it finished there (WORKDIR/samples/phases.png):
  as `python -m ctxrq_jax.demo [--smoke]` does (recorded in WORKDIR/demo.json), with `quick` (not with `smoke`)
  QUICK_STEPS instead of the full demo's steps. This function resumes its own run where it stopped; the command
  resumes a smoke one, but refuses to train a finished quick run's stage 1 further under its stage 2. On Colab each
  notebook has its own runtime, so the run one notebook trained is not where another looks. Returns the run's summary
  (`format_summary`), or None when it had finished; RuntimeError when training stopped early (preempted; run
  again to resume)."""
  if (fs.path(workdir) / SAMPLES / "phases.png").exists():
    return None
  stage1, stage2 = default_configs(smoke=smoke)
  if quick and not smoke:
    with stage1.unlocked(), stage2.unlocked():
      stage1.train.num_steps, stage2.train.num_steps = QUICK_STEPS
  summary = run(stage1, stage2, workdir, samples_per_class, smoke=smoke,
                max_examples=SMOKE_MAX_EXAMPLES if smoke else None)
  if "stopped_at" in summary:  # the checkpoint is saved; the notebooks' next cells need a finished run
    raise RuntimeError(f"training stopped at step {summary['stopped_at']}; run this again to resume")
  return summary


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


def digit_images(data_cfg: ml_collections.ConfigDict, split: str,
                 limit: Optional[int] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(raw uint8 [M, 28, 28, 1], preprocessed float [M, S, S, C] as stage 1 sees them, labels [M]) of a split's first
  `limit` digits (all when None)."""
  raw, labels = mnist.load(split)
  raw, labels = raw[:limit], labels[:limit]
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
             samples_per_prompt: int, *, smoke: bool = False) -> dict[str, Any]:
  """The text demo in `workdir`: stage 1 (shared with the class demo), captions from each digit's class and
  measured attributes, a CharBPE trained on the training captions, caption codes, stage 2 on them, and a prompt grid.

  Returns {'stage1', 'stage2', 'timings', 'outputs'} (or {'stopped_at'}).
  """
  workdir = fs.name(workdir)  # local paths absolute, buckets as they are
  record = _check_settings(workdir, smoke=smoke, text=True)
  _check_stage2_runs_kept(workdir, stage1_config)
  _check_stage2_config(stage2_config, stage1_config.data, str(fs.path(workdir) / TEXT_CODES))
  record()  # only once no check refused the run
  d = stage1_config.data
  timings = {}
  rq_results, artifact_dir, timings["stage 1"] = _stage1(stage1_config, workdir)
  if "stopped_at" in rq_results:
    return rq_results

  t0 = time.time()
  limit = SMOKE_MAX_EXAMPLES if smoke else None  # as the class demo's smoke run
  splits = {split: digit_images(d, split, limit) for split in (d.train_split, d.eval_split)}
  thresholds = digit_captions.fit_thresholds(splits[d.train_split][1])
  texts = {split: digit_captions.captions(labels, digit_captions.attribute_bins(pre, thresholds))
           for split, (_, pre, labels) in splits.items()}
  tokenizer_dir = str(fs.path(workdir) / TOKENIZER)
  codes_dir = str(fs.path(workdir) / TEXT_CODES)
  stage2_dir = str(fs.path(workdir) / TEXT_STAGE2)
  _demo_tokenizer(tokenizer_dir, texts[d.train_split], int(stage2_config.model.cond_vocab_size), stage2_dir)
  tok = tokenizer_lib.CaptionTokenizer.from_directory(tokenizer_dir,
                                                      context_length=int(stage2_config.model.cond_length))
  fingerprint = _artifact_fingerprint(artifact_dir)
  totals = {s: len(v[0]) for s, v in splits.items()}
  if not _codes_current(codes_dir, fingerprint, totals, text=True, tokenizer_fingerprint=tok.fingerprint):
    _check_replaceable_codes(codes_dir, artifact_dir, text=True, fingerprint=fingerprint)
    # Before the caption codes are replaced: a stage-2 run trained on other ids keeps its codes.
    tokenizer_lib.check_trained_tokenizer(stage2_dir, tok.fingerprint, codes_dir)

    def source(split):
      raw = splits[split][0]
      return lambda stats: (captions_lib.CaptionExample(f"{split}[{i}]", raw[i], (texts[split][i],))
                            for i in range(len(raw)))

    encode.encode_captions(artifact_dir, {s: source(s) for s in splits}, codes_dir, tok,
                           train_splits=(d.train_split,), overwrite=True, resize=str(d.resize), totals=totals,
                           source_description={"digits": "embedded_mnist", "thresholds": thresholds.to_json()})
  timings["captions + encode"] = time.time() - t0

  tr_results, stage2_dir, timings["stage 2"] = _stage2(stage2_config, stage2_dir, d, codes_dir=codes_dir,
                                                        stage1_dir=artifact_dir, tokenizer_dir=tokenizer_dir)
  if tr_results["stopped"]:
    return {"stopped_at": tr_results["step"]}

  t0 = time.time()
  outputs = runner.sample_all_prompts(loader.Stage2Model(stage2_dir), digit_prompts(thresholds),
                                      str(fs.path(workdir) / TEXT_SAMPLES), per_prompt=samples_per_prompt)
  timings["sample"] = time.time() - t0
  return {"stage1": rq_results, "stage2": tr_results["eval"], "timings": timings, "outputs": outputs}
