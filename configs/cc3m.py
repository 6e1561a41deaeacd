"""Text-to-image CC-3M stage 2: Contextual RQ-Transformer on 8x8x4 RQ-VAE codes and 32 BPE caption tokens.

The values live in the package (ctxrq_jax/configs/cc3m.py), so an installed wheel has them too; this file is the
user-facing entry point: `--config=configs/cc3m.py[:333m|654m]`. Copy it and override fields below to make your own.
"""

from ctxrq_jax.configs import cc3m as _defaults


def get_config(arg=None):
  config = _defaults.get_config(arg)
  # Your overrides, e.g. config.data.tokenizer_dir = "/data/bpe16k" (the config is locked: new keys are refused).
  return config
