"""Tiny stage-1 RQ-VAE on the embedded MNIST digits: 32x32x1 images (28 zero-padded to 32), codes [8, 8, 4].

Small enough to train in about 3.5 minutes on two CPU cores (360 steps at ~2.2 steps/s, batch 32); used by the demo.
K = 64 keeps more than half of the codes in use at every depth on held-out digits (K = 256 left depth 1 at 34%).

Usage: --config=configs/rqvae_mnist.py
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the locked config. `arg` is unused (kept for the ml_collections `file.py:arg` syntax)."""
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = "embedded_mnist"  # the 5,000 digits shipped offline (see data/)
  c.data.split_train = "train"
  c.data.split_eval = "test"
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
  # Sized for CPU: ~2 train steps/s at batch 32 on an idle 2-core CPU.
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
  c.quantizer.commitment_weight = 0.25

  c.loss = ml_collections.ConfigDict()
  c.loss.recon = "mse"
  c.loss.gan = False  # a GAN adds little on 32x32 digits and doubles the step cost
  c.loss.disc_start = 1_000
  c.loss.disc_weight = 0.75
  c.loss.adaptive_max_weight = 1e4
  c.loss.disc_ndf = 32
  c.loss.disc_layers = 2
  c.loss.disc_norm = "group"
  c.loss.disc_norm_groups = 8
  c.loss.disc_lr = 1e-4

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-3
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.optim.weight_decay = 0.0
  c.optim.warmup_steps = 50
  c.optim.end_lr_factor = 0.1  # cosine decay ends at this fraction of lr
  c.optim.clip_norm = 1.0

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 32
  c.train.num_steps = 360
  c.train.log_every = 45
  c.train.ckpt_every = 180
  c.train.keep_checkpoints = 2
  c.train.image_every = 180

  c.lock()
  return c
