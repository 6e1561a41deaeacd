"""The tiny sampling model shared by test_decoder.py and test_decoder_cache.py.

One model for both modules, so the Draft-and-Revise and inpainting programs that most of test_decoder.py runs are the
very programs that test_decoder_cache.py checks against the reference sampler, and each is compiled once: both modules
are in `xdist_group("sampler")`, so under `-n 2 --dist loadgroup` one worker runs them all and builds this fixture once.
"""

import jax.numpy as jnp
import pytest

from tests import helpers

# N, D, K, n_z, classes, B (the test modules repeat the ones they use). D = 3 and two depth layers: the cached depth
# steps run over more than one layer and more than one earlier depth.
N, D, K, NZ, CLASSES, B = 16, 3, 8, 4, 3, 3


@pytest.fixture(scope="session")
def tiny_sampler():
  """(model, params, codebook [K, n_z], cond [B, 1]: classes 0, 1, 2) of a width-32 Contextual RQ-Transformer."""
  model, params, codebook = helpers.tiny_sampling_model(code_depth=D, depth_layers=2, num_positions=N, vocab_size=K,
                                                        embed_dim=NZ, num_classes=CLASSES)
  return model, params, codebook, jnp.arange(B, dtype=jnp.int32)[:, None]
