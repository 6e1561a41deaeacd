"""The PatchGAN discriminator (ctxrq_jax/models/patchgan.py); its losses are tested in tests/unit/stage1/test_losses.py."""

import jax
import jax.numpy as jnp
import pytest

from ctxrq_jax.models import patchgan
from tests import helpers

_key = helpers.rbg_key


def test_patchgan_shapes():
  disc = patchgan.PatchGANDiscriminator(ndf=8, n_layers=3, norm="group", norm_groups=4)
  x = jnp.zeros((2, 32, 32, 3))
  params = jax.jit(disc.init)(_key(), x)
  assert jax.jit(disc.apply)(params, x).shape == (2, 2, 2, 1)  # 32 -> 16 -> 8 -> 4 -> 3 -> 2
  assert "bias" not in params["params"]["conv_1"]  # the norm carries the bias
  with pytest.raises(ValueError, match="norm"):
    jax.eval_shape(patchgan.PatchGANDiscriminator(norm="batch").init, _key(), x)
