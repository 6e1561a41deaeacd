"""Class-conditional ImageNet 256x256 stage 2: Contextual RQ-Transformer on 8x8x4 RQ-VAE codes.

The values live in the package (ctxrq_jax/configs/imagenet.py), so an installed wheel has them too; this file is the
user-facing entry point: `--config=configs/imagenet.py[:ARG]`. Copy it and override fields below to make your own.
"""

from ctxrq_jax.configs import imagenet as _defaults


def get_config(arg=None):
  config = _defaults.get_config(arg)
  # Your overrides, e.g. config.train.batch_size = 256 (the config is locked: new keys are refused).
  return config
