"""Tiny stage-1 RQ-VAE on the embedded MNIST digits: 32x32x1 images (28 zero-padded to 32), codes [8, 8, 4].

Small enough to train in about 2 minutes on two idle CPU cores (360 steps at ~3 steps/s, batch 32); used by the demo.
K = 64 keeps more than half of the codes in use at every depth on held-out digits (K = 256 left depth 1 at 34%).

Usage: --config=configs/rqvae_mnist.py (or configs/rqvae_mnist.py:smoke for the install check)
"""

import ml_collections
from ml_collections import config_dict

from ctxrq_jax.configs import common
from ctxrq_jax.core.config import ConfigError


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the locked config; `arg` 'smoke' shrinks the run to seconds (`python -m ctxrq_jax.demo --smoke`)."""
  if arg not in (None, "", "smoke"):
    raise ConfigError(f"unknown argument {arg!r} for configs/rqvae_mnist.py; expected nothing or 'smoke'")
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = "embedded_mnist"  # the 5,000 digits shipped offline (see data/)
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.data_dir = config_dict.placeholder(str)
  c.data.manual_dir = config_dict.placeholder(str)
  c.data.image_size = 32
  c.data.channels = 1
  c.data.resize = "pad"  # 28x28 -> 32x32 with background (-1) borders
  c.data.random_flip = False  # digits are not mirror-symmetric
  c.data.num_classes = 10
  c.data.eval_examples = 500

  c.model = ml_collections.ConfigDict()
  c.model.resolution = 32
  c.model.in_channels = 1
  c.model.out_channels = 1
  # Sized for CPU: ~3 train steps/s at batch 32 on an idle 2-core CPU.
  c.model.ch = 16
  c.model.ch_mult = (1, 2, 2)  # 2 downsamplings: 32 -> 8
  c.model.num_res_blocks = 1
  c.model.attn_resolutions = ()  # attention only in the mid blocks
  c.model.dropout = 0.0
  c.model.norm_groups = 8
  c.model.z_channels = 32
  c.model.embed_dim = 32  # n_z
  c.model.codebook_size = 64  # K
  c.model.code_depth = 4  # D
  c.model.dtype = "float32"
  c.model.quant_chunk_size = 2048

  c.quantizer = ml_collections.ConfigDict()
  c.quantizer.ema_decay = 0.99
  c.quantizer.eps = 1e-5
  c.quantizer.restart_unused = True
  # 'per_depth': the reference's order (README, "The codebook's update order on the demo").
  c.quantizer.codebook_update = "per_step"
  c.quantizer.commitment_weight = 0.25
  # 1 (not the reference's 0): the random initial codebook is kept until codes die. Measured on this demo (README,
  # "Stage-1 recipe on the demo"): see there before changing it.
  c.quantizer.init_cluster_size = 1.0

  c.loss = ml_collections.ConfigDict()
  c.loss.recon = "mse"
  # LPIPS on 32x32 digits (repeated to RGB) makes a step ~4x slower on a 2-core CPU (0.96 vs 0.23 s): off in the
  # demo (README, "Stage-1 recipe on the demo", has its measured effect). --config.loss.perceptual=True turns it on.
  c.loss.perceptual = False
  c.loss.perceptual_weight = 1.0
  c.loss.perceptual_weights_path = config_dict.placeholder(str)
  c.loss.perceptual_precision = "highest"
  c.loss.gan = False  # a GAN adds little on 32x32 digits and doubles the step cost
  c.loss.disc_start = 1_000
  c.loss.disc_weight = 0.75
  c.loss.adaptive_max_weight = 1e4
  c.loss.disc_ndf = 32
  c.loss.disc_layers = 2
  c.loss.disc_norm = "group"
  c.loss.disc_norm_groups = 8
  c.loss.disc_lr = 1e-4

  c.optim = common.optim(learning_rate=1e-3, b1=0.9, b2=0.99, weight_decay=0.0, warmup_steps=50, end_lr_ratio=0.1,
                         grad_clip=1.0)

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 32
  c.train.num_steps = 360
  c.train.log_every = 45
  c.train.ckpt_every = 180
  c.train.keep_checkpoints = 2
  c.train.image_every = 180
  c.train.nonfinite = "stop"
  # XLA:CPU's YNNPACK library fusions for the training step ('' none, 'default' XLA's list; core/xla_options.py): its
  # convolutions' gradients are several times slower than XLA's own on these small maps, so none (the demo's step
  # 1.5-1.85x faster on an AVX2 CPU, 1.15x on an AVX-512 one; docs/speed.md). Only CPU compiles read it.
  c.train.cpu_ynn_fusions = ""

  c.mesh = common.mesh()

  if arg == "smoke":  # every stage for a few steps: checks an install, not a model
    c.train.num_steps = 8
    c.train.log_every = 4
    c.train.ckpt_every = 8
    c.train.image_every = 8
    c.optim.warmup_steps = 2
    c.data.eval_examples = 100

  c.lock()
  return c
