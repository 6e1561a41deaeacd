"""The whole pipeline on the embedded MNIST digits, end to end, on a laptop CPU.

  python -m ctxrq_jax.demo --workdir=runs/demo

1. stage 1: trains the tiny RQ-VAE (configs/rqvae_mnist.py)          -> WORKDIR/stage1 (artifact in stage1/rqvae)
2. encodes the train and test digits into 8x8x4 code stacks           -> WORKDIR/codes
3. stage 2: trains the tiny Contextual RQ-Transformer (configs/demo.py) -> WORKDIR/stage2
4. Draft-and-Revise samples for every class, as PNG grids + .npz      -> WORKDIR/samples

Every step resumes: re-running the command after an interruption continues where it stopped. The same modules and
code paths serve the ImageNet configs; only the configs differ.
"""

from __future__ import annotations

import os
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from ctxrq_jax import configlib
from ctxrq_jax import encode
from ctxrq_jax import evaluate
from ctxrq_jax import runtime
from ctxrq_jax import sample
from ctxrq_jax import train
from ctxrq_jax import train_rqvae


def run(stage1_config: ml_collections.ConfigDict, stage2_config: ml_collections.ConfigDict, workdir: str,
        samples_per_class: int) -> dict[str, Any]:
  """Runs the four steps in `workdir`; returns a summary dict (metrics and output paths)."""
  # Absolute paths: the stage-2 config records codes_dir / stage1_dir for sampling from any working directory.
  workdir = os.path.abspath(workdir)
  timings = {}
  t0 = time.time()
  stage1_dir = os.path.join(workdir, "stage1")
  rq_results = train_rqvae.train_and_evaluate(stage1_config, stage1_dir)
  if "stopped_at" in rq_results:
    return rq_results
  artifact = os.path.join(stage1_dir, train_rqvae.ARTIFACT_DIR)
  timings["stage1_s"] = time.time() - t0

  t0 = time.time()
  codes_dir = os.path.join(workdir, "codes")
  encode.encode_dataset(artifact, stage1_config.data, codes_dir,
                        [stage1_config.data.split_train, stage1_config.data.split_eval], overwrite=True)
  timings["encode_s"] = time.time() - t0

  t0 = time.time()
  stage2_config = stage2_config.copy_and_resolve_references()
  with stage2_config.unlocked():
    stage2_config.data.codes_dir = codes_dir
    stage2_config.data.stage1_dir = artifact
    stage2_config.data.train_split = stage1_config.data.split_train
    stage2_config.data.eval_split = stage1_config.data.split_eval
  stage2_dir = os.path.join(workdir, "stage2")
  tr_results = train.train_and_evaluate(stage2_config, stage2_dir)
  if tr_results["stopped"]:
    return {"stopped_at": tr_results["step"]}
  timings["stage2_s"] = time.time() - t0

  t0 = time.time()
  outputs = sample.sample_all_classes(stage2_dir, os.path.join(workdir, "samples"),
                                      samples_per_class=samples_per_class)
  timings["sample_s"] = time.time() - t0
  summary = {"stage1": rq_results, "timings": timings, "outputs": outputs}
  print("\n== ctxrq_jax demo ==")
  print("stage 1 (held-out):\n" + evaluate.format_rqvae_results(rq_results))
  print("timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
  for name, path in outputs.items():
    print(f"{name}: {path}")
  return summary


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags, defined only when run as a program (so modules import together)."""
  config_flags.DEFINE_config_file("stage1_config", os.path.join(configlib.CONFIG_DIR, "rqvae_mnist.py"),
                                  "Stage-1 (RQ-VAE) config.", lock_config=True)
  config_flags.DEFINE_config_file("stage2_config", os.path.join(configlib.CONFIG_DIR, "demo.py"),
                                  "Stage-2 (Contextual RQ-Transformer) config.", lock_config=True)
  flags.DEFINE_string("workdir", "runs/demo", "Where every stage writes its outputs.")
  flags.DEFINE_integer("samples_per_class", 10, "Samples drawn for each class in the final grids.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  runtime.setup_host()
  logging.info("Writing everything under %s", os.path.abspath(FLAGS.workdir))
  run(FLAGS.stage1_config, FLAGS.stage2_config, FLAGS.workdir, FLAGS.samples_per_class)


if __name__ == "__main__":
  define_flags()
  app.run(main)
