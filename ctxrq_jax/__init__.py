"""ctxrq_jax: Draft-and-Revise with Contextual RQ-Transformer in JAX/Flax."""

__version__ = "0.1.0"
