"""Per-program XLA compiler options from a config: which of XLA:CPU's YNNPACK library fusions a jitted program uses.

XLA:CPU (jaxlib 0.10) hands dots, convolutions and some reductions and elementwise ops to YNNPACK. For the stage-1
RQ-VAE step that is a loss on both CPUs measured (docs/speed.md, "YNNPACK's convolutions and the stage-1 step"): the
gradients of its small 3x3 convolutions run several times slower there than in XLA's own kernels. The option applies
to one jitted program (`jax.jit(..., compiler_options=...)`), so the stage-2 step, whose dense layers gain from
YNNPACK, keeps XLA's default; on a GPU or TPU nothing is passed.
"""

from __future__ import annotations

import jax

from ctxrq_jax.core.config import ConfigError

YNN_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"
# The values jaxlib 0.10's XLA accepts in the comma-separated list (`LibraryFusionType` in xla.proto).
YNN_FUSION_TYPES = ("LIBRARY_FUSION_TYPE_DOT", "LIBRARY_FUSION_TYPE_ELTWISE", "LIBRARY_FUSION_TYPE_REDUCE",
                    "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT", "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION")
# The config value that leaves XLA's own default list in place.
DEFAULT = "default"


def check_ynn_fusions(value: str, key: str) -> None:
  """ConfigError naming `key` unless `value` is 'default' (XLA's list), '' (none) or a comma-separated list of
  `YNN_FUSION_TYPES`; checked before anything compiles (XLA's own error would come at the first compile)."""
  if not isinstance(value, str):
    raise ConfigError(f"{key} must be a string, got {value!r}")
  unknown = [name for name in value.split(",") if name and name not in YNN_FUSION_TYPES] if value != DEFAULT else []
  if unknown:
    raise ConfigError(f"{key} has unknown YNNPACK fusion types {unknown}; expected a comma-separated list of "
                      f"{list(YNN_FUSION_TYPES)}, '' for none, or {DEFAULT!r} for XLA's own list")


def cpu_compiler_options(ynn_fusions: str) -> dict[str, str] | None:
  """`compiler_options` for `jax.jit`: the YNNPACK fusion list on a CPU backend; None (XLA's defaults) when
  `ynn_fusions` is 'default' or the default backend is not a CPU."""
  if ynn_fusions == DEFAULT or jax.default_backend() != "cpu":
    return None
  return {YNN_FUSION_OPTION: ynn_fusions}
