"""Convert released PyTorch weights: the RQ-VAE (kakaobrain/rq-vae-transformer) into a stage-1 artifact,
pytorch-fid's FID Inception into the artifact the FID commands read, and OpenAI's CLIP ViT-B/32 into the artifact
`evaluate clip` reads.

  pip install 'ctxrq_jax[torch]'
  python -m ctxrq_jax.convert rqvae --checkpoint=PATH/model.pt --out=DIR [--use_ema] [--allow_pickle]
  python -m ctxrq_jax.convert inception --checkpoint=pt_inception-2015-12-05-6726825d.pth --out=DIR
  python -m ctxrq_jax.convert clip --checkpoint=ViT-B-32.pt --out=DIR [--nocheck_hash]

The reference `config.yaml` beside the checkpoint gives the architecture; the mapping (ctxrq_jax/models/
rqvae_convert.py) is explicit and total, and a missing, unexpected or mis-shaped key is an error naming it.
"""

from absl import app
from absl import flags

from ctxrq_jax.core import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("checkpoint", None, "rqvae: reference PyTorch checkpoint (model.pt with config.yaml beside "
                      "it); inception: pytorch-fid's pt_inception-2015-12-05-6726825d.pth; clip: OpenAI's "
                      "ViT-B-32.pt.")
  flags.DEFINE_string("out", None, "Artifact directory to write.")
  flags.DEFINE_bool("check_hash", True, "inception/clip: require the SHA-256 of the released file.")
  flags.DEFINE_bool("use_ema", False, "Convert state_dict_ema instead of state_dict.")
  flags.DEFINE_string("reference_config", None, "Reference config.yaml (default: config.yaml beside --checkpoint).")
  flags.DEFINE_bool("allow_pickle", False, "torch.load with weights_only=False (trusted files only).")
  flags.DEFINE_bool("overwrite", False, "Replace an existing artifact at --out.")


def main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in ("rqvae", "inception", "clip"):
    raise app.UsageError("usage: python -m ctxrq_jax.convert {rqvae|inception|clip} --checkpoint=PATH --out=DIR")
  if not FLAGS.checkpoint or not FLAGS.out:
    raise app.UsageError("--checkpoint and --out are required")
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
  from ctxrq_jax.models import rqvae  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.models import rqvae_convert  # pylint: disable=g-import-not-at-top

  cfg = rqvae_convert.run(FLAGS.checkpoint, FLAGS.out, use_ema=FLAGS.use_ema, config_path=FLAGS.reference_config,
                          allow_pickle=FLAGS.allow_pickle, overwrite=FLAGS.overwrite)
  h, w, d = rqvae.RQVAE.from_config(cfg).code_shape
  print(f"wrote stage-1 artifact {FLAGS.out}: codes {h}x{w}x{d}, K={cfg.codebook_size}, n_z={cfg.embed_dim}")


if __name__ == "__main__":
  cli.run(main, define_flags)
