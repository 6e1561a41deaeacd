"""Stage 1: train an RQ-VAE tokenizer (library: ctxrq_jax/stage1/trainer.py).

  python -m ctxrq_jax.train_rqvae --config=configs/rqvae_mnist.py --workdir=runs/rqvae

Resumes from the newest checkpoint in the workdir; at the end writes the stage-1 artifact to WORKDIR/rqvae and prints
the held-out reconstruction metrics.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from ctxrq_jax.core import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Stage-1 config file, e.g. configs/rqvae_mnist.py.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, images and the exported artifact.")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from ctxrq_jax.core import host  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.stage1 import reconstruction  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.stage1 import trainer  # pylint: disable=g-import-not-at-top

  host.setup_host()
  results = trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if "stopped_at" in results:
    print(f"stopped at step {results['stopped_at']}; run the same command to resume")
    return
  print(reconstruction.format_rqvae_results(results))


if __name__ == "__main__":
  cli.run(main, define_flags)
