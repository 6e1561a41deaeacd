"""Helpers shared by the tests: tiny configs, a synthetic code-dataset writer and bit-exact tree comparisons.

Import as `from tests import helpers`. The matching fixtures are in tests/conftest.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ctxrq_jax.core import config as configlib
from ctxrq_jax.data import codes as codes_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------ configs
def _apply(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> None:
  """`{'train.num_steps': 4, 'optim.learning_rate': 1e-2}` -> config.train.num_steps = 4, ... (config unlocked)."""
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value


def tiny_stage1_config(**overrides: Any) -> ml_collections.ConfigDict:
  """configs/rqvae_mnist.py shrunk to seconds per step: 16x16x1 digits (resized by crop), 4x4x2 codes, K = 16.

  Keyword overrides name `section.key` with a double underscore, e.g. `train__num_steps=2`.
  """
  c = configlib.load_config_file("rqvae_mnist")
  with c.unlocked():
    c.data.image_size = 16
    c.data.resize = "crop"
    c.data.eval_examples = 8
    c.model.resolution = 16
    c.model.ch = 8
    c.model.ch_mult = (1, 2, 2)
    c.model.norm_groups = 4
    c.model.z_channels = 8
    c.model.embed_dim = 8
    c.model.codebook_size = 16
    c.model.code_depth = 2
    c.train.batch_size = 4
    c.train.num_steps = 2
    c.train.log_every = 1
    c.train.image_every = 2
    c.train.ckpt_every = 1
    _apply(c, {k.replace("__", "."): v for k, v in overrides.items()})
  return c


def tiny_stage2_config(codes_dir: str, **overrides: Any) -> ml_collections.ConfigDict:
  """configs/imagenet.py:tiny (4x4x4 codes, K 64, n_z 16, 10 classes, width 32) for a few quick steps on
  `codes_dir` (see `write_stage2_codes`). Overrides as in `tiny_stage1_config` (`train__num_steps=4`)."""
  c = configlib.load_config_file("imagenet", "tiny")
  with c.unlocked():
    c.data.codes_dir = codes_dir
    c.train.num_steps = 6
    c.train.log_every = 1
    c.train.eval_every = 100
    c.train.ckpt_every = 2
    c.optim.learning_rate = 1e-2
    _apply(c, {k.replace("__", "."): v for k, v in overrides.items()})
  return c


def tiny_demo_stage2_config() -> ml_collections.ConfigDict:
  """configs/demo.py shrunk to match `tiny_stage1_config`'s codes (4x4x2, K 16, n_z 8): the demo pipeline in seconds."""
  c = configlib.load_config_file("demo")
  with c.unlocked():
    c.model.width = 32
    c.model.num_heads = 2
    c.model.spatial_layers = 1
    c.model.depth_layers = 1
    c.data.code_shape = (4, 4, 2)
    c.data.vocab_size = 16
    c.data.embed_dim = 8
    c.train.batch_size = 8
    c.train.mask_group = 8
    c.train.num_steps = 2
    c.train.log_every = 1
    c.train.eval_every = 2
    c.train.ckpt_every = 2
    c.sample.T_draft = 4
    c.sample.batch_size = 8
  return c


# A tiny RQ-VAE model section: 16x16x1 images, codes [8, 8, 3] from K = 16 (see the `tiny_rqvae` fixture).
TINY_RQVAE = dict(
    resolution=16, in_channels=1, out_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
    dropout=0.0, norm_groups=4, z_channels=8, embed_dim=4, codebook_size=16, code_depth=3, dtype="float32",
    quant_chunk_size=32,
)


def rbg_key(seed: int = 0) -> jax.Array:
  """An 'rbg' key whatever the default: threefry init graphs take ~30 s to compile on a loaded CPU, rbg a few."""
  return jax.random.key(seed, impl="rbg")


