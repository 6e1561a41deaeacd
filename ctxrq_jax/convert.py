"""Convert released PyTorch weights: the RQ-VAE (kakaobrain/rq-vae-transformer) into a stage-1 artifact,
pytorch-fid's FID Inception into the artifact the FID commands read, and OpenAI's CLIP ViT-B/32 into the artifact
`evaluate clip` reads.

  pip install 'ctxrq_jax[torch]'
  python -m ctxrq_jax.convert rqvae --checkpoint=PATH/model.pt --out=DIR [--use_ema] [--allow_pickle]
  python -m ctxrq_jax.convert inception --checkpoint=pt_inception-2015-12-05-6726825d.pth --out=DIR
  python -m ctxrq_jax.convert clip --checkpoint=ViT-B-32.pt --out=DIR [--nocheck_hash]

The reference `config.yaml` beside the checkpoint (or --reference_config) gives the architecture; the mapping
(ctxrq_jax/models/rqvae_convert.py) is explicit and total, and a missing, unexpected or mis-shaped key is an error
naming it. A flag the chosen converter does not read (`SUBCOMMAND_FLAGS`, checked by `core.cli.check_flags`:
--use_ema for inception, --check_hash for rqvae, ...) is an error rather than silently ignored.
"""

from __future__ import annotations

from absl import app
from absl import flags

from ctxrq_jax.core import cli

FLAGS = flags.FLAGS
SUBCOMMANDS = ("rqvae", "inception", "clip")
# The flags only some converters read (--checkpoint, --out and --overwrite apply to all): naming one for another
# converter is a mistake, e.g. `convert rqvae --nocheck_hash` would look like it turned off a check rqvae lacks.
SUBCOMMAND_FLAGS = {"check_hash": ("inception", "clip"), "use_ema": ("rqvae",), "reference_config": ("rqvae",),
                    "allow_pickle": ("rqvae",)}


def define_flags() -> None:
  flags.DEFINE_string("checkpoint", None, "rqvae: reference PyTorch checkpoint (model.pt with config.yaml beside "
                      "it); inception: pytorch-fid's pt_inception-2015-12-05-6726825d.pth; clip: OpenAI's "
                      "ViT-B-32.pt.")
  flags.DEFINE_string("out", None, "Artifact directory to write.")
  flags.DEFINE_bool("check_hash", True, "inception/clip: require the SHA-256 of the released file.")
  flags.DEFINE_bool("use_ema", False, "rqvae: convert state_dict_ema instead of state_dict.")
  flags.DEFINE_string("reference_config", None, "rqvae: reference config.yaml (default: config.yaml beside "
                      "--checkpoint).")
  flags.DEFINE_bool("allow_pickle", False, "rqvae: torch.load with weights_only=False (trusted files only, e.g. a "
                    "reference trainer model.pt with optimizer state); globals of modules not installed (omegaconf) "
                    "become inert stand-ins.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing artifact at --out.")


def _check_rqvae_paths(checkpoint: str, reference_config: str | None) -> None:
  """The rqvae converter's file mistakes, said as they are: a directory for the checkpoint, a config named by
  --reference_config that is missing, or no config.yaml beside the checkpoint."""
  from ctxrq_jax.core import paths  # pylint: disable=g-import-not-at-top

  if paths.path(checkpoint).is_dir():
    raise IsADirectoryError(f"--checkpoint={checkpoint} is a directory; name the checkpoint file in it (e.g. "
                            f"{paths.path(checkpoint) / 'model.pt'})")
  if reference_config is not None:
    if paths.path(reference_config).is_dir():
      raise IsADirectoryError(f"--reference_config={reference_config} is a directory, not a config.yaml file")
    if not paths.path(reference_config).exists():
      raise FileNotFoundError(f"--reference_config={reference_config} does not exist")
  elif paths.path(checkpoint).is_file() and not (paths.path(checkpoint).parent / "config.yaml").exists():
    raise FileNotFoundError(f"{paths.path(checkpoint).parent / 'config.yaml'} does not exist: the reference's "
                            "config.yaml lies beside its checkpoint; name it with --reference_config=FILE otherwise")


def main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in SUBCOMMANDS:
    raise app.UsageError("usage: python -m ctxrq_jax.convert {rqvae|inception|clip} --checkpoint=PATH --out=DIR")
  cli.check_flags("convert", argv[1], SUBCOMMAND_FLAGS)
  if not FLAGS.checkpoint or not FLAGS.out:
    raise app.UsageError("--checkpoint and --out are required")
  from ctxrq_jax.core import paths  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.models import variables_files  # pylint: disable=g-import-not-at-top
  if not FLAGS.overwrite and (paths.path(FLAGS.out) / variables_files.VARIABLES_DIR).exists():  # before the reading
    raise app.UsageError(f"{FLAGS.out} already holds an artifact; pass --overwrite to replace it, or choose another "
                         "--out")
  checked = "SHA-256 checked" if FLAGS.check_hash else "SHA-256 not checked"
  if argv[1] == "inception":
    from ctxrq_jax.models import inception_convert  # pylint: disable=g-import-not-at-top
    inception_convert.convert_file(FLAGS.checkpoint, FLAGS.out, overwrite=FLAGS.overwrite,
                                   check_hash=FLAGS.check_hash)
    print(f"wrote FID Inception artifact {FLAGS.out} (from {FLAGS.checkpoint}, {checked})")
    return
  if argv[1] == "clip":
    from ctxrq_jax.models import clip_convert  # pylint: disable=g-import-not-at-top
    config, _ = clip_convert.convert_file(FLAGS.checkpoint, FLAGS.out, overwrite=FLAGS.overwrite,
                                          check_hash=FLAGS.check_hash)
    print(f"wrote CLIP artifact {FLAGS.out} (from {FLAGS.checkpoint}, {checked}): image {config.image_size}px, "
          f"patch {config.patch_size}, embedding {config.embed_dim}")
    return
  _check_rqvae_paths(FLAGS.checkpoint, FLAGS.reference_config)
  from ctxrq_jax.models import rqvae  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.models import rqvae_convert  # pylint: disable=g-import-not-at-top

  cfg = rqvae_convert.run(FLAGS.checkpoint, FLAGS.out, use_ema=FLAGS.use_ema, config_path=FLAGS.reference_config,
                          allow_pickle=FLAGS.allow_pickle, overwrite=FLAGS.overwrite)
  h, w, d = rqvae.RQVAE.from_config(cfg).code_shape
  print(f"wrote stage-1 artifact {FLAGS.out}: codes {h}x{w}x{d}, K={cfg.codebook_size}, n_z={cfg.embed_dim}")


if __name__ == "__main__":
  cli.run(main, define_flags)
