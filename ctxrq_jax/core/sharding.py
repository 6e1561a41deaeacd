"""Device mesh, logical-axis rules and shardings (parameters born sharded; batch over data x fsdp).

The mesh always has the three axes ('data', 'fsdp', 'tensor'), sized by `config.mesh` (-1 on one axis takes the
remaining devices). Parameters name their dimensions with logical axes ('embed', 'mlp', ...; see
ctxrq_jax/models/transformer.py); `config.sharding_rules` maps those names to mesh axes as data, so FSDP / tensor
parallelism is a config change. The batch is split over ('data', 'fsdp'): both are data-parallel axes, fsdp
additionally shards the parameters and optimizer state.

Both stages use this one API: stage 1 keeps its parameters replicated on the same ('data', 'fsdp', 'tensor') mesh,
stage 2 shards them by the rules, sampling runs on a data-parallel mesh. Multi-host start-up is in `core/host.py`;
every process feeds its slice of the global batch through `host_local_batch_to_global`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterator, Mapping, Optional, Sequence

import flax.linen as nn
import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from ctxrq_jax.core.config import ConfigError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # Mesh axes the batch dimension is split over.

Rules = tuple[tuple[str, Optional[tuple[str, ...]]], ...]


# ----------------------------------------------------------------------------------------------- mesh
def mesh_shape(mesh_cfg: Mapping[str, Any], num_devices: int) -> dict[str, int]:
  """Resolves `{'data': d, 'fsdp': f, 'tensor': t}` (one entry may be -1) for `num_devices` devices.

  Raises ConfigError naming the sizes when they are not positive integers or do not multiply to the device count.
  """
  keys = set(mesh_cfg.keys())
  if keys != set(MESH_AXES):
    raise ConfigError(f"config.mesh must have exactly the keys {list(MESH_AXES)}, got {sorted(keys)}")
  sizes = {}
  for name in MESH_AXES:
    v = mesh_cfg[name]
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or (v < 1 and v != -1):
      raise ConfigError(f"config.mesh.{name} must be a positive integer or -1, got {v!r}")
    sizes[name] = int(v)
  fill = [k for k, v in sizes.items() if v == -1]
  if len(fill) > 1:
    raise ConfigError(f"at most one mesh axis may be -1, got {', '.join(fill)} = -1")
  known = math.prod(v for v in sizes.values() if v != -1)
  if fill:
    if num_devices % known:
      raise ConfigError(f"mesh {sizes} cannot fill {num_devices} devices: the fixed axes multiply to {known}, "
                        f"which does not divide {num_devices}")
    sizes[fill[0]] = num_devices // known
  total = math.prod(sizes.values())
  if total != num_devices:
    raise ConfigError(f"mesh data={sizes['data']} x fsdp={sizes['fsdp']} x tensor={sizes['tensor']} = {total} "
                      f"devices, but {num_devices} devices are available")
  return sizes


def make_mesh(mesh_cfg: Mapping[str, Any], devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all), sized by `mesh_cfg` (see `mesh_shape`).

  Devices are laid out by `mesh_utils.create_device_mesh` (topology aware on TPU, so the tensor axis gets the
  fastest links); where that cannot place the shape it falls back to the devices in order.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_cfg, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError) as e:
    log.info("create_device_mesh could not place %s (%s); using device order", shape, e)
    grid = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(grid, MESH_AXES)


def data_parallel_size(mesh: Mesh) -> int:
  """Number of batch shards: |data| x |fsdp|."""
  return int(math.prod(mesh.shape[a] for a in BATCH_AXES))


def check_batch_size(global_batch: int, mesh: Mesh, what: str = "config.train.batch_size") -> None:
  """Raises ConfigError unless `global_batch` splits evenly over the data-parallel axes and the hosts."""
  dp = data_parallel_size(mesh)
  if global_batch < 1 or global_batch % dp:
    raise ConfigError(f"{what}={global_batch} must be a positive multiple of the data-parallel size "
                      f"data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']} = {dp}")
  if global_batch % jax.process_count():
    raise ConfigError(f"{what}={global_batch} must be divisible by the number of processes {jax.process_count()}")


# ----------------------------------------------------------------------------------------------- rules
def logical_rules(cfg: Any) -> Rules:
  """Validated logical-axis rules from `config.sharding_rules` (or a config holding it, or the list itself).

  Each rule is `(logical_axis, mesh_axes)` with mesh_axes None, one mesh-axis name, or a sequence of names.
  Returns a tuple of `(name, tuple_of_mesh_axes_or_None)` pairs, in order (flax takes the first rule that fits).
  """
  rules = cfg.sharding_rules if hasattr(cfg, "sharding_rules") else cfg
  if rules is None or isinstance(rules, (str, bytes)):
    raise ConfigError(f"sharding_rules must be a list of (logical_axis, mesh_axes) pairs, got {rules!r}")
  out = []
  for i, rule in enumerate(rules):
    if not isinstance(rule, (list, tuple)) or len(rule) != 2 or not isinstance(rule[0], str):
      raise ConfigError(f"sharding_rules[{i}] must be a (logical_axis: str, mesh_axes) pair, got {rule!r}")
    name, axes = rule
    if axes is None:
      out.append((name, None))
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    bad = [a for a in axes if a not in MESH_AXES]
    if bad or not axes:
      raise ConfigError(f"sharding_rules[{i}] ({name!r}) names unknown mesh axes {bad or axes}; "
                        f"mesh axes are {list(MESH_AXES)}")
    out.append((name, axes))
  return tuple(out)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Activates the mesh and the logical rules so `nn.with_logical_constraint` in the model takes effect.

  Caveat (flax 0.12): under an ambient mesh, `nn.DenseGeneral` with a logically partitioned kernel init fails in
  `apply` (flax's parameter shape check re-runs the init and constrains the flat kernel with the full-rank spec),
  so ctxrq_jax.train only enters `nn.logical_axis_rules` and lets XLA propagate activation shardings.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drops mesh axes from a dimension they do not divide (e.g. an 11-entry condition table over tensor=2)."""
  dims = []
  for i, entry in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
    if entry is None:
      dims.append(None)
      continue
    axes = (entry,) if isinstance(entry, str) else tuple(entry)
    kept, size = [], 1
    for a in axes:
      if shape[i] % (size * mesh.shape[a]) == 0:
        kept.append(a)
        size *= mesh.shape[a]
    dims.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*dims)


