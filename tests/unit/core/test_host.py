"""Multi-host detection from the environment (ctxrq_jax/core/host.py)."""

from ctxrq_jax.core import host


def test_distributed_requested_from_environment(monkeypatch):
  for k in ("CTXRQ_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS",
            "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(k, raising=False)
  assert not host.distributed_requested()
  # Inside an allocation of 4 tasks (salloc, a batch script) a process started without srun is alone ...
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert not host.distributed_requested()
  # ... and an srun job step of 4 tasks is one job.
  monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
  assert host.distributed_requested()
  monkeypatch.setenv("CTXRQ_DISTRIBUTED", "0")
  assert not host.distributed_requested()
  monkeypatch.delenv("CTXRQ_DISTRIBUTED")
  monkeypatch.delenv("SLURM_NTASKS")
  monkeypatch.delenv("SLURM_STEP_NUM_TASKS")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "h0,h1")
  assert host.distributed_requested()


def test_process_count_and_id_from_the_environment_reach_jax(monkeypatch):
  # jax reads JAX_COORDINATOR_ADDRESS itself, not JAX_NUM_PROCESSES / JAX_PROCESS_ID (launch/gpu.sh exports them).
  calls = []
  monkeypatch.setattr(host.jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(host.jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.delenv("CTXRQ_DISTRIBUTED", raising=False)
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "3")
  assert host.maybe_initialize_distributed()
  assert calls == [{"num_processes": 4, "process_id": 3}]
  monkeypatch.delenv("JAX_NUM_PROCESSES")
  monkeypatch.delenv("JAX_PROCESS_ID")
  assert host.maybe_initialize_distributed() and calls[-1] == {}  # a cluster jax detects supplies them
  monkeypatch.setenv("JAX_PROCESS_ID", "one")
  try:
    host.maybe_initialize_distributed()
    raise AssertionError("a non-integer JAX_PROCESS_ID was accepted")
  except ValueError as e:
    assert "JAX_PROCESS_ID must be an integer, got 'one'" in str(e)
