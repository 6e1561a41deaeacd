"""Tiny stage-1 RQ-VAE on the embedded MNIST digits: 32x32x1 images (28 zero-padded to 32), codes [8, 8, 4].

The values live in the package (ctxrq_jax/configs/rqvae_mnist.py), so an installed wheel has them too; this file is the
user-facing entry point: `--config=configs/rqvae_mnist.py[:ARG]`. Copy it and override fields below to make your own.
"""

from ctxrq_jax.configs import rqvae_mnist as _defaults


def get_config(arg=None):
  config = _defaults.get_config(arg)
  # Your overrides, e.g. config.train.batch_size = 256 (the config is locked: new keys are refused).
  return config
