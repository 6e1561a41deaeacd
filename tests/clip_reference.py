"""open_clip's torch CLIP built offline with random weights, its tokenizer and its preprocessing: the oracles of
ctxrq_jax.models.clip, ctxrq_jax.data.clip_tokenizer and ctxrq_jax.data.clip_images.

Nothing is downloaded: models come from open_clip's own classes (`open_clip.model.CLIP` with QuickGELU, the
OpenAI-format layout) or `open_clip.create_model(name, pretrained=None)`; the BPE vocabulary is the
`bpe_simple_vocab_16e6.txt.gz` that ships inside the open_clip wheel.

open_clip imports torchvision, which is imported first through `helpers.import_torchvision` (a CUDA torchvision
wheel beside a CPU torch).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from ctxrq_jax.models import clip
from tests import helpers


def import_open_clip():
  """The open_clip package (skips the calling test when torch, torchvision or open-clip-torch is not installed)."""
  helpers.import_torchvision()
  return pytest.importorskip("open_clip")


def vocab_path() -> str:
  """OpenAI's BPE vocabulary as shipped inside the installed open_clip package."""
  open_clip = import_open_clip()
  path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
  if not os.path.isfile(path):
    pytest.skip(f"open_clip has no {path}")
  return path


def build_torch_clip(config: clip.CLIPConfig, seed: int = 0):
  """open_clip's CLIP of `config` (QuickGELU, OpenAI's ViT layout) in eval mode, every float tensor random.

  open_clip initialises LayerNorms to (1, 0) and biases to 0, which would hide a swapped scale/bias or a dropped bias;
  all of them are redrawn here (weights scaled by 1/sqrt(fan-in) so activations keep their size through the layers).
  """
  import torch  # pylint: disable=g-import-not-at-top
  open_clip = import_open_clip()
  from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg  # pylint: disable=g-import-not-at-top
  model = CLIP(
      config.embed_dim,
      vision_cfg=CLIPVisionCfg(layers=config.vision_layers, width=config.vision_width, patch_size=config.patch_size,
                               image_size=config.image_size, head_width=config.vision_width // config.vision_heads),
      text_cfg=CLIPTextCfg(context_length=config.context_length, vocab_size=config.vocab_size,
                           width=config.text_width, heads=config.text_heads, layers=config.text_layers),
      quick_gelu=True)
  del open_clip
  randomize_(model, seed)
  return model.eval()


def randomize_(model, seed: int) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name == "logit_scale":
        p.fill_(float(np.log(1 / 0.07)))
      elif name.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_final.weight")):
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
      elif p.ndim >= 2 and "embedding" not in name:
        fan_in = p[0].numel() if name.endswith("weight") else p.shape[0]
        p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(fan_in))
      else:
        p.copy_(0.3 * torch.randn(p.shape, generator=g))


def nchw(x: np.ndarray):
  """numpy [B, H, W, C] -> torch float32 [B, C, H, W]."""
  import torch  # pylint: disable=g-import-not-at-top
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))).float()
