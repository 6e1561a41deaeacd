"""Stage 2: train Contextual RQ-Transformer on a code dataset (library: ctxrq_jax/stage2/trainer.py).

  python -m ctxrq_jax.train --config=configs/imagenet.py:821m --workdir=DIR \
      --config.data.codes_dir=CODES --config.data.stage1_dir=RQVAE

Resumes from the newest checkpoint in DIR; SIGTERM/SIGINT saves and exits 0, the same command continues.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from ctxrq_jax.core import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Stage-2 config file, e.g. configs/imagenet.py:821m.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs and config.json.")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from ctxrq_jax.core import host  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.core import reporting  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.stage2 import trainer  # pylint: disable=g-import-not-at-top

  host.setup_host()
  result = trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if result["stopped"]:
    print(f"stopped at step {result['step']}; run the same command to resume")
    return
  rows = [[k, v] for k, v in {**result["train"], **result["eval"]}.items()]
  print(reporting.table(rows, [f"stage 2, step {result['step']}", "value"]))


if __name__ == "__main__":
  cli.run(main, define_flags)
