"""Class-conditional ImageNet 256x256 stage 2: Contextual RQ-Transformer on 8x8x4 RQ-VAE codes.

Usage: `python -m ctxrq_jax.train --config=configs/imagenet.py:821m` with one of

  arg     width heads spatial/depth  params (ours, eval_shape)   paper (Table 1)
  333m    1024  16    21 / 4         333.3M                      333M   (layout not given: our choice, see below)
  821m    1536  24    24 / 4         820.9M                      821M   (reference RQ-Transformer layout)
  1.4b    1536  24    42 / 6         1387.5M                     1.4B   (reference RQ-Transformer layout, 1.39B)
  tiny    32    4      2 / 2         small shapes for tests (vocab 64, 4x4x4 codes, n_z 16, 10 classes)
  bench512 512  8     12 / 4         CPU benchmark dims (float32, no remat, sample batch 32, T_draft 8): the speed issue's
                                     comparison with the official RQ-Transformer sampler at the same width and depth

The paper gives Contextual RQ-Transformer the sizes of the earlier RQ-Transformer, whose 821M / 1.4B layouts the
design sketch records; it does not give the 333M layout. We keep head width 64 and 4 depth layers as in 821m and shrink
the width to 1024 (16 heads): 21 spatial layers then land on 333.3M (+0.1%). The alternative 1280-wide 12/4 layout
(the 481M model at a smaller width) gives 337.8M (+1.5%); we prefer the closer count and the 821m depth stack.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from ctxrq_jax.configs import common
from ctxrq_jax.core.config import ConfigError

# (width, num_heads, spatial_layers, depth_layers) per model-size argument.
SIZES = {
    "333m": (1024, 16, 21, 4),
    "821m": (1536, 24, 24, 4),
    "1.4b": (1536, 24, 42, 6),
    "tiny": (32, 4, 2, 2),
    "bench512": (512, 8, 12, 4),
}
# Paper / reference parameter counts the sizes are checked against in tests (tolerance 1%, 333m: 2%).
PAPER_PARAMS = {"333m": 333e6, "821m": 821e6, "1.4b": 1.4e9}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the locked config for model size `arg` (default '821m')."""
  size = "821m" if arg is None else arg
  if size not in SIZES:
    raise ConfigError(f"unknown model size {arg!r} for configs/imagenet.py; expected one of {sorted(SIZES)}")
  width, heads, spatial_layers, depth_layers = SIZES[size]
  tiny = size == "tiny"
  cpu_bench = size == "bench512"  # float32 and no remat: the CPU's fast path; the 8x8x4 / K 16384 data of ImageNet

  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.width = width
  c.model.num_heads = heads
  c.model.spatial_layers = spatial_layers
  c.model.depth_layers = depth_layers
  c.model.mlp_ratio = 4
  c.model.dropout = 0.0 if tiny else 0.1  # paper silent: our choice for the 1.28M-image set
  c.model.num_classes = 10 if tiny else 1000
  c.model.cond_length = 1  # one class token; CC-3M would use 32 BPE tokens
  c.model.cond_vocab_size = config_dict.placeholder(int)  # None -> num_classes + 1 (the last id is "no class")
  c.model.dtype = "float32" if tiny or cpu_bench else "bfloat16"  # compute dtype; parameters stay float32
  c.model.param_dtype = "float32"
  c.model.remat = not (tiny or cpu_bench)
  c.model.matmul_dtype = "compute"  # the linear layers multiply in the compute dtype ('auto': see configs/demo.py)

  # Facts of the stage-1 code dataset the model is built for; the trainer checks them against metadata.json.
  c.data = ml_collections.ConfigDict()
  c.data.codes_dir = ""  # written by `python -m ctxrq_jax.encode`
  c.data.stage1_dir = ""  # stage-1 artifact (RQ-VAE) used to decode samples
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.code_shape = (4, 4, 4) if tiny else (8, 8, 4)  # (h, w, D): N = h * w = 64 positions, depth 4
  c.data.vocab_size = 64 if tiny else 16384  # K, one codebook shared across depths
  c.data.embed_dim = 16 if tiny else 256  # n_z of the RQ-VAE codebook
  # Augmentation: train on one of each record's stored views (`encode --views=center,flip,crop,...`), drawn per
  # example and epoch; the reference RQ-Transformer trains on random crops + flips (rqvae/img_datasets/transforms.py).
  # A code dataset with one view per image trains on it alone.
  c.data.random_view = True

  c.train = ml_collections.ConfigDict()
  # The paper's appendix schedule is not in our copy; batch 2048 for ~100 epochs (1.28M images) is our default.
  c.train.batch_size = 4 if tiny else 2048
  c.train.num_steps = 2 if tiny else 62_500
  c.train.grad_accum_steps = 1
  # Examples per mask group: the depth transformer, head and softmax run on a group's masked positions only, the
  # group's mask ratios drawn stratified (each example's mask still as eq. 10; stage2/masking.py). 8 packs 70% of
  # the positions at N = 64 and keeps groups within a device for up to 256-way data parallelism at batch 2048
  # (it must divide batch_size / grad_accum_steps, and should divide that per device). 1: all positions, i.i.d.
  c.train.mask_group = 1 if tiny else 8
  # Training steps per compiled call (a lax.scan over stacked batches; core/loop.py): per-call costs (dispatch, the
  # step's temporary buffers) paid once per k steps. 1 here; the CPU demo uses 10 (docs/speed.md).
  c.train.steps_per_call = 1
  c.train.cond_drop_rate = 0.1  # classifier-free guidance training (paper silent; the usual 10%)
  # Hard targets: the loss is the NLL of the stored codes. The reference RQ-Transformer's yamls train on soft targets
  # from stochastic codes (`soft_target_cross_entropy`, `stochastic_codes`, temperature 0.5), which we do not
  # implement (README "Choices where the paper is silent", the stage-2 augmentation item).
  c.train.label_smoothing = 0.0
  c.train.log_every = 1 if tiny else 100
  c.train.eval_every = 2 if tiny else 5000
  c.train.ckpt_every = 2 if tiny else 2500
  c.train.keep_checkpoints = 3
  c.train.ema_decay = 0.0  # 0 = no EMA of parameters
  c.train.nonfinite = "stop"  # 'stop' | 'skip': what to do with a non-finite loss or gradient

  # From the reference RQ-Transformer's ImageNet yamls (in256-rqtransformer-8x8x4-800M / -1400M): AdamW lr 5e-4,
  # betas (0.9, 0.95), weight decay 1e-4, gradient clip 1.0, cosine decay to 0 over all steps. Ours: the 5,000-step
  # linear warmup (those yamls have none, `warmup.epoch: 0`) and which parameters are decayed (core/optim.py
  # NO_DECAY; the reference's stage-2 optimizer code is not released, README "Choices where the paper is silent").
  c.optim = common.optim(learning_rate=5e-4, b1=0.9, b2=0.95, weight_decay=1e-4, warmup_steps=1 if tiny else 5000,
                         end_lr_ratio=0.0, grad_clip=1.0)

  c.mesh = common.mesh()  # -1: all remaining devices
  c.sharding_rules = list(common.DEFAULT_SHARDING_RULES)  # pairs (logical axis, mesh axes)

  # Draft-and-Revise (§4.1, Table 3): T_draft 64, T_revise 2, M 2; temperature and classifier-free guidance only in
  # the revise phase (temperature 0.8, guidance scale 1.8). Guidance s follows Ho & Salimans [20]:
  # logits = cond + s (cond - uncond), so s = 0 is the conditional model alone and 1.8 equals 2.8 in the other common
  # form uncond + w (cond - uncond). The paper does not say which form its 1.8 uses; this one matches its reference [20].
  c.sample = ml_collections.ConfigDict()
  c.sample.T_draft = 8 if tiny or cpu_bench else 64
  c.sample.T_revise = 2
  c.sample.M = 2
  c.sample.batch_size = 4 if tiny else 32 if cpu_bench else 100  # the paper samples with batch 100
  c.sample.draft = ml_collections.ConfigDict(dict(temperature=1.0, guidance=0.0, top_k=0, top_p=1.0))
  c.sample.revise = ml_collections.ConfigDict(dict(temperature=0.8, guidance=1.8, top_k=0, top_p=1.0))

  c.lock()
  return c
