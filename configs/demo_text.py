"""Text-to-image demo stage 2 on the embedded MNIST digits and their captions (`python -m ctxrq_jax.demo --task=text`).

The values live in the package (ctxrq_jax/configs/demo_text.py), so an installed wheel has them too; this file is the
user-facing entry point: `--stage2_config=configs/demo_text.py[:ARG]` (demo) or `--config=configs/demo_text.py[:ARG]`
(train). Copy it and override fields below to make your own.
"""

from ctxrq_jax.configs import demo_text as _defaults


def get_config(arg=None):
  config = _defaults.get_config(arg)
  # Your overrides, e.g. config.train.batch_size = 256 (the config is locked: new keys are refused).
  return config
