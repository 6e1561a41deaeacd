"""Host set-up: joining a multi-host job, and which process writes shared files.

`setup_host()` must run before anything touches a JAX backend (commands call it first thing in `main`).
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def _int_env(name: str) -> int:
  try:
    return int(os.environ.get(name, "0"))
  except ValueError:
    return 0


def distributed_requested() -> bool:
  """Whether the environment describes a multi-process job.

  True when any of:
    * `CTXRQ_DISTRIBUTED=1` (explicit; then `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` or a
      cluster that jax auto-detects supply the details);
    * `JAX_COORDINATOR_ADDRESS` is set (with `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`, passed to jax);
    * a SLURM job step with more than one task (`SLURM_STEP_NUM_TASKS` > 1, which `srun` sets; jax auto-detects
      SLURM). Not `SLURM_NTASKS`: salloc and a batch script set it for the whole allocation, where a process
      started without srun is alone;
    * Open MPI with more than one rank (`OMPI_COMM_WORLD_SIZE` > 1);
    * a multi-host Cloud TPU slice on GKE (`TPU_WORKER_HOSTNAMES` lists more than one host). A TPU VM sets no such
      variable: launch/tpu.sh runs every worker with `CTXRQ_DISTRIBUTED=1`.
  `CTXRQ_DISTRIBUTED=0` forces single-process.
  """
  explicit = os.environ.get("CTXRQ_DISTRIBUTED")
  if explicit is not None:
    return explicit.strip().lower() in ("1", "true", "yes")
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if _int_env("SLURM_STEP_NUM_TASKS") > 1 or _int_env("OMPI_COMM_WORLD_SIZE") > 1:
    return True
  hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  return len(hosts) > 1


def maybe_initialize_distributed() -> bool:
  """Calls `jax.distributed.initialize()` once when `distributed_requested()`; returns whether it did.

  Must run before any other JAX call touches a backend (jax.devices(), arrays, jit).
  """
  if not distributed_requested() or jax.distributed.is_initialized():
    return False
  # jax reads JAX_COORDINATOR_ADDRESS itself but not the process count and id; launch/gpu.sh and hand-made jobs
  # export them (a cluster jax detects, such as SLURM or a TPU slice, needs neither).
  kwargs = {}
  for key, env in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
    value = os.environ.get(env, "").strip()
    if value:
      try:
        kwargs[key] = int(value)
      except ValueError:
        raise ValueError(f"{env} must be an integer, got {value!r}") from None
  jax.distributed.initialize(**kwargs)
  log.info("jax.distributed initialised: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def setup_host() -> None:
  """Joins the multi-host job when the environment describes one (see `distributed_requested`)."""
  maybe_initialize_distributed()


def is_chief() -> bool:
  """Process 0 writes logs, images, configs and checkpoint metadata; the others only read."""
  return jax.process_index() == 0


def host_range(total: int, process_index: int, process_count: int) -> tuple[int, int]:
  """[start, stop) of `total` ordered items that process `process_index` of `process_count` takes: contiguous, sizes
  differing by at most one (the first `total % process_count` processes take one more, as `np.array_split`), so the
  processes' shares one after the other are all items in order."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is outside [0, {process_count})")
  size, extra = divmod(total, process_count)
  start = process_index * size + min(process_index, extra)
  return start, start + size + (process_index < extra)
