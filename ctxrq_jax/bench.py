"""Benchmarks (library: ctxrq_jax/benchmarks/speed.py).

  python -m ctxrq_jax.bench sample --config=configs/imagenet.py:bench512 --batch_size=32 --noreference
      seconds, model FLOPs and GFLOP/s per sample of the jitted Draft-and-Revise sampler for each T_draft (default
      8, 32, 64; T_revise 2, M 2), random weights, against a matmul probe measured in the same run; --reference also
      times the plain reference sampler; --baseline=official --baseline_src=PATH (a checkout of
      kakaobrain/rq-vae-transformer, torch installed) the official PyTorch RQ-Transformer sampler at the same dims
  python -m ctxrq_jax.bench train --config=configs/imagenet.py:bench512 --batch_size=32
      one stage-2 training step (forward + backward + AdamW): seconds and MFU against the probe (and the device's
      peak when known); with --baseline=official the official RQ-Transformer training step at the same dims
  python -m ctxrq_jax.bench train --config=configs/demo.py --batch_size=32 --one_step_per_call
      the step as the config's trainer runs it (train.steps_per_call steps per compiled call), and one step per call
  python -m ctxrq_jax.bench sample --config=configs/cc3m.py:333m --batch_size=8 --t_draft=64 --noreference
  python -m ctxrq_jax.bench train --config=configs/cc3m.py:333m --batch_size=8
      the same for a text-to-image config: each condition is L = 32 random tokens of the 16,384-token caption vocabulary
  python -m ctxrq_jax.bench stage1 --config=configs/rqvae_imagenet.py --batch_size=2
      one stage-1 (RQ-VAE) training step for the recipe's cumulative loss terms (recon, + LPIPS, + GAN with the
      adaptive weight): XLA FLOPs and seconds per step, so each term's cost is one row minus the row above
  python -m ctxrq_jax.bench device --config=configs/imagenet.py:821m
      the accelerator checks of bench/device.sh: Table 4 in bf16 at batch 100 (the codes, and decoding them with
      the --rqvae_config RQ-VAE), one training step at the largest batch that fits, and bf16 against fp32 on the
      tiny config, within --deadline_s of the start
  python -m ctxrq_jax.bench params
      parameter counts of the paper's model sizes and the ImageNet RQ-VAE (eval_shape, nothing allocated)
  python -m ctxrq_jax.bench fid --workdir=/tmp/bench_fid --fid_samples=1000,5000 --fid_reference=1000
      wall time and peak RSS of `evaluate fid` (each run its own process) on random images with a random-weight
      FID Inception, and how much peak memory grows with the number of samples
"""

import sys
import time

_STARTED = time.perf_counter()  # `bench device`'s deadline counts from here, before the imports below and JAX's

from absl import app
from absl import flags
from ml_collections import config_flags

from ctxrq_jax.core import cli

FLAGS = flags.FLAGS
_USAGE = ('usage: python -m ctxrq_jax.bench {sample|train|device} --config=configs/imagenet.py:bench512 [flags] '
          '| stage1 --config=configs/rqvae_imagenet.py | params | fid --workdir=DIR')


def _log(message: str) -> None:
  print(message, flush=True)


def _official_src() -> str | None:
  if FLAGS.baseline not in ('', 'official'):
    raise app.UsageError(f"--baseline must be '' or 'official', got {FLAGS.baseline!r}")
  if FLAGS.baseline == 'official' and not FLAGS.baseline_src:
    raise app.UsageError('--baseline=official needs --baseline_src=PATH, a checkout of kakaobrain/rq-vae-transformer')
  return FLAGS.baseline_src if FLAGS.baseline == 'official' else None


def _ints(name: str, minimum: int = 1) -> list[int]:
  """The integers of list flag `name`; UsageError unless each is >= `minimum` (and there is at least one)."""
  try:
    values = [int(t) for t in FLAGS[name].value]
  except ValueError:
    raise app.UsageError(f'--{name} must be integers, got {FLAGS[name].value}') from None
  if not values or min(values) < minimum:
    raise app.UsageError(f'--{name} must be integers >= {minimum}, got {FLAGS[name].value}')
  return values