def logical_to_shardings(abstract_tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for a (possibly logically boxed) abstract tree, e.g. `jax.eval_shape(init)`.

  Boxed leaves (`nn.LogicallyPartitioned`) get their logical names mapped through `rules`; other leaves are
  replicated. A mesh axis that does not divide a dimension is dropped for that dimension. The returned tree has
  the structure of `nn.meta.unbox(abstract_tree)`.
  """
  logical_specs = nn.get_partition_spec(abstract_tree)
  shardings = nn.logical_to_mesh_sharding(logical_specs, mesh, rules)
  shapes = nn.meta.unbox(abstract_tree)
  is_sharding = lambda x: isinstance(x, NamedSharding)  # noqa: E731
  return jax.tree.map(lambda s, x: NamedSharding(mesh, _fit_spec(s.spec, x.shape, mesh)), shardings, shapes,
                      is_leaf=is_sharding)


def fraction_replicated(shardings: Any, shapes: Any) -> float:
  """Fraction of array *elements* held in fully replicated arrays (0 = everything sharded).

  Args:
    shardings: pytree of `jax.sharding.Sharding`.
    shapes: matching pytree of arrays / ShapeDtypeStructs.
  """
  is_sharding = lambda x: isinstance(x, jax.sharding.Sharding)  # noqa: E731
  s_leaves = jax.tree.leaves(shardings, is_leaf=is_sharding)
  x_leaves = jax.tree.leaves(shapes)
  if len(s_leaves) != len(x_leaves):
    raise ValueError(f"shardings ({len(s_leaves)} leaves) and shapes ({len(x_leaves)} leaves) do not match")
  total = replicated = 0
  for s, x in zip(s_leaves, x_leaves):
    n = int(math.prod(x.shape))
    total += n
    if s.is_fully_replicated:
      replicated += n
  return replicated / total if total else 0.0


# ----------------------------------------------------------------------------------------------- batches
def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over ('data', 'fsdp'); everything else replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def stacked_batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches stacked on a leading steps axis ([S, B, ...], several training steps per call): the steps axis
  replicated, the batch dimension split as in `batch_sharding`."""
  return NamedSharding(mesh, P(None, BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def host_local_batch_to_global(batch: Any, mesh: Mesh, *, stacked: bool = False) -> Any:
  """This process's slice of the global batch (numpy, leading dim B / process_count) -> global sharded arrays.
  `stacked`: every leaf is [S, B / process_count, ...], S batches of consecutive steps (`stacked_batch_sharding`).

  Raises ValueError when the global batch cannot be split evenly over the data-parallel shards.
  """
  sharding = stacked_batch_sharding(mesh) if stacked else batch_sharding(mesh)
  dp = data_parallel_size(mesh)
  axis = 1 if stacked else 0

  def put(x):
    x = np.asarray(x)
    if x.ndim <= axis:
      raise ValueError("batch leaves need a leading batch dimension, got a scalar" if not stacked else
                       f"stacked batch leaves need [steps, batch, ...] dimensions, got shape {x.shape}")
    global_size = x.shape[axis] * jax.process_count()
    if global_size % dp:
      raise ValueError(f"global batch {global_size} ({x.shape[axis]} per process x {jax.process_count()}) is not "
                       f"divisible by the data-parallel size data x fsdp = {dp}")
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree.map(put, batch)


__all__ = ["BATCH_AXES", "MESH_AXES", "batch_sharding", "check_batch_size", "data_parallel_size",
           "fraction_replicated", "host_local_batch_to_global", "logical_rules",
           "logical_to_shardings", "make_mesh", "mesh_context", "mesh_shape",
           "replicated", "stacked_batch_sharding"]
