"""Text-to-image demo stage 2 on the embedded MNIST digits: the demo's Contextual RQ-Transformer conditioned on
captions such as "a wide thick rightward seven" (ctxrq_jax/data/digit_captions.py) instead of a class id.

Same sections and keys as configs/cc3m.py (the trainer treats them alike); model and training as configs/demo.py.
Captions are 5 words; the tokenizer (a CharBPE trained offline on the training captions by the demo, with
`model.cond_vocab_size` as its vocabulary target; 84 tokens come out) gives at most 5 tokens without dropout, and
with the training split's BPE dropout 0.1 up to ~19 (measured: 3-4% of the training captions exceed 12 tokens,
0.1% exceed 16), so L = 16. The text adds 16 positions to the 64 code stacks.

Usage: `python -m ctxrq_jax.demo --task=text` (this config is its default; `demo_text.py:smoke` for --smoke).
"""

from __future__ import annotations

import ml_collections

from ctxrq_jax.configs import demo
from ctxrq_jax.core.config import ConfigError


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The locked config; `arg` 'smoke' shrinks the run to seconds."""
  if arg not in (None, "", "smoke"):
    raise ConfigError(f"unknown argument {arg!r} for configs/demo_text.py; expected nothing or 'smoke'")
  c = demo.get_config(arg)
  c.unlock()
  c.model.num_classes = 0  # the condition is a caption
  c.model.cond_length = 16  # caption tokens (5 words; BPE dropout can split a word into several tokens)
  c.model.cond_vocab_size = 128  # also the tokenizer's vocabulary target when the demo trains it
  c.data.tokenizer_dir = ""  # set by the demo to WORKDIR/tokenizer
  c.data.random_caption = True  # one of the stored BPE-dropout tokenizations of each caption per epoch
  c.sample.batch_size = 50
  # 80 positions per step instead of 64, a step ~13% slower than the class demo's: 1880 steps (0.088 s each on an
  # AMX CPU) keep the previous release's text-demo time (1500 steps of the 3 / 1-layer model, 0.110 s each).
  if arg != "smoke":
    c.train.num_steps = 1880
    c.train.eval_every = 1880
    c.train.ckpt_every = 940
  c.lock()
  return c
