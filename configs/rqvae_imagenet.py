"""Stage-1 RQ-VAE for ImageNet 256x256: the reference 8x8x4 model (codes [8, 8, 4], K = 16384).

The values live in the package (ctxrq_jax/configs/rqvae_imagenet.py), so an installed wheel has them too; this file is the
user-facing entry point: `--config=configs/rqvae_imagenet.py[:ARG]`. Copy it and override fields below to make your own.
"""

from ctxrq_jax.configs import rqvae_imagenet as _defaults


def get_config(arg=None):
  config = _defaults.get_config(arg)
  # Your overrides, e.g. config.train.batch_size = 256 (the config is locked: new keys are refused).
  return config
