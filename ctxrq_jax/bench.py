"""Benchmarks (library: ctxrq_jax/evaluation/speed.py).

  python -m ctxrq_jax.bench sample --config=configs/imagenet.py:tiny --batch_size=100
      seconds and model FLOPs per sample of the jitted Draft-and-Revise sampler against the plain reference, for each
      T_draft (default 8, 32, 64; T_revise 2, M 2), random weights
  python -m ctxrq_jax.bench params
      parameter counts of the paper's model sizes and the ImageNet RQ-VAE (eval_shape, nothing allocated)
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from ctxrq_jax.core import cli

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  from ctxrq_jax.evaluation import speed  # pylint: disable=g-import-not-at-top
  if len(argv) == 2 and argv[1] == 'params':
    print(speed.param_table())
    return
  if len(argv) != 2 or argv[1] != 'sample':
    raise app.UsageError('usage: python -m ctxrq_jax.bench {sample --config=configs/imagenet.py:tiny [flags]|params}')
  if FLAGS.config is None:
    raise app.UsageError('--config is required (e.g. --config=configs/imagenet.py:tiny)')
  try:
    t_drafts = [int(t) for t in FLAGS.t_draft]
  except ValueError:
    raise app.UsageError(f'--t_draft must be integers, got {FLAGS.t_draft}') from None
  rows = speed.bench_sample(FLAGS.config, batch=FLAGS.batch_size, t_drafts=t_drafts, t_revise=FLAGS.t_revise,
                      num_revisions=FLAGS.num_revisions, repeats=FLAGS.repeats, reference=FLAGS.reference,
                      seed=FLAGS.seed)
  import jax  # pylint: disable=g-import-not-at-top
  print(f'Draft-and-Revise sampling, T_revise={FLAGS.t_revise}, M={FLAGS.num_revisions}, batch {FLAGS.batch_size}, '
        f'{jax.devices()[0].platform}, random weights')
  print(speed.format_table(rows))


def define_flags() -> None:
  """Command-line flags, defined only when run as a program (so modules import together)."""
  config_flags.DEFINE_config_file('config', None, 'Stage-2 config file (e.g. configs/imagenet.py:tiny).')
  flags.DEFINE_integer('batch_size', 100, 'Samples per batch (the paper uses 100).')
  flags.DEFINE_list('t_draft', ['8', '32', '64'], 'T_draft values to time.')
  flags.DEFINE_integer('t_revise', 2, 'T_revise.')
  flags.DEFINE_integer('num_revisions', 2, 'Number of revisions M.')
  flags.DEFINE_integer('repeats', 2, 'Timed calls per setting (after one warm-up call).')
  flags.DEFINE_bool('reference', True, 'Also time the plain reference implementation.')
  flags.DEFINE_integer('seed', 0, 'Seed of the random weights and of sampling.')


if __name__ == '__main__':
  cli.run(main, define_flags)
