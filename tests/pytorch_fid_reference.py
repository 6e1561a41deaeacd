"""pytorch-fid's FID Inception built offline with random weights: the oracle for the Flax port.

`fid_inception_v3()` in pytorch-fid downloads the released weights; `build_fid_inception` lets it build the network
exactly as it does (torchvision's Inception3 with the FID blocks patched in) but hands it a random state dict
instead of the download, so every conv and BatchNorm tensor, running statistics included, is random and a swapped or
mis-transposed tensor shows in the outputs.

torchvision is imported through `helpers.import_torchvision` (a CUDA torchvision wheel beside a CPU torch).
"""

from __future__ import annotations


import numpy as np
import pytest

from tests import helpers


def import_pytorch_fid():
  """pytorch_fid.inception (skips the calling test when torch, torchvision or pytorch-fid is not installed)."""
  helpers.import_torchvision()
  return pytest.importorskip("pytorch_fid.inception")


def randomize_(module, seed: int) -> None:
  """Draws every conv / linear weight (He-scaled, so activations keep their size through the 90-odd layers) and
  every BatchNorm affine parameter and running statistic, in place."""
  import torch  # pylint: disable=g-import-not-at-top
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * np.sqrt(2.0 / fan_in))
        if m.bias is not None:
          m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
      elif isinstance(m, torch.nn.BatchNorm2d):
        n = m.num_features
        m.weight.copy_(0.5 + torch.rand(n, generator=g))
        m.bias.copy_(0.2 * torch.randn(n, generator=g))
        m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
        m.running_var.copy_(0.5 + torch.rand(n, generator=g))
  module.eval()


def build_fid_inception(seed: int = 0):
  """pytorch-fid's `fid_inception_v3()` (eval mode) with random weights and BatchNorm statistics."""
  import torch  # pylint: disable=g-import-not-at-top
  pfi = import_pytorch_fid()
  # Build the architecture once to get a state dict of the right keys and shapes, randomise it, and serve it where
  # fid_inception_v3 would download the released file.
  skeleton = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)  # pylint: disable=protected-access
  skeleton.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
  skeleton.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
  skeleton.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
  skeleton.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
  skeleton.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
  skeleton.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
  skeleton.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
  skeleton.Mixed_7b = pfi.FIDInceptionE_1(1280)
  skeleton.Mixed_7c = pfi.FIDInceptionE_2(2048)
  randomize_(skeleton, seed)
  state = {k: v.clone() for k, v in skeleton.state_dict().items()}
  original = pfi.load_state_dict_from_url
  pfi.load_state_dict_from_url = lambda *a, **k: state
  try:
    model = pfi.fid_inception_v3()
  finally:
    pfi.load_state_dict_from_url = original
  model.eval()
  for name, value in model.state_dict().items():
    assert torch.equal(value, state[name]), name
  return model


def numpy_state_dict(module) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def nchw(x: np.ndarray):
  """NHWC numpy -> NCHW float32 torch tensor."""
  import torch  # pylint: disable=g-import-not-at-top
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)), dtype=np.float32))


def nhwc(t) -> np.ndarray:
  """NCHW torch tensor -> NHWC numpy."""
  return np.transpose(t.detach().cpu().numpy(), (0, 2, 3, 1))


def build_pool_feature_network(seed: int = 0):
  """pytorch-fid's `InceptionV3()` (resize to 299 bilinear, [0, 1] -> [-1, 1], 2048-d pool features) around the
  random `build_fid_inception(seed)`; returns (wrapper, the inner network)."""
  pfi = import_pytorch_fid()
  inner = build_fid_inception(seed)
  original = pfi.fid_inception_v3
  pfi.fid_inception_v3 = lambda: inner
  try:
    wrapper = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True, normalize_input=True)
  finally:
    pfi.fid_inception_v3 = original
  return wrapper.eval(), inner