def main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in ('sample', 'train', 'device', 'stage1', 'params', 'fid'):
    raise app.UsageError(_USAGE)
  command = argv[1]
  if command == 'fid':
    if not FLAGS.workdir:
      raise app.UsageError('fid needs --workdir (where the random images and weights are written)')
    from ctxrq_jax.benchmarks import fid_cost  # pylint: disable=g-import-not-at-top
    rows = fid_cost.bench_fid(FLAGS.workdir, sample_counts=_ints('fid_samples', minimum=2),
                              reference_count=FLAGS.fid_reference, image_size=FLAGS.fid_image_size,
                              batch_size=FLAGS.fid_batch_size, seed=FLAGS.seed, log=_log)
    print(fid_cost.format_table(rows))
    return
  if command == 'stage1':
    if FLAGS.config is None or 'quantizer' not in FLAGS.config:
      raise app.UsageError('stage1 needs --config=<a stage-1 config>, e.g. --config=configs/rqvae_imagenet.py')
    import jax  # pylint: disable=g-import-not-at-top
    from ctxrq_jax.benchmarks import stage1_step  # pylint: disable=g-import-not-at-top
    from ctxrq_jax.stage1 import trainer as stage1_trainer  # pylint: disable=g-import-not-at-top
    # The checks `train_rqvae` makes, before anything is built (a ConfigError is a one-line user error).
    stage1_trainer.require_stage1_config(FLAGS.config)
    stage1_trainer.validate_config(FLAGS.config)
    rows = stage1_step.bench_stage1(FLAGS.config, batch=FLAGS.batch_size, repeats=FLAGS.repeats, seed=FLAGS.seed)
    print(f"Stage-1 training step (forward + backward + Adam + codebook EMA; the discriminator's update with the GAN "
          f"term), {FLAGS.config.model.resolution}x{FLAGS.config.model.resolution} random images, "
          f"{jax.devices()[0].platform}, random weights")
    print(stage1_step.format_table(rows))
    return
  from ctxrq_jax.benchmarks import speed  # pylint: disable=g-import-not-at-top
  if command == 'params':
    print(speed.param_table())
    return
  if command == 'device' and FLAGS.config is None:
    from ctxrq_jax.core import config as configlib  # pylint: disable=g-import-not-at-top
    config = configlib.load_config_file('imagenet', '821m')
  elif FLAGS.config is None:
    raise app.UsageError('--config is required (e.g. --config=configs/imagenet.py:bench512)')
  else:
    config = FLAGS.config
  import jax  # pylint: disable=g-import-not-at-top
  platform = jax.devices()[0].platform
  official_src = _official_src()
  if official_src and int(config.model.num_classes) == 0:
    raise app.UsageError('--baseline=official times the official class-conditional ImageNet model; this config is '
                         'text-to-image (model.num_classes 0)')
  if command == 'sample':
    rows = speed.bench_sample(config, batch=FLAGS.batch_size, t_drafts=_ints('t_draft'), t_revise=FLAGS.t_revise,
                              num_revisions=FLAGS.num_revisions, repeats=FLAGS.repeats, reference=FLAGS.reference,
                              seed=FLAGS.seed, probe=FLAGS.probe, official_src=official_src,
                              official_repeats=FLAGS.repeats)
    print(f'Draft-and-Revise sampling, T_revise={FLAGS.t_revise}, M={FLAGS.num_revisions}, batch {FLAGS.batch_size}, '
          f'{platform}, {config.model.dtype}, random weights')
    print(speed.format_table(rows))
  elif command == 'train':
    result = speed.bench_train(config, batch=FLAGS.batch_size, repeats=FLAGS.repeats, seed=FLAGS.seed,
                               probe=FLAGS.probe)
    official = None
    if official_src:
      from ctxrq_jax.benchmarks import official as official_lib  # pylint: disable=g-import-not-at-top
      official = official_lib.time_train_step(official_src, config, batch=FLAGS.batch_size, repeats=FLAGS.repeats,
                                              seed=FLAGS.seed)
      official['model_flops'] = result['all_positions_flops']  # same dims; its loss reads every position
    per_call = result['steps_per_call']
    print(f'Stage-2 training step (forward + backward + AdamW), batch {FLAGS.batch_size}, {platform}, '
          f'{config.model.dtype}, remat {config.model.remat}, random codes'
          + (f', {per_call} steps per call (s/step = s/call / {per_call})' if per_call > 1 else ''))
    print(speed.format_train(result, official))
    if FLAGS.all_positions and int(config.train.mask_group) > 1:
      plain = config.copy_and_resolve_references()
      with plain.unlocked():
        plain.train.mask_group = 1
      every = speed.bench_train(plain, batch=FLAGS.batch_size, repeats=FLAGS.repeats, seed=FLAGS.seed, probe=False)
      print(f"every position through the depth transformer (train.mask_group 1): {every['step_s']:.4f} s/step; "
            f"mask groups of {config.train.mask_group}: {result['step_s']:.4f} s/step, "
            f"{every['step_s'] / result['step_s']:.2f}x faster")
    if FLAGS.one_step_per_call and per_call > 1:
      single = config.copy_and_resolve_references()
      with single.unlocked():
        single.train.steps_per_call = 1
      one = speed.bench_train(single, batch=FLAGS.batch_size, repeats=FLAGS.repeats * per_call, seed=FLAGS.seed,
                              probe=False)
      print(f"one step per call (train.steps_per_call 1): {one['step_s']:.4f} s/step; {per_call} steps per call: "
            f"{result['step_s']:.4f} s/step, {one['step_s'] / result['step_s']:.2f}x faster")
  else:
    _device(config, platform)


