"""Text-to-image on Conceptual Captions 3M (§4.2, Table 2): Contextual RQ-Transformer on 8x8x4 RQ-VAE codes,
conditioned on 32 BPE tokens of the caption.

Usage: `python -m ctxrq_jax.train --config=configs/cc3m.py:654m --config.data.codes_dir=... ` with one of

  arg    width heads spatial/depth  params (ours, eval_shape)  paper (Table 2)   official 650M layout
  333m   1024  16    20 / 4         336.5M (+1.0%)             333M
  654m   1280  20    27 / 4         652.7M (-0.2%)             654M              654.06M (1280, 20 heads, 26 / 4)
  tiny   32    4      2 / 2         test shapes (vocab 64, 4x4x4 codes, n_z 16, 8 tokens of a 64-token vocabulary)

Same sections and keys as configs/imagenet.py plus `data.tokenizer_dir` (the BPE files: sampling tokenizes prompts
with them). The condition is text: `model.num_classes = 0`, `model.cond_length` = 32 tokens of a
`model.cond_vocab_size` = 16,384 vocabulary ([PAD] = 0, the empty caption = the null condition of classifier-free
guidance; ctxrq_jax/data/tokenizer.py); the code dataset comes from `python -m ctxrq_jax.encode captions`.

Sizes. The official CC-3M RQ-Transformer (`cc3m-rqtransformer-8x8x4-650M.yaml`: embed 1280, 20 heads, 26 body /
4 head layers, 16,384 image and text tokens, 32 text positions) has 654.06M parameters, 21.0M of them in a text head
(LayerNorm + 1280 x 16384 linear) that its autoregressive model trains on next-text-token prediction (loss weight
0.1). A bidirectional spatial transformer sees every text token at its own position, so that head has nothing to
learn here; the paper gives the contextual model the size of the earlier one, and we spend the 21M on a 27th spatial
layer (652.7M, -0.2%). The paper does not give the 333M text layout: the ImageNet 333m layout (1024 wide, 16 heads,
21 / 4) gains 15.8M of text embeddings and positions here, so we take one spatial layer off (20 / 4: 336.5M, +1.0%).
tests/unit/models/test_transformer.py checks both against the paper and the official layout's count.

Training follows the official CC-3M config where it applies (AdamW lr 5e-4, betas (0.9, 0.95), weight decay 1e-4,
clip 1.0, batch 2048, 100 epochs ~ 146k steps of ~3.0M downloadable pairs: `train.num_steps` says how to set it for
another download size); BPE dropout 0.1 on the training captions: `encode captions` stores T draws per caption
(--caption_variants, 8) and `data.random_caption` picks one per example and epoch (the official code draws anew at
every read). Not followed: the 5,000 warmup steps and the hard targets (comments at `optim` and
`train.label_smoothing`).
Condition dropout to the empty caption at rate 0.1 is our choice (paper silent).
"""

from __future__ import annotations

import ml_collections

from ctxrq_jax.configs import common
from ctxrq_jax.core.config import ConfigError

