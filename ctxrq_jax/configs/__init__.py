"""The package's config defaults: what the trainers validate user configs against, key for key.

The top-level `configs/` files of a checkout are the user-facing entry points and load these; installed as a wheel,
the package carries them, so every command works without a checkout. Bare names resolve here:
`core.config.load_config_file("demo")` is `ctxrq_jax/configs/demo.py`. These modules import no JAX, so a command's
`--help` stays fast.
"""
