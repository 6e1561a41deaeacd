"""Test-wide settings."""

import jax

# The 'rbg' PRNG compiles much faster on CPU than threefry; tests compare runs with each other, never against
# numbers drawn with a particular PRNG, so the choice does not weaken any assertion.
jax.config.update("jax_default_prng_impl", "rbg")