# (width, num_heads, spatial_layers, depth_layers) per model-size argument.
SIZES = {
    "333m": (1024, 16, 20, 4),
    "654m": (1280, 20, 27, 4),
    "tiny": (32, 4, 2, 2),
}
# Paper (Table 2) parameter counts the sizes are checked against in tests (tolerance 2%).
PAPER_PARAMS = {"333m": 333e6, "654m": 654e6}
# The official cc3m-rqtransformer-8x8x4-650M.yaml dimensions (kakaobrain/rq-vae-transformer), for the count check.
OFFICIAL_650M = dict(embed_dim=1280, n_head=20, body_layers=26, head_layers=4, vocab_size=16384,
                     vocab_size_cond=16384, block_size_cond=32, block_size=(8, 8, 4), input_embed_dim=256)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the locked config for model size `arg` (default '654m')."""
  size = "654m" if arg is None else arg
  if size not in SIZES:
    raise ConfigError(f"unknown model size {arg!r} for configs/cc3m.py; expected one of {sorted(SIZES)}")
  width, heads, spatial_layers, depth_layers = SIZES[size]
  tiny = size == "tiny"

  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.width = width
  c.model.num_heads = heads
  c.model.spatial_layers = spatial_layers
  c.model.depth_layers = depth_layers
  c.model.mlp_ratio = 4
  c.model.dropout = 0.0 if tiny else 0.1  # the official resid_pdrop (ours drops embeddings too: README)
  c.model.num_classes = 0  # 0: the condition is a caption, not a class
  c.model.cond_length = 8 if tiny else 32  # text tokens (official context_length 32)
  c.model.cond_vocab_size = 64 if tiny else 16384  # the tokenizer's vocabulary ([PAD] = 0, [UNK] = 1)
  c.model.dtype = "float32" if tiny else "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = not tiny
  c.model.matmul_dtype = "compute"  # the linear layers multiply in the compute dtype ('auto': see configs/demo.py)

  c.data = ml_collections.ConfigDict()
  c.data.codes_dir = ""  # written by `python -m ctxrq_jax.encode captions`
  c.data.stage1_dir = ""  # stage-1 artifact (RQ-VAE) used to decode samples
  c.data.tokenizer_dir = ""  # bpe-16k-vocab.json + bpe-16k-merges.txt; sampling tokenizes prompts with them
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.code_shape = (4, 4, 4) if tiny else (8, 8, 4)
  c.data.vocab_size = 64 if tiny else 16384
  c.data.embed_dim = 16 if tiny else 256
  # One of the stored views per example and epoch: `encode captions --views=center,dalle,...` stores draws of the
  # official training crop (AugmentationDALLE + RandomCrop); with the default one view this is the centre crop.
  c.data.random_view = True
  # One of the T BPE-dropout tokenizations `encode captions` stores per training caption, drawn per example and epoch.
  c.data.random_caption = True

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 4 if tiny else 2048
  # The official yaml's 100 epochs (`epochs: 100`, `total_batch_size: 2048`) in steps: 146,000 assumes a train split
  # of 146,000 x 2048 / 100 = 2.99M pairs (README step 1 expects ~3.0M; how many URLs are dead varies). For another
  # download pass --config.train.num_steps = 100 x pairs / batch_size, rounded up (2.7M pairs: 131,836; 3.3M:
  # 161,133); the cosine decay counts steps, so a wrong count trains more or fewer epochs on the same schedule.
  c.train.num_steps = 2 if tiny else 146_000
  c.train.grad_accum_steps = 1
  # Examples per mask group: the depth transformer, head and softmax run on a group's masked positions only, the
  # group's mask ratios drawn stratified (each example's mask still as eq. 10; stage2/masking.py). 8 packs 70% of
  # the positions at N = 64 and keeps groups within a device for up to 256-way data parallelism at batch 2048
  # (it must divide batch_size / grad_accum_steps, and should divide that per device). 1: all positions, i.i.d.
  c.train.mask_group = 1 if tiny else 8
  # Training steps per compiled call (a lax.scan over stacked batches; core/loop.py): per-call costs (dispatch, the
  # step's temporary buffers) paid once per k steps. 1 here; the CPU demo uses 10 (docs/speed.md).
  c.train.steps_per_call = 1
  c.train.cond_drop_rate = 0.1  # captions replaced by the empty caption (classifier-free guidance)
  # Hard targets: the loss is the NLL of the stored codes. The official CC-3M yaml trains on soft targets from
  # stochastic codes (`soft_target_cross_entropy`, `stochastic_codes`, temperature 0.5), which we do not implement
  # (README "Choices where the paper is silent", the stage-2 augmentation item).
  c.train.label_smoothing = 0.0
  c.train.log_every = 1 if tiny else 100
  c.train.eval_every = 2 if tiny else 5000
  c.train.ckpt_every = 2 if tiny else 2500
  c.train.keep_checkpoints = 3
  c.train.ema_decay = 0.0
  c.train.nonfinite = "stop"

  # Warmup 5,000 steps: ours, as configs/imagenet.py (the official CC-3M yaml has none, `warmup.epoch: 0`; README).
  c.optim = common.optim(learning_rate=5e-4, b1=0.9, b2=0.95, weight_decay=1e-4, warmup_steps=1 if tiny else 5000,
                         end_lr_ratio=0.0, grad_clip=1.0)

  c.mesh = common.mesh()
  c.sharding_rules = list(common.DEFAULT_SHARDING_RULES)

  # The ImageNet phases (Table 3: T_draft 64, T_revise 2, M 2; temperature 0.8 and guidance 1.8 in the revisions);
  # the paper does not list separate T2I sampling settings in our copy.
  c.sample = ml_collections.ConfigDict()
  c.sample.T_draft = 8 if tiny else 64
  c.sample.T_revise = 2
  c.sample.M = 2
  c.sample.batch_size = 4 if tiny else 100
  c.sample.draft = ml_collections.ConfigDict(dict(temperature=1.0, guidance=0.0, top_k=0, top_p=1.0))
  c.sample.revise = ml_collections.ConfigDict(dict(temperature=0.8, guidance=1.8, top_k=0, top_p=1.0))

  c.lock()
  return c