# ------------------------------------------------------------------------------------------------ code datasets
def write_code_dataset(out_dir: Any, *, code_shape=(2, 3, 4), codebook_size: int = 300, embed_dim: int = 5,
                       num_classes: int = 4, sizes: Mapping[str, int] | None = None, num_shards: int = 1,
                       seed: int = 0, chunk: int | None = None, source: Any = "synthetic",
                       **writer_kwargs: Any) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]:
  """Writes a synthetic code dataset; returns (codebook [K, n_z], {split: (codes [M, h, w, D], labels [M])}).

  `chunk` splits each split's examples over several `write` calls (in order).
  """
  rng = np.random.default_rng(seed)
  sizes = dict(sizes or {"train": 10, "test": 7})
  codebook = rng.normal(size=(codebook_size, embed_dim)).astype(np.float32)
  data = {split: (rng.integers(0, codebook_size, (n, *code_shape)), rng.integers(0, num_classes, (n,)))
          for split, n in sizes.items()}
  with codes_lib.CodeDatasetWriter(out_dir, code_shape=code_shape, codebook=codebook, num_classes=num_classes,
                                   source=source, num_shards=num_shards, **writer_kwargs) as w:
    for split, (c, y) in data.items():
      step = chunk or max(len(c), 1)
      for start in range(0, len(c), step):
        w.write(split, c[start:start + step], y[start:start + step])
  return codebook, data


def write_stage2_codes(out_dir: Any, codebook: Any = None) -> str:
  """The code dataset `tiny_stage2_config` trains on: 4x4x4 codes, K 64, n_z 16, 10 classes; 8 training examples
  (two batches of 4, so a run sees the same few examples again and again) and 4 validation examples. Each record
  holds two views, the codes and their mirror image ('center', 'flip'): the tiny config's `data.random_view` draws
  one per example (stage-2 augmentation), evaluation reads the first. `codebook` [64, 16]: a stage-1 model's (so
  its decoder may decode the samples); default random (the same codes either way)."""
  rng = np.random.default_rng(0)
  random_codebook = rng.normal(size=(64, 16)).astype(np.float32)
  codebook = random_codebook if codebook is None else np.asarray(codebook, np.float32)
  with codes_lib.CodeDatasetWriter(out_dir, code_shape=(4, 4, 4), codebook=codebook,
                                   num_classes=10, source="synthetic", views=("center", "flip")) as w:
    for split, n in (("train", 8), ("validation", 4)):
      codes = rng.integers(0, 64, (n, 4, 4, 4))
      w.write(split, np.stack([codes, codes[:, :, ::-1]], axis=1), rng.integers(0, 10, (n,)))
  return str(out_dir)


def tiny_sampling_model(*, code_depth: int, depth_layers: int = 1, num_positions: int = 16, vocab_size: int = 8,
                        embed_dim: int = 4, num_classes: int = 3) -> tuple[Any, Any, jax.Array]:
  """(model, params, codebook [K, n_z]) of a width-32 Contextual RQ-Transformer for the sampler tests, its
  parameters scaled 8x (sharper logits than the N(0, 0.02) init, so conditions and guidance visibly change samples)."""
  from ctxrq_jax.models import transformer  # pylint: disable=g-import-not-at-top
  model = transformer.ContextualRQTransformer(
      vocab_size=vocab_size, code_depth=code_depth, num_positions=num_positions, embed_dim=embed_dim, width=32,
      num_heads=2, spatial_layers=1, depth_layers=depth_layers, num_classes=num_classes)
  codebook = jax.random.normal(jax.random.key(1), (vocab_size, embed_dim))
  params = jax.jit(model.init)(jax.random.key(0), *transformer.init_inputs(model, 1)[:3], codebook)["params"]
  return model, jax.tree.map(lambda x: x * 8.0, params), codebook


# ------------------------------------------------------------------------------------------------ iterators
def take(it: Any, n: int) -> list[Any]:
  """The next `n` batches of an iterator."""
  return [next(it) for _ in range(n)]


def same_batches(a: list[Mapping[str, Any]], b: list[Mapping[str, Any]]) -> bool:
  """Whether two equally long lists of dict batches hold equal arrays under every key."""
  return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


def resumes_exactly(make_iterator: Callable[[], Any], *, skip: int, check: int) -> bool:
  """Whether a fresh iterator given the state of one that has yielded `skip` batches yields the `check` batches that
  one yields next (grain's get_state / set_state)."""
  it = make_iterator()
  take(it, skip)
  state = it.get_state()
  expected = take(it, check)
  resumed = make_iterator()
  resumed.set_state(state)
  return same_batches(take(resumed, check), expected)


