"""Test-wide settings and shared fixtures (the helpers behind them are in tests/helpers.py)."""

import contextlib
import os
import shutil
import tempfile

from tests import helpers

# Before any computation initialises XLA's CPU backend; children inherit it (see helpers.TEST_XLA_FLAGS).
os.environ["XLA_FLAGS"] = helpers.xla_flags(
    " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if f not in helpers.TEST_XLA_FLAGS.split()))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

# The 'rbg' PRNG compiles much faster on CPU than threefry; tests compare runs with each other, never against
# numbers drawn with a particular PRNG, so the choice does not weaken any assertion. The production default
# (threefry) is exercised where it matters: the `threefry` fixture below, and the multi-device test's subprocess.
jax.config.update("jax_default_prng_impl", "rbg")

# Compiles dominate the suite on a small CPU. One persistent compilation cache for the whole run (both xdist workers
# and every `python -m ctxrq_jax...` subprocess) makes each re-compilation of the same program (one that took
# `helpers.CACHE_MIN_COMPILE_SECS` or more; eager ops are left out) a file read: trainers
# build new jitted functions per call, so a resumed run, a second run of one config, or a subprocess would otherwise
# compile everything again. It changes how often a program is compiled, never what is compiled. A maximum size turns
# on JAX's file lock around every cache read and write, so processes never see each other's half-written entries.
_CACHE_ENV = helpers.CACHE_ENV
_CACHE_MAX_BYTES = helpers.CACHE_MAX_BYTES


def pytest_configure(config):
  if not hasattr(config, "workerinput"):  # the controller (or a run without xdist): workers inherit the variable
    config._ctxrq_cache_dir = tempfile.mkdtemp(prefix="ctxrq_jax_test_cache_")  # pylint: disable=protected-access
    os.environ[_CACHE_ENV] = config._ctxrq_cache_dir  # pylint: disable=protected-access
  jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", helpers.CACHE_MIN_COMPILE_SECS)
  jax.config.update("jax_compilation_cache_max_size", _CACHE_MAX_BYTES)


def pytest_unconfigure(config):
  cache_dir = getattr(config, "_ctxrq_cache_dir", None)
  if cache_dir:  # the controller, once every worker is done
    shutil.rmtree(cache_dir, ignore_errors=True)


@contextlib.contextmanager
def default_prng(impl: str):
  """Sets `jax_default_prng_impl` for a block and restores the previous one."""
  before = jax.config.jax_default_prng_impl
  jax.config.update("jax_default_prng_impl", impl)
  try:
    yield impl
  finally:
    jax.config.update("jax_default_prng_impl", before)


@pytest.fixture()
def threefry():
  """The production PRNG (`threefry2x32`, JAX's default) for one test; the suite's 'rbg' is restored after it."""
  with default_prng("threefry2x32") as impl:
    yield impl


@pytest.fixture()
def subprocess_env():
  """Environment for a child `python -m ctxrq_jax...`: CPU, this checkout first on the path, the PRNG this process
  uses (so the child's numbers equal an in-process run's) and the run's compilation cache."""
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=helpers.REPO,
              JAX_DEFAULT_PRNG_IMPL=jax.config.jax_default_prng_impl, **helpers.compilation_cache_env())


@pytest.fixture(scope="session")
def stage2_codes_dir(tmp_path_factory) -> str:
  """The tiny stage-2 code dataset (`helpers.write_stage2_codes`), written once per test process."""
  return helpers.write_stage2_codes(tmp_path_factory.mktemp("stage2_codes"))


@pytest.fixture(scope="session")
def tiny_rqvae():
  """(model, variables, images [2, 16, 16, 1]) of `helpers.TINY_RQVAE`, initialised once per test process."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.models import rqvae  # pylint: disable=g-import-not-at-top
  model = rqvae.RQVAE.from_config(helpers.TINY_RQVAE)
  variables = jax.jit(rqvae.init_variables, static_argnums=0)(model, helpers.rbg_key())
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, size=(2, 16, 16, 1)).astype(np.float32))
  return model, variables, x


# Session fixtures whose tests run in one xdist group named after the fixture, so that one worker builds it once
# (their tests are spread over several modules).
_SHARED_SESSION_FIXTURES = ("tiny_rqvae",)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
  """Longest first: the tests sharing the installed wheel, then the other slow ones. Under the README's
  `-n 2 --dist loadgroup` the wheel's tests (xdist_group "wheel") run in one worker, so the wheel is built and its
  smoke demo run once, while the other worker takes the other slow tests (and the smaller groups, whose tests share
  a module or session fixture that one worker then builds once); short tests fill the end."""
  del config
  for item in items:
    shared = [f for f in _SHARED_SESSION_FIXTURES if f in item.fixturenames]
    if shared and not item.get_closest_marker("xdist_group"):
      item.add_marker(pytest.mark.xdist_group(shared[0]))

  def rank(item):
    group = item.get_closest_marker("xdist_group")
    if group and group.args and group.args[0] == "wheel":
      return 0
    return 1 if group or item.get_closest_marker("slow") else 2

  items.sort(key=rank)  # stable: collection order within each rank
