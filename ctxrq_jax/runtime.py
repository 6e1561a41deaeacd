"""Host-side plumbing shared by the commands: multi-host start-up, config snapshots, metric writers, batches."""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

from clu import metric_writers
from clu import periodic_actions
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np



def setup_host() -> None:
  """Joins the multi-host job when the environment describes one (see `sharding.maybe_initialize_distributed`)."""
  from ctxrq_jax import sharding  # pylint: disable=g-import-not-at-top
  sharding.maybe_initialize_distributed()


def save_config(config: ml_collections.ConfigDict, workdir: str, name: str = "config.json") -> str:
  """Writes the config as JSON into workdir (process 0 only, atomically) so a run is self-describing."""
  path = os.path.join(workdir, name)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(tmp, path)
  return path


def load_config(workdir: str, name: str = "config.json") -> ml_collections.ConfigDict:
  """Reads a config written by `save_config`; a clear error names a missing or unreadable file."""
  path = os.path.join(workdir, name)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: is {workdir} the workdir of a training run?")
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"config snapshot {path} is unreadable: {e}") from e


def writer_and_progress(workdir: str, num_steps: int) -> tuple[Any, periodic_actions.ReportProgress]:
  """TensorBoard writer (process 0 writes files, others only log) and a steps/s + ETA progress reporter."""
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0, asynchronous=False)
  progress = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer, every_secs=15.0)
  return writer, progress


def data_mesh() -> Mesh:
  """A 1-D mesh over every device, axis 'data' (stage 1 is plain data parallel)."""
  return Mesh(np.asarray(jax.devices()), ("data",))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(mesh.axis_names))


def global_batch(host_batch: dict[str, np.ndarray], batch_sharding_: NamedSharding) -> dict[str, jax.Array]:
  """This host's slice of the global batch -> global arrays sharded along the batch axis."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(batch_sharding_, np.asarray(x)), host_batch)


def first_batch(iterator: Iterator[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """The first batch of an iterator, as numpy arrays (fixed eval / image batches)."""
  return jax.tree.map(np.asarray, next(iter(iterator)))