def _device(config, platform: str) -> None:
  """`bench device`: the checks, then their tables; exit status 1 if a check failed, 3 if cut at --exit_by_s."""
  import os  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.benchmarks import speed  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.core import config as configlib  # pylint: disable=g-import-not-at-top
  if platform == 'cpu' and os.environ.get('JAX_PLATFORMS', '') != 'cpu':
    raise app.UsageError('bench device found no GPU or TPU (JAX runs on the CPU: is the CUDA plugin installed?); '
                         'set JAX_PLATFORMS=cpu to run the checks on the CPU anyway')
  check = FLAGS.check_config or configlib.load_config_file('imagenet', 'tiny')
  rqvae_config = FLAGS.rqvae_config or configlib.load_config_file('rqvae_imagenet')
  if 'quantizer' not in rqvae_config:
    raise app.UsageError('--rqvae_config must be a stage-1 config, e.g. configs/rqvae_imagenet.py')

  def report(out: dict, cut: str = '') -> list[str]:
    """Prints the tables of what has run; returns the problems to report as errors."""
    if out['sample']:
      print(f"Table 4 protocol: batch {FLAGS.batch_size}, T_revise={FLAGS.t_revise}, M={FLAGS.num_revisions}, "
            f"{platform}, {config.model.dtype}, random weights; s/sample = the codes; + decode s = the RQ-VAE decode "
            f"to uint8 pixels at the default float32 precision, {FLAGS.batch_size} per call (the official script's "
            f"total adds its decode: one sample per call, TF32 on a GPU)")
      print(speed.format_table(out['sample']))
    if out['train']:
      print(speed.format_train(out['train']))
    if out['skipped']:
      print(f"skipped (deadline {FLAGS.deadline_s:.0f} s): {', '.join(out['skipped'])}")
    problems = [f"failed: {', '.join(out['failed'])} (tracebacks above)"] if out['failed'] else []
    precision = out['precision']
    if precision is not None and not (precision['finite'] and precision['sampled_ok']):
      problems.append('the bf16 sampler check failed')
    if cut:
      problems.append(f'cut at --exit_by_s={FLAGS.exit_by_s:.0f} s during: {cut}')
    for problem in problems:
      print(f'error: {problem}', file=sys.stderr)
    return problems

  def overrun(out: dict, in_flight: str) -> None:  # the watchdog thread: report what ran, end the process
    report(out, in_flight or 'between checks')
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(3)  # pylint: disable=protected-access - the main thread may be inside an XLA compile

  out = speed.bench_device(config, batch=FLAGS.batch_size, t_drafts=_ints('t_draft'), t_revise=FLAGS.t_revise,
                           num_revisions=FLAGS.num_revisions, train_batches=_ints('train_batches'),
                           check_config=check, check_batch=FLAGS.check_batch, rqvae_config=rqvae_config,
                           deadline_s=FLAGS.deadline_s, seed=FLAGS.seed, log=_log, started=_STARTED,
                           memory_limit=FLAGS.memory_limit_gb * 2**30 if FLAGS.memory_limit_gb else None,
                           exit_by_s=FLAGS.exit_by_s or None, on_overrun=overrun)
  if report(out):
    sys.exit(1)


