"""The whole pipeline on the embedded MNIST digits, end to end (the command is ctxrq_jax/demo.py).

1. stage 1: trains the tiny RQ-VAE (configs/rqvae_mnist.py)             -> WORKDIR/stage1 (artifact in stage1/rqvae)
2. encodes the train and test digits into 8x8x4 code stacks              -> WORKDIR/codes
3. stage 2: trains the tiny Contextual RQ-Transformer (configs/demo.py)  -> WORKDIR/stage2
4. Draft-and-Revise samples for every class, as PNG grids + .npz         -> WORKDIR/samples

Every step resumes: re-running after an interruption continues where it stopped. The same modules and code paths
serve the ImageNet configs; only the configs differ. `smoke_configs()` gives the few-step settings of `--smoke`.
"""

from __future__ import annotations

import os
import time
from typing import Any

import ml_collections

from ctxrq_jax.core import config as configlib
from ctxrq_jax.core import reporting
from ctxrq_jax.sampling import runner
from ctxrq_jax.stage1 import encode
from ctxrq_jax.stage1 import trainer as stage1_trainer
from ctxrq_jax.stage2 import trainer as stage2_trainer

STAGE1_CONFIG = "rqvae_mnist"  # ctxrq_jax/configs/rqvae_mnist.py
STAGE2_CONFIG = "demo"  # ctxrq_jax/configs/demo.py


def default_configs(smoke: bool = False) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
  """(stage-1, stage-2) configs of the demo; `smoke` gives their few-step variants (an install check)."""
  arg = "smoke" if smoke else None
  return configlib.load_config_file(STAGE1_CONFIG, arg), configlib.load_config_file(STAGE2_CONFIG, arg)


def run(stage1_config: ml_collections.ConfigDict, stage2_config: ml_collections.ConfigDict, workdir: str,
        samples_per_class: int, views: tuple[str, ...] = ("center",)) -> dict[str, Any]:
  """Runs the four steps in `workdir`; returns {'stage1', 'stage2', 'timings', 'outputs'} (or {'stopped_at'}).

  `views`: the image views encoded per example (stage-2 augmentation with `data.random_view`; the demo's digits use
  the centre view only).
  """
  # Absolute paths: the stage-2 config records codes_dir / stage1_dir for sampling from any working directory.
  workdir = os.path.abspath(workdir)
  timings = {}
  t0 = time.time()
  stage1_dir = os.path.join(workdir, "stage1")
  rq_results = stage1_trainer.train_and_evaluate(stage1_config, stage1_dir)
  if "stopped_at" in rq_results:
    return rq_results
  artifact_dir = os.path.join(stage1_dir, stage1_trainer.ARTIFACT_DIR)
  timings["stage 1"] = time.time() - t0

  t0 = time.time()
  codes_dir = os.path.join(workdir, "codes")
  d = stage1_config.data
  encode.encode_dataset(artifact_dir, d, codes_dir, [d.train_split, d.eval_split], overwrite=True, views=views)
  timings["encode"] = time.time() - t0

  t0 = time.time()
  stage2_config = stage2_config.copy_and_resolve_references()
  with stage2_config.unlocked():
    stage2_config.data.codes_dir = codes_dir
    stage2_config.data.stage1_dir = artifact_dir
    stage2_config.data.train_split = d.train_split
    stage2_config.data.eval_split = d.eval_split
  stage2_dir = os.path.join(workdir, "stage2")
  tr_results = stage2_trainer.train_and_evaluate(stage2_config, stage2_dir)
  if tr_results["stopped"]:
    return {"stopped_at": tr_results["step"]}
  timings["stage 2"] = time.time() - t0

  t0 = time.time()
  outputs = runner.sample_all_classes(stage2_dir, os.path.join(workdir, "samples"),
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