# ------------------------------------------------------------------------------------------------ trees
def _is_typed_key(x: Any) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def leaves(tree: Any) -> list[np.ndarray]:
  """The leaves of a (device or host) pytree as numpy arrays; typed PRNG keys as their key data."""
  tree = jax.tree.map(lambda x: jax.random.key_data(x) if _is_typed_key(x) else x, tree)
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def assert_trees_equal(a: Any, b: Any) -> None:
  """Same structure, and every leaf the same dtype, shape and bits (typed PRNG keys compared by key data)."""
  a = jax.tree.map(lambda x: jax.random.key_data(x) if _is_typed_key(x) else x, a)
  b = jax.tree.map(lambda x: jax.random.key_data(x) if _is_typed_key(x) else x, b)
  assert jax.tree.structure(a) == jax.tree.structure(b), (jax.tree.structure(a), jax.tree.structure(b))
  for x, y in zip(leaves(a), leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape, (x.dtype, x.shape, y.dtype, y.shape)
    np.testing.assert_array_equal(x, y)


def assert_leaves_equal(a: Any, b: Any) -> None:
  """Bit-equal leaves in order (for trees whose containers differ, e.g. FrozenDict vs dict)."""
  la, lb = leaves(a), leaves(b)
  assert len(la) == len(lb), (len(la), len(lb))
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------------------------------------------ torch oracles
def import_torchvision() -> None:
  """Imports torchvision for the torch reference models (skips the calling test when torch or torchvision is not
  installed). torchvision's PyPI wheels are CUDA builds; beside a CPU-only torch their compiled ops (nms, roi_align,
  ...) cannot load, and `import torchvision` then fails while registering fake kernels for them. The reference models
  are pure Python and need none of those ops, so the import is retried with that one registration module stubbed."""
  import types  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  pytest.importorskip("torch")
  try:
    import torchvision  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    pytest.skip("torchvision is not installed")
  except RuntimeError:  # a CUDA torchvision wheel beside a CPU torch: its compiled ops are missing
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
      del sys.modules[name]
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    import torchvision  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import,reimported


# Test programs are tiny, so compiling them dominates the suite: XLA's backend optimisations are turned down for every
# test process and child (about 40% less CPU per compilation here), fusions are emitted by the classic elemental
# emitters instead of the MLIR fusion emitters, in one LLVM module (together about 30% less CPU again on the sampler
# and trainer tests, with no slower execution on the convolution-heavy ones; measured with a per-test CPU-time plugin).
# The numerics keep IEEE semantics (XLA's CPU fast-math stays off), and in-process and child runs use the same flags,
# so bit-exact comparisons between them hold.
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                  "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1")


def xla_flags(extra: str = "") -> str:
  """The test XLA flags, plus `extra` (e.g. a forced host device count)."""
  return f"{TEST_XLA_FLAGS} {extra}".strip()


# The suite's persistent compilation cache (tests/conftest.py): the controller names its directory in this variable.
CACHE_ENV = "CTXRQ_TEST_COMPILATION_CACHE"
CACHE_MAX_BYTES = 4 << 30
# Programs that compile faster than this are not written to the cache: with a maximum size, every write scans the
# whole cache directory under its lock (JAX's LRU eviction), and the suite's eager ops alone would make thousands
# of tiny entries (a third of the time of op-by-op test files went to those writes).
CACHE_MIN_COMPILE_SECS = 0.5


def compilation_cache_env() -> dict[str, str]:
  """JAX's variables that point a child process at the suite's compilation cache (empty outside the suite)."""
  cache = os.environ.get(CACHE_ENV)
  if not cache:
    return {}
  return {"JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": str(CACHE_MIN_COMPILE_SECS),
          "JAX_COMPILATION_CACHE_MAX_SIZE": str(CACHE_MAX_BYTES)}


def installed_env(site: Any) -> dict[str, str]:
  """Environment of a child process that imports ctxrq_jax from `site` only (an installed wheel): CPU, the test XLA
  flags (no forced device count), the suite's compilation cache (the wheel's programs are the checkout's)."""
  return dict(os.environ, PYTHONPATH=str(site), JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(),
              **compilation_cache_env())


def run_installed(args, site, cwd, timeout=300):
  """`python args...` importing the installed wheel, from `cwd`; the CompletedProcess (text, not checked)."""
  return subprocess.run([sys.executable, *args], cwd=cwd, env=installed_env(site), capture_output=True, text=True,
                        timeout=timeout, check=False)