def define_flags() -> None:
  """Command-line flags, defined only when run as a program (so modules import together)."""
  config_flags.DEFINE_config_file('config', None, 'Stage-2 config file (e.g. configs/imagenet.py:bench512).')
  flags.DEFINE_integer('batch_size', 100, 'Samples per batch (the paper uses 100); the training batch for `train` '
                       'and `stage1`.', lower_bound=1)
  flags.DEFINE_list('t_draft', ['8', '32', '64'], 'T_draft values to time.')
  flags.DEFINE_integer('t_revise', 2, 'T_revise.', lower_bound=1)
  flags.DEFINE_integer('num_revisions', 2, 'Number of revisions M.', lower_bound=0)
  flags.DEFINE_integer('repeats', 2, 'Timed calls per setting (after one warm-up call).', lower_bound=1)
  flags.DEFINE_bool('reference', True, 'Also time the plain reference implementation (sample).')
  flags.DEFINE_bool('all_positions', False, 'train: also time the step with every position through the depth '
                    'transformer (train.mask_group 1) in the same run, and print the ratio.')
  flags.DEFINE_bool('probe', True, 'Measure a matmul probe at the model MLP shape in the same run (GFLOP/s, MFU).')
  flags.DEFINE_bool('one_step_per_call', False, "train: with the config's train.steps_per_call k > 1, also time one "
                    'step per call in the same run, and print the ratio.')
  flags.DEFINE_string('baseline', '', "'official': also time the official PyTorch RQ-Transformer (sample, train).")
  flags.DEFINE_string('baseline_src', '', 'Checkout of kakaobrain/rq-vae-transformer for --baseline=official.')
  # Not 1024 for 821M: its mask-group logits [B/8, 361, 4, 16384] would hold 3.0e9 elements, past 2^31, where GPU
  # kernels that index in 32 bits are known to fail.
  flags.DEFINE_list('train_batches', ['512', '256', '128', '64', '32'],
                    'device: training batches to try, the largest that fits is timed.')
  flags.DEFINE_float('memory_limit_gb', 0.0, "device: a training batch fits when XLA's memory estimate of the step "
                     "is within this many GiB (0: the device's own limit, none on a CPU).", lower_bound=0.0)
  flags.DEFINE_integer('check_batch', 8, 'device: batch of the bf16-vs-fp32 check on the tiny config.',
                       lower_bound=1)
  config_flags.DEFINE_config_file('check_config', None, 'device: config of the bf16-vs-fp32 check (default '
                                  'configs/imagenet.py:tiny; overrides as for --config, e.g. a smaller one on a CPU).')
  config_flags.DEFINE_config_file('rqvae_config', None, 'device: the stage-1 config whose decoder turns the codes '
                                  'into pixels (default configs/rqvae_imagenet.py, 8x8x4 codes to 256x256).')
  flags.DEFINE_float('exit_by_s', 0.0, 'device: seconds from the start at which a check still running is cut: the '
                     'tables of what ran are printed and the process exits with status 3 (0: never; bench/device.sh '
                     'sets TIMEOUT_S - 15).', lower_bound=0.0)
  flags.DEFINE_float('deadline_s', 400.0, 'device: seconds from the start after which no check starts; one starts '
                     'only if the time left is 1.2x what the previous check of its kind took.', lower_bound=0.0)
  flags.DEFINE_integer('seed', 0, 'Seed of the random weights and of sampling.', lower_bound=0)
  flags.DEFINE_string('workdir', None, 'fid: directory for the random images and the random-weight Inception.')
  flags.DEFINE_list('fid_samples', ['1000', '5000'], 'fid: sample-set sizes, each timed in its own process.')
  flags.DEFINE_integer('fid_reference', 1000, 'fid: images in the reference file.', lower_bound=2)
  flags.DEFINE_integer('fid_image_size', 64, 'fid: side of the random images (the network sees them at 299).',
                       lower_bound=1)
  flags.DEFINE_integer('fid_batch_size', 64, 'fid: images per Inception call.', lower_bound=1)


if __name__ == '__main__':
  cli.run(main, define_flags)
