"""Mesh and logical-rule validation (ctxrq_jax/core/sharding.py); the multi-device equivalence checks run in
tests/integration/test_multi_device.py."""

import ml_collections
import numpy as np
import pytest

from ctxrq_jax.configs import common
from ctxrq_jax.core import sharding
from ctxrq_jax.core.config import ConfigError


def _mesh(data=-1, fsdp=1, tensor=1):
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


def test_mesh_shape_and_errors():
  assert sharding.mesh_shape(_mesh(), 8) == {"data": 8, "fsdp": 1, "tensor": 1}
  assert sharding.mesh_shape(_mesh(2, -1, 2), 8) == {"data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(ConfigError, match=r"mesh data=3 x fsdp=1 x tensor=1 = 3 devices, but 8 devices"):
    sharding.mesh_shape(_mesh(3), 8)
  with pytest.raises(ConfigError, match="fixed axes multiply to 3, which does not divide 8"):
    sharding.mesh_shape(_mesh(-1, 3), 8)
  with pytest.raises(ConfigError, match="at most one mesh axis may be -1"):
    sharding.mesh_shape(_mesh(-1, -1), 8)
  with pytest.raises(ConfigError, match="config.mesh.tensor must be a positive integer or -1"):
    sharding.mesh_shape(_mesh(tensor=0), 8)


def test_logical_rules_validation():
  assert sharding.logical_rules([("batch", ("data", "fsdp")), ("embed", "fsdp"), ("kv", None)]) == (
      ("batch", ("data", "fsdp")), ("embed", ("fsdp",)), ("kv", None))
  with pytest.raises(ConfigError, match=r"sharding_rules\[1\] \('embed'\) names unknown mesh axes \['model'\]"):
    sharding.logical_rules([("batch", "data"), ("embed", "model")])
  with pytest.raises(ConfigError, match=r"sharding_rules\[0\] must be a \(logical_axis"):
    sharding.logical_rules([("batch",)])


def test_default_rules_single_device_mesh_and_batches():
  assert sharding.logical_rules(list(common.DEFAULT_SHARDING_RULES))[:2] == (
      ("batch", ("data", "fsdp")), ("embed", ("fsdp",)))
  mesh = sharding.make_mesh(common.mesh())
  assert sharding.MESH_AXES == mesh.axis_names and sharding.data_parallel_size(mesh) == len(mesh.devices.flat)
  x = np.arange(4 * len(mesh.devices.flat), dtype=np.int32)
  batch = sharding.host_local_batch_to_global({"x": x}, mesh)
  np.testing.assert_array_equal(np.asarray(batch["x"]), x)
  assert batch["x"].sharding == sharding.batch_sharding(mesh)
  with pytest.raises(ValueError, match="scalar"):
    sharding.host_local_batch_to_global({"x": np.float32(1.0)}, mesh)
  # Batches of 3 steps stacked on a leading axis: the batch is the second dimension.
  stacked = sharding.host_local_batch_to_global({"x": np.stack([x, x + 1, x + 2])}, mesh, stacked=True)
  np.testing.assert_array_equal(np.asarray(stacked["x"]), np.stack([x, x + 1, x + 2]))
  assert stacked["x"].sharding == sharding.stacked_batch_sharding(mesh)
  with pytest.raises(ValueError, match=r"stacked batch leaves need \[steps, batch, ...\] dimensions, got shape \(4,\)"):
    sharding.host_local_batch_to_global({"x": x}, mesh, stacked=True)
  with pytest.raises(ConfigError, match="config.train.batch_size=0 must be a positive multiple"):
    sharding.check_batch_size(0, mesh)
