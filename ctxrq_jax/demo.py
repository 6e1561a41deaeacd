"""The whole pipeline on the embedded MNIST digits, on a laptop CPU (library: ctxrq_jax/recipes/demo.py).

  python -m ctxrq_jax.demo --workdir=runs/demo            # the demo (about 5 minutes on 2 idle CPU cores)
  python -m ctxrq_jax.demo --workdir=/tmp/check --smoke   # every stage for a few steps: checks an install
  python -m ctxrq_jax.demo --workdir=runs/demo --task=text # text-to-image: captions such as "a wide thick
                                                           # rightward seven", prompts under the samples

Trains the RQ-VAE, encodes the digits, trains the Contextual RQ-Transformer and writes Draft-and-Revise samples under
the workdir, printing one progress line per stage and a results table. Re-running resumes every stage (a finished
demo prints its table again); one workdir holds one kind of run: --smoke or the full demo, and one --max_examples
(a workdir from a release whose demo model had another shape is refused at stage 2: use a new --workdir).
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from ctxrq_jax.core import cli
from ctxrq_jax.core import config as configlib

FLAGS = flags.FLAGS


def define_flags() -> None:
  config_flags.DEFINE_config_file("stage1_config", configlib.package_config_path("rqvae_mnist"),
                                  "Stage-1 (RQ-VAE) config.", lock_config=True)
  config_flags.DEFINE_config_file("stage2_config", configlib.package_config_path("demo"),
                                  "Stage-2 (Contextual RQ-Transformer) config (--task=text: default "
                                  "configs/demo_text.py).", lock_config=True)
  flags.DEFINE_enum("task", "class", ["class", "text"], "class: class-conditional samples; text: text-to-image on "
                    "captions made from each digit's class and measured attributes.")
  flags.DEFINE_string("workdir", "runs/demo", "Where every stage writes its outputs.")
  flags.DEFINE_integer("samples_per_class", 10, "Samples drawn for each class (--task=text: each prompt) in the "
                       "final grids.")
  flags.DEFINE_integer("max_examples", None, lower_bound=1,
                       help="Encode only the first this many digits of each split, and train stage 2 on them "
                       "(default: all; --smoke: 500, the held-out split's size). The digits come sorted by class: "
                       "below 4500 the later classes are left out of training. --task=class only.")
  flags.DEFINE_bool("smoke", False, "Run every stage for a few steps (the configs' 'smoke' variants) to check an "
                    "install in about a minute; the samples are noise.")


def _overridden(config_flag: str) -> bool:
  """Whether the command line overrides a key of `config_flag` (--NAME.section.key=value)."""
  return any(name.startswith(config_flag + ".") and FLAGS[name].present for name in FLAGS)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from ctxrq_jax.core import host  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.recipes import demo  # pylint: disable=g-import-not-at-top

  host.setup_host()
  text = FLAGS.task == "text"
  stage1, stage2 = FLAGS.stage1_config, FLAGS.stage2_config
  if text and not FLAGS["stage2_config"].present:
    if _overridden("stage2_config"):
      raise app.UsageError("--stage2_config.KEY=VALUE overrides apply to configs/demo.py unless a config is given; "
                           "for --task=text pass --stage2_config=configs/demo_text.py before them")
    stage2 = demo.default_text_configs()[1]
  samples_per_class, max_examples = FLAGS.samples_per_class, FLAGS.max_examples
  if samples_per_class < 1:  # checked now, not after the training stages
    raise app.UsageError(f"--samples_per_class must be >= 1, got {samples_per_class}")
  if max_examples is not None and text:
    raise app.UsageError("--max_examples is for --task=class; the text demo encodes every digit")
  if FLAGS.smoke:
    if any(FLAGS[name].present or _overridden(name) for name in ("stage1_config", "stage2_config")):
      raise app.UsageError("--smoke uses the demo's own smoke configs; leave out --stage1_config/--stage2_config")
    stage1, stage2 = (demo.default_text_configs if text else demo.default_configs)(smoke=True)
    samples_per_class = 2 if not FLAGS["samples_per_class"].present else samples_per_class
    if not text and max_examples is None:
      max_examples = demo.SMOKE_MAX_EXAMPLES
  if text:
    summary = demo.run_text(stage1, stage2, FLAGS.workdir, samples_per_class, smoke=FLAGS.smoke)
  else:
    summary = demo.run(stage1, stage2, FLAGS.workdir, samples_per_class, max_examples=max_examples, smoke=FLAGS.smoke)
  if "stopped_at" in summary:
    print(f"stopped at step {summary['stopped_at']}; run the same command to resume")
    return
  print(demo.format_summary(summary))


if __name__ == "__main__":
  cli.run(main, define_flags)
