"""Stage-1 RQ-VAE for ImageNet 256x256: the reference 8x8x4 model (codes [8, 8, 4], K = 16384).

Architecture, quantizer and loss numbers follow the released PyTorch RQ-VAE (104,402,051 parameters counting its
padded codebook once). Not reproduced: its LPIPS perceptual loss (weight 1.0), which needs pretrained VGG weights we do
not ship; reconstruction is MSE (+ GAN) only.

Usage: --config=configs/rqvae_imagenet.py
"""

import ml_collections
from ml_collections import config_dict

from ctxrq_jax.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the locked config. `arg` is unused (kept for the ml_collections `file.py:arg` syntax)."""
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = "imagenet2012"  # tfds name
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.data_dir = config_dict.placeholder(str)  # tfds data_dir; None = tfds default
  c.data.manual_dir = config_dict.placeholder(str)  # where the ImageNet tars live for the tfds build
  c.data.image_size = 256
  c.data.channels = 3
  # 'crop': shorter side -> image_size, random crop (train) / centre crop (eval); 'pad': centre on a black canvas.
  c.data.resize = "crop"
  c.data.random_flip = False
  c.data.num_classes = 1000
  c.data.eval_examples = 50_000

  c.model = ml_collections.ConfigDict()
  c.model.resolution = 256
  c.model.in_channels = 3
  c.model.out_channels = 3
  c.model.ch = 128
  c.model.ch_mult = (1, 1, 2, 2, 4, 4)  # 5 downsamplings: 256 -> 8
  c.model.num_res_blocks = 2  # per encoder level; the decoder has one more
  c.model.attn_resolutions = (8,)
  c.model.dropout = 0.0
  c.model.norm_groups = 32
  c.model.z_channels = 256
  c.model.embed_dim = 256  # n_z
  c.model.codebook_size = 16384  # K
  c.model.code_depth = 4  # D
  c.model.dtype = "float32"  # conv compute dtype; quantization is always float32
  c.model.quant_chunk_size = 2048  # vectors per nearest-code chunk: bounds the [chunk, K] distance matrix

  c.quantizer = ml_collections.ConfigDict()
  c.quantizer.ema_decay = 0.99
  c.quantizer.eps = 1e-5  # Laplace smoothing of EMA counts
  c.quantizer.restart_unused = True  # codes with EMA count < 1 restart at random batch vectors
  c.quantizer.commitment_weight = 0.25

  c.loss = ml_collections.ConfigDict()
  c.loss.recon = "mse"  # 'mse' | 'l1'
  c.loss.gan = True
  c.loss.disc_start = 10_000  # step at which the discriminator and the GAN term switch on
  c.loss.disc_weight = 0.75  # multiplies the adaptive weight
  c.loss.adaptive_max_weight = 1e4
  c.loss.disc_ndf = 64
  c.loss.disc_layers = 3
  c.loss.disc_norm = "group"  # 'group' | 'none' (no BatchNorm: see patchgan.py)
  c.loss.disc_norm_groups = 32
  c.loss.disc_lr = 4e-5

  # Adam as the reference RQ-VAE (lr 4e-5, betas (0.5, 0.9), no clipping); warmup and cosine decay are ours.
  c.optim = common.optim(learning_rate=4e-5, b1=0.5, b2=0.9, weight_decay=0.0, warmup_steps=5_000, end_lr_ratio=0.1,
                         grad_clip=0.0)

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 128  # global
  c.train.num_steps = 100_000  # ~10 epochs of ImageNet at batch 128
  c.train.log_every = 100
  c.train.ckpt_every = 5_000
  c.train.keep_checkpoints = 3
  c.train.image_every = 5_000

  c.mesh = common.mesh()  # stage 1 is data parallel: parameters replicated, batch over ('data', 'fsdp')

  c.lock()
  return c
